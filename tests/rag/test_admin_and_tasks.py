from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from rag import index
from rag.models import Chunk, Collection, Document
from rag.tasks import ingest_document, purge_expired_documents, recover_stale_documents

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("root", "root@example.org", "x-Very-long-pass-1")
    client.force_login(admin)
    return client


def test_admin_lists_documents_by_status_and_reingests_and_purges(staff_client, collection, add_and_ingest, eager_celery,
                                                                   django_capture_on_commit_callbacks):
    document = add_and_ingest(collection, "a.txt", b"Granite is an igneous rock with large crystals.")
    page = staff_client.get("/admin/rag/document/?status__exact=ready")
    assert page.status_code == 200 and "a.txt" in page.content.decode()
    assert "a.txt" not in staff_client.get("/admin/rag/document/?status__exact=failed").content.decode()

    with django_capture_on_commit_callbacks(execute=True):
        staff_client.post("/admin/rag/document/", {"action": "reingest", "_selected_action": [document.pk]})
    document.refresh_from_db()
    assert document.status == "ready" and document.attempts == 2 and Chunk.objects.count() == 1
    assert set(index.load(collection.pk).chunk_ids().tolist()) == set(document.chunks.values_list("id", flat=True))

    staff_client.post("/admin/rag/document/", {"action": "purge", "_selected_action": [document.pk]})
    assert not Document.objects.exists() and index.load(collection.pk).size == 0


def test_beat_tasks_are_scheduled_and_do_their_work(collection, add_and_ingest, alice):
    tasks = {entry["task"] for entry in django_settings.CELERY_BEAT_SCHEDULE.values()}
    assert {"rag.tasks.purge_expired_documents", "rag.tasks.recover_stale_documents"} <= tasks

    news = Collection.objects.create(name="news", owner=alice, kind="news")
    document = add_and_ingest(news, "n.txt", b"Breaking: a new comet was seen tonight.")
    assert document.expires is not None
    Document.objects.filter(pk=document.pk).update(expires=timezone.now() - timedelta(minutes=1))
    assert purge_expired_documents() == 1 and not Document.objects.exists()
    assert recover_stale_documents() == {"requeued": 0, "failed": 0}
    assert ingest_document(12345) == "skipped"  # a job for a deleted document does nothing
