"""Per-collection search indexes on disk: FAISS (dense) and bm25s (sparse), under INDEX_DIR/<id>/.

The database holds every chunk's text and vector, so an index is derived data that can always be
rebuilt. Each write makes a new version: files `faiss-<v>.index` and `bm25-<v>/` are written under
temporary names and renamed, then `manifest.json` (the pointer readers follow) is replaced
atomically; the previous version is kept for readers that already opened it. Writers hold a file
lock per collection, so two workers never interleave their updates.
"""

import json
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass

import bm25s
import faiss
import numpy as np
from bm25s.stopwords import STOPWORDS_EN
from django.conf import settings
from filelock import FileLock

MANIFEST = "manifest.json"
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 96

_STOPWORDS = frozenset(STOPWORDS_EN)
_TOKEN = re.compile(r"\w+", re.UNICODE)


def bm25_tokens(text):
    """Lowercased word tokens without stopwords; a light plural fold so 'enzymes' finds 'enzyme'."""
    tokens = []
    for token in _TOKEN.findall(text.lower()):
        if token in _STOPWORDS:
            continue
        if len(token) > 3 and token.endswith("s") and not token.endswith(("ss", "us", "is")):
            token = token[:-1]
        tokens.append(token)
    return tokens


@dataclass
class LoadedIndex:
    version: int
    build: str  # unique per write: a cache never confuses two indexes that share a version number
    dense: faiss.Index  # IndexIDMap2 over IndexFlatIP or IndexHNSWFlat, ids = Chunk.pk
    bm25: bm25s.BM25 | None
    bm25_ids: np.ndarray  # BM25 document position → Chunk.pk

    @property
    def size(self):
        return self.dense.ntotal

    @property
    def kind(self):
        return "hnsw" if isinstance(faiss.downcast_index(self.dense.index), faiss.IndexHNSWFlat) else "flat"

    def chunk_ids(self):
        return faiss.vector_to_array(self.dense.id_map).astype(np.int64)

    def dense_search(self, query_vector, n):
        """[(chunk id, cosine)] best first."""
        if self.size == 0:
            return []
        scores, ids = self.dense.search(query_vector.reshape(1, -1).astype(np.float32), min(n, self.size))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def bm25_search(self, query, n):
        """[(chunk id, BM25 score)] best first; chunks sharing no term with the query are left out.

        Scores every chunk with bm25s's sparse matrix and selects the top n with argpartition:
        `BM25.retrieve` adds a thread pool, a progress bar and a full sort per call, which was
        most of its 11 ms at 100k chunks (benchmarks/RESULTS.md)."""
        tokens = bm25_tokens(query)
        if self.bm25 is None or not tokens or len(self.bm25_ids) == 0:
            return []
        known = [token for token in tokens if token in self.bm25.vocab_dict]
        if not known:
            return []
        scores = self.bm25.get_scores(known)
        k = min(n, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]  # best first, equal scores by position
        return [(int(self.bm25_ids[d]), float(scores[d])) for d in top if scores[d] > 0]


def index_dir(collection_id):
    return settings.INDEX_DIR / str(collection_id)


def lock(collection_id):
    directory = index_dir(collection_id)
    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(str(directory / ".lock"), timeout=600)


def read_manifest(collection_id):
    try:
        return json.loads((index_dir(collection_id) / MANIFEST).read_text())
    except FileNotFoundError:
        return None


_cache = {}
_cache_lock = threading.Lock()


def load(collection_id):
    """The current index of a collection (cached per process until its version changes), or None."""
    manifest = read_manifest(collection_id)
    if manifest is None:
        return None
    with _cache_lock:
        cached = _cache.get(collection_id)
        if cached is not None and cached.build == manifest["build"]:
            return cached
    loaded = _load_version(collection_id, manifest)
    with _cache_lock:
        _cache[collection_id] = loaded
    return loaded


def _load_version(collection_id, manifest):
    directory = index_dir(collection_id)
    version = manifest["version"]
    dense = faiss.read_index(str(directory / f"faiss-{version}.index"))
    if isinstance(faiss.downcast_index(dense.index), faiss.IndexHNSWFlat):
        faiss.downcast_index(dense.index).hnsw.efSearch = HNSW_EF_SEARCH
    bm25_path = directory / f"bm25-{version}"
    bm25_ids = np.load(bm25_path / "ids.npy")
    bm25 = bm25s.BM25.load(str(bm25_path), load_vocab=True, show_progress=False) if len(bm25_ids) else None
    return LoadedIndex(version, manifest["build"], dense, bm25, bm25_ids)


def new_dense(dimension, size):
    if size > settings.R3MES_RAG_HNSW_THRESHOLD:
        inner = faiss.IndexHNSWFlat(dimension, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        inner = faiss.IndexFlatIP(dimension)
    return faiss.IndexIDMap2(inner)


def build_bm25(ids, texts):
    bm25 = None
    if len(ids):
        bm25 = bm25s.BM25()
        bm25.index([bm25_tokens(text) for text in texts], show_progress=False)
    return bm25, np.asarray(ids, dtype=np.int64)


def _write(collection_id, version, dense, bm25, bm25_ids):
    directory = index_dir(collection_id)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{os.getpid()}-{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    faiss.write_index(dense, str(tmp / "faiss.index"))
    (tmp / "bm25").mkdir()
    if bm25 is not None:
        bm25.save(str(tmp / "bm25"), show_progress=False)
    np.save(tmp / "bm25" / "ids.npy", bm25_ids)
    os.replace(tmp / "faiss.index", directory / f"faiss-{version}.index")
    shutil.rmtree(directory / f"bm25-{version}", ignore_errors=True)
    os.replace(tmp / "bm25", directory / f"bm25-{version}")
    manifest = {"version": version, "build": uuid.uuid4().hex, "size": int(dense.ntotal), "dimension": int(dense.d)}
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    os.replace(tmp / MANIFEST, directory / MANIFEST)  # the commit point
    shutil.rmtree(tmp, ignore_errors=True)
    for old in directory.iterdir():  # keep this version and the previous one
        match = re.fullmatch(r"(?:faiss-(\d+)\.index|bm25-(\d+))", old.name)
        if match and int(match.group(1) or match.group(2)) < version - 1:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    return LoadedIndex(version, manifest["build"], dense, bm25, bm25_ids)


def _chunk_rows(collection_id, ids=None, with_vectors=True):
    """(ids, texts, vectors) of a collection's chunks from the database, optionally only `ids`."""
    from .models import Chunk

    fields = ("id", "text", "vector") if with_vectors else ("id", "text")
    rows = Chunk.objects.filter(document__collection_id=collection_id).order_by("id").values_list(*fields)
    wanted = None if ids is None else set(int(i) for i in ids)
    out_ids, texts, vectors = [], [], []
    for row in rows.iterator(chunk_size=2000):
        if wanted is None or row[0] in wanted:
            out_ids.append(row[0])
            texts.append(row[1])
            if with_vectors:
                vectors.append(np.frombuffer(bytes(row[2]), dtype=np.float32))
    matrix = np.vstack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return out_ids, texts, matrix


def update(collection_id, add_ids=(), add_vectors=None, remove_ids=()):
    """Adds and removes chunk vectors in the collection's index, writing a new version. Call while
    holding `lock(collection_id)`. BM25 is rebuilt from the database texts of the resulting id set
    (bm25s has no incremental add)."""
    from .embedding import dimension

    manifest = read_manifest(collection_id)
    current = _load_version(collection_id, manifest) if manifest else None
    remove = np.asarray(sorted(set(int(i) for i in remove_ids) | set(int(i) for i in add_ids)), dtype=np.int64)
    existing = current.chunk_ids() if current else np.zeros(0, dtype=np.int64)
    kept = existing[~np.isin(existing, remove)] if len(existing) else existing
    new_size = len(kept) + len(add_ids)
    wants_hnsw = new_size > settings.R3MES_RAG_HNSW_THRESHOLD
    if current is not None and (current.kind == "hnsw") == wants_hnsw and (current.kind == "flat" or not np.isin(existing, remove).any()):
        dense = current.dense  # flat indexes delete in place; HNSW only grows
        if len(remove):
            dense.remove_ids(remove)
    else:
        # First write, flat↔HNSW switch, or a deletion from HNSW (unsupported): rebuild from the DB.
        ids, _, vectors = _chunk_rows(collection_id, kept)
        dense = new_dense(vectors.shape[1] if len(ids) else dimension(), new_size)
        if len(ids):
            dense.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    if len(add_ids):
        dense.add_with_ids(np.asarray(add_vectors, dtype=np.float32), np.asarray(add_ids, dtype=np.int64))
    final_ids = faiss.vector_to_array(dense.id_map).astype(np.int64)
    ids, texts, _ = _chunk_rows(collection_id, final_ids, with_vectors=False)
    bm25, bm25_ids = build_bm25(ids, texts)
    version = (manifest["version"] if manifest else 0) + 1
    return _write(collection_id, version, dense, bm25, bm25_ids)


def rebuild(collection_id):
    """A fresh index from every chunk of the collection in the database (holding the lock)."""
    from .embedding import dimension

    manifest = read_manifest(collection_id)
    ids, texts, vectors = _chunk_rows(collection_id)
    dense = new_dense(vectors.shape[1] if ids else dimension(), len(ids))
    if ids:
        dense.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    bm25, bm25_ids = build_bm25(ids, texts)
    version = (manifest["version"] if manifest else 0) + 1
    return _write(collection_id, version, dense, bm25, bm25_ids)


def drop(collection_id):
    with _cache_lock:
        _cache.pop(collection_id, None)
    shutil.rmtree(index_dir(collection_id), ignore_errors=True)
