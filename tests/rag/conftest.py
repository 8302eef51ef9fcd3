import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from rag import actions
from rag.models import Collection


@pytest.fixture
def collection(alice):
    return Collection.objects.create(name="alice notes", owner=alice, kind=Collection.Kind.USER)


@pytest.fixture
def public_collection(bob):
    return Collection.objects.create(name="bob public", owner=bob, kind=Collection.Kind.GENERAL,
                                     visibility=Collection.Visibility.PUBLIC)


@pytest.fixture
def add_and_ingest():
    """Stores a file in a collection and runs the ingestion job on it, as the Celery task would."""

    def run(collection, name, data, user=None):
        document, created = actions.add_document(collection, user or collection.owner, SimpleUploadedFile(name, data), enqueue=False)
        if created:
            actions.ingest(document.pk)
        document.refresh_from_db()
        return document

    return run


@pytest.fixture
def eager_celery():
    """Runs Celery tasks in-process (the upload API enqueues ingestion on commit)."""
    from r3mes_site.celery import app

    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield app
    app.conf.task_always_eager = previous


@pytest.fixture(autouse=True)
def private_storage(settings, tmp_path):
    """Each test gets its own index and blob directories: SQLite reuses primary keys after a
    rollback, so a shared INDEX_DIR would show one test another test's collection index."""
    settings.INDEX_DIR = tmp_path / "indexes"
    settings.BLOB_DIR = tmp_path / "blobs"
