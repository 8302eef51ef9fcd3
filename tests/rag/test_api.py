import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from rag.models import Collection, Document

pytestmark = pytest.mark.django_db

TEXT = b"Tides are caused mainly by the gravitational pull of the Moon on the oceans."


def test_create_and_list_collections(api_client, alice, bob):
    response = api_client.post("/api/rag/collections", {"name": "Oceans", "kind": "general", "visibility": "private"},
                               content_type="application/json")
    assert response.status_code == 201
    created = Collection.objects.get(pk=response.json()["id"])
    assert (created.owner, created.kind, created.visibility) == (alice, "general", "private")
    response = api_client.post("/api/rag/collections", {"name": "Team", "kind": "legal", "visibility": "shared", "shared_with": ["bob"]},
                               content_type="application/json")
    assert response.status_code == 201 and list(Collection.objects.get(name="Team").shared_with.all()) == [bob]
    names = [c["name"] for c in api_client.get("/api/rag/collections").json()["data"]]
    assert names == ["Oceans", "Team"]


@pytest.mark.parametrize("body,param", [
    ({"name": "", "kind": "general", "visibility": "private"}, "name"),
    ({"name": "x", "kind": "poetry", "visibility": "private"}, "kind"),
    ({"name": "x", "kind": "general", "visibility": "everyone"}, "visibility"),
    ({"name": "x", "kind": "general", "visibility": "shared", "shared_with": ["nobody"]}, "shared_with"),
    ({"name": "x", "kind": "general", "visibility": "private", "news_ttl_days": 3}, "news_ttl_days"),
])
def test_bad_collection_bodies_get_a_400_naming_the_field(api_client, body, param):
    response = api_client.post("/api/rag/collections", body, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert not Collection.objects.exists()


def test_upload_is_ingested_and_its_status_reported(api_client, collection, eager_celery, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = api_client.post("/api/rag/documents", {"file": SimpleUploadedFile("tides.txt", TEXT), "collection": collection.pk})
    assert response.status_code == 202 and response.json()["status"] == "queued"
    status = api_client.get(f"/api/rag/documents/{response.json()['id']}").json()
    assert (status["status"], status["progress"], status["chunks"], status["error"]) == ("ready", 100, 1, None)

    again = api_client.post("/api/rag/documents", {"file": SimpleUploadedFile("copy.txt", TEXT), "collection": collection.pk})
    assert again.status_code == 200 and again.json() == {"id": response.json()["id"], "status": "ready", "duplicate": True}

    found = api_client.post("/api/rag/search", {"query": "what causes tides?", "top_k": 1}, content_type="application/json").json()
    assert found["data"][0]["document_title"] == "tides.txt"

    assert api_client.delete(f"/api/rag/documents/{response.json()['id']}").json()["deleted"] is True
    assert not Document.objects.exists()


def test_uploads_to_someone_elses_collection_are_refused(api_client, bob):
    private = Collection.objects.create(name="bob private", owner=bob)
    public = Collection.objects.create(name="bob public", owner=bob, visibility="public")
    response = api_client.post("/api/rag/documents", {"file": SimpleUploadedFile("t.txt", TEXT), "collection": private.pk})
    assert response.status_code == 404
    response = api_client.post("/api/rag/documents", {"file": SimpleUploadedFile("t.txt", TEXT), "collection": public.pk})
    assert response.status_code == 403 and "owner" in response.json()["error"]["message"]
    assert not Document.objects.exists()


def test_only_the_owner_deletes_a_document_of_a_public_collection(client, alice_token, bob, add_and_ingest):
    public = Collection.objects.create(name="bob public", owner=bob, visibility="public")
    document = add_and_ingest(public, "t.txt", TEXT)
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {alice_token}"
    assert client.get(f"/api/rag/documents/{document.pk}").json()["status"] == "ready"  # readable
    response = client.delete(f"/api/rag/documents/{document.pk}")
    assert response.status_code == 403 and Document.objects.filter(pk=document.pk).exists()


@pytest.mark.parametrize("body,param", [
    ({}, "query"),
    ({"query": "   "}, "query"),
    ({"query": "x", "top_k": 0}, "top_k"),
    ({"query": "x", "top_k": "5"}, "top_k"),
    ({"query": "x", "collections": "1"}, "collections"),
    ({"query": "x", "threshold": 2}, "threshold"),
])
def test_bad_search_bodies_get_a_400(api_client, body, param):
    response = api_client.post("/api/rag/search", body, content_type="application/json")
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_the_api_needs_a_bearer_token(client, collection):
    assert client.get("/api/rag/collections").status_code == 401
    assert client.post("/api/rag/search", {"query": "x"}, content_type="application/json").status_code == 401
    assert client.post("/api/rag/documents", {"file": SimpleUploadedFile("t.txt", TEXT), "collection": collection.pk}).status_code == 401


def test_upload_without_a_file_or_collection_is_a_clear_error(api_client, collection):
    assert api_client.post("/api/rag/documents", {"collection": collection.pk}).json()["error"]["param"] == "file"
    response = api_client.post("/api/rag/documents", {"file": SimpleUploadedFile("t.txt", TEXT)})
    assert response.status_code == 404 and response.json()["error"]["param"] == "collection"
