"""Stage 1 of the hybrid router: compiled regexes per expert, confidences from the number of hits.

Each expert's patterns are compiled into ONE alternation with a named group per pattern, so a query
costs one `finditer` per expert and the distinct groups that fire are the distinct keyword hits.
"""

import re
import time
from dataclasses import dataclass

from inference.experts import EXPERTS, normalize

# One keyword hit is a hint (0.65), two distinct hits are confident enough for the fast path (0.85),
# three or more are near-certain (0.95).
BASE, PER_HIT, CAP = 0.45, 0.2, 0.95
# A query written in a language (script or function words) but not asking about it: weak evidence,
# it never wins the fast path and stays under the general-fallback threshold on its own.
DETECT_CONFIDENCE = 0.4


@dataclass
class KeywordResult:
    scores: dict  # expert id -> confidence, only experts with a hit
    hits: dict  # expert id -> the matched texts (for explanations and debugging)
    seconds: float

    @property
    def confidence(self) -> float:
        return max(self.scores.values(), default=0.0)


def _compile(patterns):
    if not patterns:
        return None
    return re.compile("|".join(f"(?P<g{i}>{p})" for i, p in enumerate(patterns)), re.UNICODE)


_COMPILED = {e.id: (_compile(e.keywords), _compile(e.detect)) for e in EXPERTS.values()}


def confidence_for(hit_count: int) -> float:
    return round(min(CAP, BASE + PER_HIT * hit_count), 4) if hit_count else 0.0


def route(query: str) -> KeywordResult:
    started = time.perf_counter()
    text = normalize(query)
    scores, hits = {}, {}
    for expert, (keywords, detect) in _COMPILED.items():
        groups, matched = set(), []
        if keywords is not None:
            for m in keywords.finditer(text):
                if m.lastgroup not in groups:
                    groups.add(m.lastgroup)
                    matched.append(m.group())
        if groups:
            scores[expert], hits[expert] = confidence_for(len(groups)), matched
        elif detect is not None and detect.search(text):
            scores[expert], hits[expert] = DETECT_CONFIDENCE, ["(written in this language)"]
    return KeywordResult(scores, hits, time.perf_counter() - started)
