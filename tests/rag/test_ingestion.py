from datetime import timedelta

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils import timezone

from rag import actions, index
from rag.models import Chunk, Collection, Document
from rag.retrieval import retrieve
from tests.rag.pdfs import make_pdf

pytestmark = pytest.mark.django_db

ENZYMES = (
    "# Enzymes\n\nEnzymes are proteins that speed up chemical reactions in living cells. "
    "Each enzyme binds a substrate at its active site. Temperature and pH change how fast they work.\n"
)
VOLCANO = "Volcanoes form where magma rises through the crust. Basalt lava flows far; rhyolite lava is sticky."


def index_ids(collection):
    loaded = index.load(collection.pk)
    return set(loaded.chunk_ids().tolist()) if loaded else set()


def test_markdown_and_pdf_are_ingested_with_pages_chunks_and_vectors(collection, add_and_ingest):
    md = add_and_ingest(collection, "enzymes.md", ENZYMES.encode())
    pdf = add_and_ingest(collection, "geo.pdf", make_pdf(["Chapter one is about rivers.", VOLCANO]))

    assert (md.status, md.progress, md.content_type, md.pages) == ("ready", 100, "text/markdown", 1)
    assert (pdf.status, pdf.content_type, pdf.pages) == ("ready", "application/pdf", 2)
    assert pdf.chunk_count == 2 and md.chunk_count == 1
    assert [c.page for c in pdf.chunks.all()] == [1, 2]
    vector = md.chunks.get().embedding()
    assert vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    assert index_ids(collection) == set(Chunk.objects.values_list("id", flat=True))
    assert index.load(collection.pk).kind == "flat"


def test_the_same_file_is_stored_once_per_collection(collection, add_and_ingest, alice):
    first = add_and_ingest(collection, "a.md", ENZYMES.encode())
    again, created = actions.add_document(collection, alice, SimpleUploadedFile("renamed.txt", ENZYMES.encode()))
    assert not created and again.pk == first.pk
    assert Document.objects.count() == 1 and Chunk.objects.count() == 1
    other = Collection.objects.create(name="second", owner=alice)
    assert add_and_ingest(other, "a.md", ENZYMES.encode()).pk != first.pk  # other collection: allowed


def test_a_retried_job_after_success_changes_nothing(collection, add_and_ingest):
    document = add_and_ingest(collection, "a.md", ENZYMES.encode())
    assert actions.ingest(document.pk) == "skipped"
    assert Chunk.objects.filter(document=document).count() == document.chunk_count == 1


def test_a_crashed_attempt_is_requeued_and_never_leaves_duplicate_chunks(collection, alice, settings, eager_celery):
    document, _ = actions.add_document(collection, alice, SimpleUploadedFile("v.txt", VOLCANO.encode()), enqueue=False)
    # The first attempt claims the job, writes its chunks and vectors, then the worker dies before
    # marking the document ready (simulated by running the steps and stopping there).
    assert document.claim()
    Chunk.objects.create(document=document, ordinal=0, text="partial", page=1, char_start=0, char_end=7,
                         vector=np.ones(384, dtype=np.float32).tobytes())
    with index.lock(collection.pk):
        index.update(collection.pk, [Chunk.objects.get().pk], np.ones((1, 384), dtype=np.float32))
    Document.objects.filter(pk=document.pk).update(updated=timezone.now() - timedelta(hours=2))

    # Beat's recovery re-queues it; the (eager) Celery task ingests it again.
    settings.R3MES_RAG_STALE_SECONDS = 60
    assert actions.recover_stale() == (1, 0)

    document.refresh_from_db()
    assert document.status == "ready" and document.attempts == 2
    texts = list(document.chunks.values_list("text", flat=True))
    assert texts == [VOLCANO]  # the partial chunk is gone, nothing duplicated
    assert index_ids(collection) == set(document.chunks.values_list("id", flat=True))


def test_a_document_stuck_processing_too_often_is_failed_with_a_reason(collection, alice, settings):
    settings.R3MES_RAG_MAX_ATTEMPTS = 1
    document, _ = actions.add_document(collection, alice, SimpleUploadedFile("v.txt", VOLCANO.encode()), enqueue=False)
    assert document.claim()
    Document.objects.filter(pk=document.pk).update(updated=timezone.now() - timedelta(hours=2))
    assert actions.recover_stale() == (0, 1)
    document.refresh_from_db()
    assert document.status == "failed" and "did not finish after 1 attempts" in document.error


def test_only_one_worker_claims_a_document(collection, alice):
    document, _ = actions.add_document(collection, alice, SimpleUploadedFile("v.txt", VOLCANO.encode()), enqueue=False)
    assert document.claim()
    assert not Document.objects.get(pk=document.pk).claim()
    assert actions.ingest(document.pk) == "skipped"


def test_a_missing_stored_file_fails_the_job_instead_of_leaving_it_processing(collection, alice):
    document, _ = actions.add_document(collection, alice, SimpleUploadedFile("v.txt", VOLCANO.encode()), enqueue=False)
    document.blob_path.unlink()
    assert actions.ingest(document.pk) == "failed"
    document.refresh_from_db()
    assert document.status == "failed" and "No such file" in document.error


def test_deleting_a_document_removes_its_chunks_vectors_and_file(collection, add_and_ingest, alice):
    keep = add_and_ingest(collection, "e.md", ENZYMES.encode())
    gone = add_and_ingest(collection, "v.txt", VOLCANO.encode())
    gone_ids = set(gone.chunks.values_list("id", flat=True))
    blob = gone.blob_path
    actions.delete_document(gone)
    assert not Chunk.objects.filter(id__in=gone_ids).exists() and not blob.exists()
    assert index_ids(collection) == set(keep.chunks.values_list("id", flat=True))
    assert all(r.document_id == keep.pk for r in retrieve("basalt lava volcano", alice, top_k=5))


def test_expired_news_drops_out_of_retrieval_at_once_and_is_purged(alice, add_and_ingest):
    news = Collection.objects.create(name="news", owner=alice, kind=Collection.Kind.NEWS, news_ttl_days=2)
    document = add_and_ingest(news, "today.txt", VOLCANO.encode())
    assert document.expires is not None and document.expires > timezone.now() + timedelta(days=1)
    assert retrieve("volcano magma", alice)

    Document.objects.filter(pk=document.pk).update(expires=timezone.now() - timedelta(seconds=1))
    assert retrieve("volcano magma", alice) == []  # before any purge
    assert actions.purge_expired() == 1
    assert not Document.objects.exists() and index_ids(news) == set()


def test_a_large_collection_switches_to_hnsw_and_still_deletes(collection, add_and_ingest, settings, alice):
    settings.R3MES_RAG_HNSW_THRESHOLD = 2
    first = add_and_ingest(collection, "e.md", ENZYMES.encode())
    second = add_and_ingest(collection, "g.pdf", make_pdf(["Rivers carve valleys.", VOLCANO]))
    assert index.load(collection.pk).kind == "hnsw"
    actions.delete_document(first)
    assert index_ids(collection) == set(second.chunks.values_list("id", flat=True))
    assert retrieve("basalt lava", alice)[0].document_id == second.pk


def test_index_versions_advance_and_old_ones_are_cleaned(collection, add_and_ingest):
    for i in range(4):
        add_and_ingest(collection, f"{i}.txt", f"Note number {i} about topic {i}.".encode())
    manifest = index.read_manifest(collection.pk)
    assert manifest["version"] == 4 and manifest["size"] == 4
    names = sorted(p.name for p in index.index_dir(collection.pk).iterdir() if not p.name.startswith("."))
    assert names == ["bm25-3", "bm25-4", "faiss-3.index", "faiss-4.index", "manifest.json"]
