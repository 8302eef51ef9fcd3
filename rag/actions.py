"""Work that spans documents, chunks, stored files and indexes: upload, ingest, delete, expire."""

import hashlib
import logging
import os
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, transaction
from django.utils import timezone

from r3mes_site import metrics

from . import index
from .chunking import chunk_pages
from .embedding import embed, get_tokenizer
from .extract import ExtractionError, check, extract_pages
from .models import Chunk, Document

log = logging.getLogger(__name__)


class UploadError(Exception):
    """An upload refused before anything is stored; `status` is the HTTP status to answer with."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def _store_blob(path, data):
    """Content-addressed, so an existing file is already the right bytes; written under a temporary
    name and renamed, so a crash never leaves half a file under the final name."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove_blob_if_unused(sha256, path):
    if not Document.objects.filter(sha256=sha256).exists():
        path.unlink(missing_ok=True)


def enqueue_ingestion(document_id):
    from .tasks import ingest_document

    ingest_document.delay(document_id)


def add_document(collection, user, uploaded, enqueue=True):
    """Validates and stores an uploaded file as a queued document of `collection`; returns
    (document, created). The same bytes already in the collection give back that document.
    With enqueue=False the caller ingests it (demo data, tests)."""
    if not collection.can_write(user):
        raise PermissionDenied("Only the owner of this collection can add documents to it")
    limit = settings.R3MES_MAX_UPLOAD_BYTES
    if uploaded.size > limit:
        raise UploadError(413, f"The file is {uploaded.size} bytes; the limit is {limit} bytes")
    data = uploaded.read()
    if len(data) > limit:
        raise UploadError(413, f"The file is over the limit of {limit} bytes")
    try:
        content_type = check(data)
    except ExtractionError as exc:
        raise UploadError(422, f"{uploaded.name}: {exc}") from None
    sha256 = hashlib.sha256(data).hexdigest()
    existing = collection.documents.filter(sha256=sha256).first()
    if existing is not None:
        return existing, False
    document = Document(
        collection=collection, original_name=os.path.basename(uploaded.name or "upload")[:255] or "upload",
        content_type=content_type, size=len(data), sha256=sha256, uploaded_by=user,
        expires=collection.expiry_for_new_document(),
    )
    _store_blob(document.blob_path, data)
    try:
        with transaction.atomic():
            document.save()
            if enqueue:
                transaction.on_commit(lambda: enqueue_ingestion(document.pk))
    except IntegrityError:
        # Another request stored the same file in this collection a moment ago.
        existing = collection.documents.filter(sha256=sha256).first()
        if existing is None:
            _remove_blob_if_unused(sha256, document.blob_path)
            raise
        return existing, False
    return document, True


def ingest(document_id):
    """Extract → chunk → embed → index one queued document; ends ready or failed with a reason.

    Returns the outcome: "ready", "failed", or "skipped" when another worker holds (or finished)
    the job. Chunks of an earlier attempt that crashed are replaced, never duplicated."""
    document = Document.objects.select_related("collection").filter(pk=document_id).first()
    if document is None or not document.claim():
        return "skipped"
    try:
        data = document.blob_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != document.sha256:
            raise ExtractionError("The stored file does not match its SHA-256; upload it again")
        pages = extract_pages(data, document.content_type)
        document.set_progress(10)
        spans = chunk_pages(pages, get_tokenizer(), settings.R3MES_RAG_CHUNK_TOKENS, settings.R3MES_RAG_CHUNK_OVERLAP)
        if not spans:
            raise ExtractionError("The document contains no text to index")
        document.set_progress(15)
        # Embedding is the slow part: it moves the bar from 15 to 90 per batch.
        vectors = embed([span.text for span in spans], on_batch=lambda done, total: document.set_progress(15 + 75 * done // total))
        with index.lock(document.collection_id):
            if not Document.objects.filter(pk=document.pk, status=Document.Status.PROCESSING).exists():
                return "skipped"  # deleted (or failed by recovery) while we were embedding
            stale_ids = list(document.chunks.values_list("id", flat=True))
            with transaction.atomic():
                document.chunks.all().delete()
                chunks = Chunk.objects.bulk_create(
                    Chunk(document=document, ordinal=span.ordinal, text=span.text, page=span.page,
                          char_start=span.start, char_end=span.end, tokens=span.tokens, vector=vector.tobytes())
                    for span, vector in zip(spans, vectors)
                )
            document.set_progress(95)
            index.update(document.collection_id, [chunk.pk for chunk in chunks], vectors, remove_ids=stale_ids)
            document.mark_ready(pages=len(pages), chunk_count=len(chunks))
    except ExtractionError as exc:
        document.mark_failed(str(exc))
        metrics.jobs.labels("rag_ingest", "failed").inc()
        return "failed"
    except Exception as exc:
        # Whatever broke, the document must not stay "processing": record why and keep the trace.
        log.exception("ingestion of document %s failed", document.pk)
        document.mark_failed(f"Ingestion failed: {type(exc).__name__}: {exc}")
        metrics.jobs.labels("rag_ingest", "failed").inc()
        return "failed"
    metrics.jobs.labels("rag_ingest", "ready").inc()
    return "ready"


def reingest(document):
    """Queues a document for ingestion again (admin action, or after a failure was fixed)."""
    if document.requeue():
        transaction.on_commit(lambda: enqueue_ingestion(document.pk))
        return True
    return False


def delete_document(document):
    """Removes the document, its chunks, its vectors from the collection index, and its stored
    file when no other document shares the bytes."""
    collection_id = document.collection_id
    with index.lock(collection_id):
        chunk_ids = list(document.chunks.values_list("id", flat=True))
        with transaction.atomic():
            document.delete()
        if chunk_ids and index.read_manifest(collection_id) is not None:
            index.update(collection_id, remove_ids=chunk_ids)
    _remove_blob_if_unused(document.sha256, document.blob_path)


def delete_collection(collection):
    shas = list(collection.documents.values_list("sha256", flat=True))
    collection_id = collection.pk
    with index.lock(collection_id):
        with transaction.atomic():
            collection.delete()
    index.drop(collection_id)
    for sha in shas:
        _remove_blob_if_unused(sha, settings.BLOB_DIR / "rag" / sha[:2] / sha)


def purge_expired(now=None):
    """Deletes expired news documents (they already drop out of retrieval when they expire)."""
    now = now or timezone.now()
    expired = list(Document.objects.filter(expires__lte=now))
    for document in expired:
        delete_document(document)
    return len(expired)


def recover_stale(now=None):
    """Documents whose worker vanished: "processing" with no progress for R3MES_RAG_STALE_SECONDS
    are re-queued (or failed after R3MES_RAG_MAX_ATTEMPTS); "queued" ones that no worker picked up
    (a lost broker message) are sent again. Returns (requeued, failed)."""
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.R3MES_RAG_STALE_SECONDS)
    requeued = failed = 0
    for document in Document.objects.filter(status=Document.Status.PROCESSING, updated__lt=cutoff):
        if document.attempts >= settings.R3MES_RAG_MAX_ATTEMPTS:
            if document.mark_failed(f"Ingestion did not finish after {document.attempts} attempts (worker lost)"):
                failed += 1
        elif Document.objects.filter(pk=document.pk, status=Document.Status.PROCESSING, updated__lt=cutoff).update(
            status=Document.Status.QUEUED, progress=0, updated=timezone.now()
        ):
            enqueue_ingestion(document.pk)
            requeued += 1
    for document_id in Document.objects.filter(status=Document.Status.QUEUED, updated__lt=cutoff).values_list("id", flat=True):
        if Document.objects.filter(pk=document_id, status=Document.Status.QUEUED).update(updated=timezone.now()):
            enqueue_ingestion(document_id)
            requeued += 1
    return requeued, failed
