import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from rag.models import Collection, Document
from tests.rag.pdfs import make_pdf

pytestmark = pytest.mark.django_db


def test_create_a_collection_from_the_documents_page(alice_client, alice):
    page = alice_client.get("/documents/")
    assert page.status_code == 200 and "New collection" in page.content.decode()
    response = alice_client.post("/documents/", {"name": "Law", "kind": "legal", "visibility": "private"})
    collection = Collection.objects.get(name="Law", owner=alice)
    assert response.status_code == 302 and response["Location"].endswith(f"?collection={collection.pk}")
    page = alice_client.get(response["Location"]).content.decode()
    assert 'id="dropzone"' in page and "Law" in page


def test_the_form_shows_errors(alice_client, collection):
    response = alice_client.post("/documents/", {"name": collection.name, "kind": "user", "visibility": "private"})
    assert response.status_code == 200 and "already have a collection" in response.content.decode()


def test_upload_returns_a_polling_row_that_turns_ready(alice_client, collection):
    response = alice_client.post(f"/documents/collections/{collection.pk}/upload",
                                 {"file": SimpleUploadedFile("g.pdf", make_pdf(["One.", "Two pages of rocks."]))})
    assert response.status_code == 201
    html = response.content.decode()
    document = Document.objects.get()
    assert f'hx-get="/documents/{document.pk}/status"' in html and 'data-status="queued"' in html and "<progress" in html

    from rag import actions
    actions.ingest(document.pk)
    html = alice_client.get(f"/documents/{document.pk}/status").content.decode()
    assert 'data-status="ready"' in html and "hx-get" not in html  # polling stops when finished

    detail = alice_client.get(f"/documents/{document.pk}/").content.decode()
    assert 'id="page-2"' in detail and "Two pages of rocks." in detail


def test_a_refused_upload_shows_the_reason_in_its_row(alice_client, collection):
    response = alice_client.post(f"/documents/collections/{collection.pk}/upload",
                                 {"file": SimpleUploadedFile("evil.pdf", b"PK\x03\x04zipzipzip")})
    assert response.status_code == 422
    assert "ZIP archive" in response.content.decode() and 'data-status="rejected"' in response.content.decode()


def test_upload_needs_csrf_and_login(client, collection, alice):
    assert client.post(f"/documents/collections/{collection.pk}/upload").status_code == 302  # to the login page
    csrf_client = client.__class__(enforce_csrf_checks=True)
    csrf_client.force_login(alice)
    response = csrf_client.post(f"/documents/collections/{collection.pk}/upload", {"file": SimpleUploadedFile("a.txt", b"hi there")})
    assert response.status_code == 403 and not Document.objects.exists()


def test_delete_from_the_page(alice_client, collection, add_and_ingest):
    document = add_and_ingest(collection, "a.txt", b"Some words about trees.")
    response = alice_client.post(f"/documents/{document.pk}/delete", HTTP_HX_REQUEST="true")
    assert response.status_code == 200 and not Document.objects.exists()


def test_the_playground_uses_documents_by_default_once_the_user_has_ready_ones(alice_client, bob, collection,
                                                                               add_and_ingest):
    def rag_checked():
        html = alice_client.get("/playground/").content.decode()
        return 'name="rag" checked' in html

    assert not rag_checked()
    public = Collection.objects.create(name="bob's", owner=bob, visibility=Collection.Visibility.PUBLIC)
    add_and_ingest(public, "bees.txt", b"Bees dance to show where flowers are.")
    assert not rag_checked()  # someone else's public documents do not switch it on
    add_and_ingest(collection, "rocks.txt", b"Basalt is a dark volcanic rock.")
    assert rag_checked()
