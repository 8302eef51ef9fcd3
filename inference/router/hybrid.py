"""Stages 3 and 4 of the hybrid router (seed Karar 1): score fusion and memory-budget gating.

    keyword confidence >= fast-path threshold  ->  keyword scores only (the semantic model is skipped)
    otherwise                                   ->  0.3 * keyword + 0.7 * semantic, per expert
    gating: top-1/2/3 by free accelerator memory (CPU: a RAM budget), only servable experts,
            weights renormalised to sum 1, `general` alone when the best score is below 0.5.
"""

import time
from dataclasses import dataclass, field

from django.conf import settings

from inference.experts import EXPERTS, GENERAL_ID

from . import keyword, semantic

MODES = ("hybrid", "keyword", "semantic")


@dataclass
class RoutingResult:
    query: str
    experts: list  # [(expert id, weight)], weights sum to 1; empty: no servable expert, base model only
    fast_path: bool
    keyword_confidence: float
    scores: dict  # expert id -> the score gating ranked (fused, keyword-only on the fast path)
    keyword_scores: dict
    semantic_scores: dict  # calibrated to [0, 1] (see calibrate)
    fallback: bool  # `general` was chosen because nothing scored high enough
    max_experts: int
    timings: dict = field(default_factory=dict)  # keyword_ms, semantic_ms, total_ms

    @property
    def top(self):
        return self.experts[0][0] if self.experts else None

    def as_json(self) -> dict:
        return {
            "query": self.query,
            "experts": [[e, round(w, 4)] for e, w in self.experts],
            "fast_path": self.fast_path,
            "keyword_confidence": self.keyword_confidence,
            "fallback": self.fallback,
            "scores": {e: round(s, 4) for e, s in sorted(self.scores.items(), key=lambda kv: -kv[1])},
            "timings_ms": {k: round(v, 3) for k, v in self.timings.items()},
        }


def max_experts_for(free_gb: float) -> int:
    top1_below, top2_below = settings.R3MES_ROUTER_GATING_BOUNDS_GB
    if free_gb < top1_below:
        return 1
    if free_gb <= top2_below:
        return 2
    return 3


def memory_budget_gb(device: str | None = None) -> float:
    """Free accelerator memory in GB when serving on CUDA; otherwise the configured RAM budget."""
    if device and str(device).startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free / 2**30
    return settings.R3MES_ROUTER_CPU_BUDGET_GB


def calibrate(cosines: dict) -> dict:
    """Rescale MiniLM cosines to the keyword confidences' scale: the floor maps to 0 (no evidence),
    the ceiling to 1. Raw cosines of a right English match are often 0.3-0.6, so without this the
    0.5 fallback bar would send most queries to `general`. Not clipped at 1: Turkish text sits at
    0.7-0.8 to every Turkish example, and clipping would turn those into ties."""
    floor, ceil = settings.R3MES_ROUTER_SEMANTIC_FLOOR, settings.R3MES_ROUTER_SEMANTIC_CEIL
    return {e: max(0.0, (c - floor) / (ceil - floor)) for e, c in cosines.items()}


def fuse(keyword_scores: dict, semantic_scores: dict) -> dict:
    kw, sem = settings.R3MES_ROUTER_KEYWORD_WEIGHT, settings.R3MES_ROUTER_SEMANTIC_WEIGHT
    experts = set(keyword_scores) | set(semantic_scores)
    return {e: kw * keyword_scores.get(e, 0.0) + sem * semantic_scores.get(e, 0.0) for e in experts}


def gate(scores: dict, allowed, max_experts: int) -> tuple[list, bool]:
    """Top-k allowed experts with weights summing to 1, or `general` alone below the fallback bar."""
    ranked = sorted(((e, s) for e, s in scores.items() if e in allowed and s > 0), key=lambda kv: (-kv[1], kv[0]))
    if not ranked or ranked[0][1] < settings.R3MES_ROUTER_FALLBACK_THRESHOLD:
        return ([(GENERAL_ID, 1.0)] if GENERAL_ID in allowed else []), True
    best = ranked[0][1]
    # Mixing in an expert that scores far below the best only dilutes the right one.
    chosen = [(e, s) for e, s in ranked[:max_experts] if s >= settings.R3MES_ROUTER_MIN_RELATIVE_SCORE * best]
    total = sum(s for _, s in chosen)
    return [(e, s / total) for e, s in chosen], False


def route(query: str, servable=None, all_experts: bool = False, max_experts: int | None = None,
          device: str | None = None, mode: str = "hybrid", exclude=()) -> RoutingResult:
    """Route one query. `servable`: expert ids with an approved adapter (read from the database when
    None); `all_experts` ignores servability; `exclude` drops experts (e.g. a corrupt adapter)."""
    if mode not in MODES:
        raise ValueError(f"unknown routing mode {mode!r}; choose one of {', '.join(MODES)}")
    started = time.perf_counter()
    if all_experts:
        allowed = set(EXPERTS)
    else:
        if servable is None:
            from inference.models import Adapter

            servable = Adapter.servable()
        allowed = set(servable) & set(EXPERTS)
    allowed -= set(exclude)
    if max_experts is None:
        max_experts = max_experts_for(memory_budget_gb(device))

    kw = keyword.route(query) if mode != "semantic" else keyword.KeywordResult({}, {}, 0.0)
    fast_path = mode != "semantic" and kw.confidence >= settings.R3MES_ROUTER_FAST_PATH_THRESHOLD
    timings = {"keyword_ms": kw.seconds * 1000, "semantic_ms": 0.0}
    sem_scores = {}
    if mode == "keyword" or fast_path:
        scores = dict(kw.scores)
    else:
        sem = semantic.get_router().route(query)
        sem_scores = calibrate(sem.scores)
        timings["semantic_ms"] = sem.seconds * 1000
        scores = sem_scores if mode == "semantic" else fuse(kw.scores, sem_scores)
    experts, fallback = gate(scores, allowed, max_experts)
    timings["total_ms"] = (time.perf_counter() - started) * 1000
    return RoutingResult(query, experts, fast_path, kw.confidence, scores, kw.scores, sem_scores, fallback,
                         max_experts, timings)
