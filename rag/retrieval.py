"""Hybrid retrieval over the collections a user may read (rag.citations turns the results into cited sources).

Dense (FAISS, cosine on MiniLM vectors) and sparse (BM25) candidates are fused by reciprocal rank
fusion: score(chunk) = Σ over the lists it appears in of 1 / (k + rank), rank from 1, k = 60.
Candidates are filtered to live documents of readable collections *before* ranking, so neither
the ranks nor the results ever depend on text the user cannot see.
"""

import time
from dataclasses import asdict, dataclass

import numpy as np
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.urls import reverse

from r3mes_site import metrics

from . import index
from .embedding import embed_query
from .models import Chunk, Collection, Document

RRF_K = 60
MODES = ("hybrid", "dense", "bm25")


@dataclass
class Result:
    chunk_id: int
    document_id: int
    document_title: str
    collection_id: int
    collection: str
    page: int
    snippet: str
    text: str
    dense_score: float
    bm25_score: float
    fused_score: float

    @property
    def url(self):
        return reverse("document-detail", args=[self.document_id]) + f"#page-{self.page}"

    def as_dict(self):
        return {**asdict(self), "url": self.url}


def reciprocal_rank_fusion(rankings, k=RRF_K):
    """{id: fused score} for lists of ids, each best first."""
    fused = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused


def readable_collection_ids(user, collections=None):
    """Ids of the requested collections (ids or Collection objects; None = all readable), or
    PermissionDenied naming the ones that do not exist or are not readable (one message for both,
    so a private collection's existence is not revealed)."""
    readable = Collection.readable_by(user)
    if collections is None:
        return list(readable.values_list("pk", flat=True))
    wanted = set()
    for item in collections:
        try:
            wanted.add(int(item.pk if isinstance(item, Collection) else item))
        except (TypeError, ValueError):
            raise PermissionDenied(f"Collection {item!r} does not exist or you cannot read it") from None
    allowed = set(readable.filter(pk__in=wanted).values_list("pk", flat=True))
    missing = sorted(wanted - allowed)
    if missing:
        raise PermissionDenied(f"Collection(s) {', '.join(map(str, missing))} do not exist or you cannot read them")
    return sorted(allowed)


def retrieve(query, user, collections=None, top_k=5, threshold=None, mode="hybrid", query_vector=None):
    """The top_k passages for `query` from collections `user` may read, best first.

    `threshold` (default R3MES_RAG_MIN_SCORE) is the least cosine similarity a passage needs;
    `mode` "dense" or "bm25" ranks by one list only (for comparison in the benchmark);
    `query_vector` is the query's embedding when the caller already has it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    started = time.perf_counter()
    collection_ids = readable_collection_ids(user, collections)
    query = (query or "").strip()
    if not query or not collection_ids or top_k <= 0:
        return []
    threshold = settings.R3MES_RAG_MIN_SCORE if threshold is None else threshold
    n = max(settings.R3MES_RAG_CANDIDATES, top_k)
    if query_vector is None:
        query_vector = embed_query(query)

    dense, sparse = [], []
    for collection_id in collection_ids:
        loaded = index.load(collection_id)
        if loaded is None:
            continue
        if mode != "bm25":
            dense += loaded.dense_search(query_vector, n)
        if mode != "dense":
            sparse += loaded.bm25_search(query, n)

    # One query keeps only candidates of live documents in readable collections and fetches
    # their vectors (no model instances: at 100k chunks building ~100 of them per query was a
    # third of the time); the display fields are read afterwards for the top_k only.
    candidates = {chunk_id for chunk_id, _ in dense} | {chunk_id for chunk_id, _ in sparse}
    vectors = dict(Chunk.objects.filter(
        pk__in=candidates,
        document__collection_id__in=collection_ids,
        document__in=Document.objects.live(),
    ).values_list("pk", "vector"))
    dense = sorted((item for item in dense if item[0] in vectors), key=lambda item: -item[1])[:n]
    sparse = sorted((item for item in sparse if item[0] in vectors), key=lambda item: -item[1])[:n]
    fused = reciprocal_rank_fusion([[chunk_id for chunk_id, _ in ranking] for ranking in (dense, sparse) if ranking])
    bm25_scores = dict(sparse)

    ranked = []
    for chunk_id, fused_score in fused.items():
        # Exact cosine from the stored vector, also for BM25-only hits.
        cosine = float(np.dot(np.frombuffer(bytes(vectors[chunk_id]), dtype=np.float32), query_vector))
        if cosine >= threshold:
            ranked.append((chunk_id, fused_score, cosine))
    ranked.sort(key=lambda item: (-item[1], -item[2], item[0]))
    ranked = ranked[:top_k]
    chunks = Chunk.objects.select_related("document__collection").only(
        "id", "page", "text", "document", "document__original_name", "document__collection",
        "document__collection__name",
    ).in_bulk([chunk_id for chunk_id, _, _ in ranked])

    results = []
    for chunk_id, fused_score, cosine in ranked:
        chunk = chunks.get(chunk_id)
        if chunk is None:  # deleted between the two queries
            continue
        results.append(Result(
            chunk_id=chunk.pk, document_id=chunk.document_id, document_title=chunk.document.original_name,
            collection_id=chunk.document.collection_id, collection=chunk.document.collection.name,
            page=chunk.page, snippet=chunk.snippet(), text=chunk.text, dense_score=round(cosine, 6),
            bm25_score=round(bm25_scores.get(chunk_id, 0.0), 6), fused_score=round(fused_score, 6),
        ))
    metrics.retrieval_latency.observe(time.perf_counter() - started)
    return results
