import pytest
from django.core.exceptions import PermissionDenied

from governance.models import ApiToken
from rag.embedding import embed_query
from rag.models import Collection
from rag.retrieval import RRF_K, reciprocal_rank_fusion, retrieve
from tests.rag.pdfs import make_pdf

pytestmark = pytest.mark.django_db

SECRET = "The launch code for project Nightjar is 7741-ALPHA. Only alice may know the Nightjar code."
PUBLIC = "Honeybees communicate the direction of flowers with a waggle dance inside the hive."


def test_reciprocal_rank_fusion_adds_one_over_k_plus_rank():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "a"]])
    assert fused == pytest.approx({"a": 1 / 61 + 1 / 62, "b": 1 / 62, "c": 1 / 63 + 1 / 61})
    assert RRF_K == 60
    assert max(fused, key=fused.get) == "a"


def test_hybrid_finds_exact_terms_and_paraphrases_and_reports_scores(collection, add_and_ingest, alice):
    add_and_ingest(collection, "bees.txt", PUBLIC.encode())
    add_and_ingest(collection, "codes.txt", b"Part number XQ-5531 fits the left hinge of the cabinet door.")
    add_and_ingest(collection, "geo.pdf", make_pdf(["Intro page.", "Volcanoes erupt when magma pressure builds up."]))

    [first, *_] = retrieve("XQ-5531", alice, top_k=3)  # an exact token: BM25's strength
    assert first.document_title == "codes.txt" and first.bm25_score > 0
    [first, *_] = retrieve("How do bees tell each other where food is?", alice, top_k=3)  # paraphrase: dense
    assert first.document_title == "bees.txt" and first.dense_score > 0.3
    [first, *_] = retrieve("eruption of a volcano", alice, top_k=1)
    assert (first.document_title, first.page) == ("geo.pdf", 2)
    assert first.url.endswith(f"/documents/{first.document_id}/#page-2")
    assert first.snippet and first.text and first.collection == collection.name

    results = retrieve("honeybee waggle dance", alice, top_k=3)
    assert results == sorted(results, key=lambda r: -r.fused_score)
    assert results[0].fused_score == pytest.approx(2 / (RRF_K + 1), abs=1e-6)  # first in both lists


def test_threshold_drops_weak_passages(collection, add_and_ingest, alice):
    add_and_ingest(collection, "bees.txt", PUBLIC.encode())
    query = "bees dance"
    assert retrieve(query, alice, query_vector=embed_query(query)) == retrieve(query, alice)
    assert retrieve("bees dance", alice, threshold=0.2)
    assert retrieve("quarterly tax filing deadlines", alice, threshold=0.5) == []


@pytest.fixture
def secret(collection, add_and_ingest, public_collection):
    add_and_ingest(public_collection, "bees.txt", PUBLIC.encode())
    return add_and_ingest(collection, "nightjar.txt", SECRET.encode())


@pytest.fixture
def bob_client(client, bob):
    client.force_login(bob)
    _, raw = ApiToken.issue(bob, "tests")
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {raw}"
    return client


def test_another_user_never_sees_a_private_collection_anywhere(secret, bob, bob_client, collection):
    document = secret
    # Search, with and without naming the collection.
    assert all("Nightjar" not in r.text for r in retrieve("Nightjar launch code", bob, top_k=10))
    with pytest.raises(PermissionDenied):
        retrieve("Nightjar", bob, collections=[collection.pk])
    response = bob_client.post("/api/rag/search", {"query": "Nightjar launch code 7741"}, content_type="application/json")
    assert response.status_code == 200
    assert response.json()["data"] and all(r["document_title"] == "bees.txt" for r in response.json()["data"])
    assert "7741-ALPHA" not in response.content.decode()
    response = bob_client.post("/api/rag/search", {"query": "Nightjar", "collections": [collection.pk]}, content_type="application/json")
    assert response.status_code == 404 and "Nightjar" not in response.content.decode()
    # Pages.
    for url in (f"/documents/{document.pk}/", f"/documents/{document.pk}/status", f"/documents/?collection={collection.pk}"):
        response = bob_client.get(url)
        assert response.status_code == 404 and b"Nightjar" not in response.content, url
    page = bob_client.get("/documents/").content.decode()
    assert "alice notes" not in page and "nightjar" not in page.lower()
    assert bob_client.post(f"/documents/{document.pk}/delete").status_code == 404
    # API.
    assert bob_client.get(f"/api/rag/documents/{document.pk}").status_code == 404
    assert bob_client.delete(f"/api/rag/documents/{document.pk}").status_code == 404
    listed = bob_client.get("/api/rag/collections").json()["data"]
    assert [c["name"] for c in listed] == ["bob public"]
    assert document.__class__.objects.filter(pk=document.pk).exists()


def test_a_shared_collection_is_readable_by_the_named_user_only(secret, collection, bob, django_user_model):
    carol = django_user_model.objects.create_user("carol", password="x-Very-long-pass-1")
    collection.visibility = Collection.Visibility.SHARED
    collection.save()
    collection.shared_with.add(bob)
    assert "Nightjar" in retrieve("Nightjar launch code", bob)[0].text
    assert all("Nightjar" not in r.text for r in retrieve("Nightjar launch code", carol))
    assert not collection.can_write(bob)


def test_bm25_search_matches_bm25s_retrieve(collection, add_and_ingest, alice):
    from pathlib import Path

    from rag import index

    documents = Path(__file__).resolve().parents[1] / "data" / "rag" / "documents"
    for name in ("beekeeping.md", "volcanoes.md", "tea.md"):
        add_and_ingest(collection, name, (documents / name).read_bytes())
    loaded = index.load(collection.pk)
    for query in ("queen eggs a day", "silica magma explosive eruptions", "green tea oxidation", "bees bees honey"):
        known = [t for t in index.bm25_tokens(query) if t in loaded.bm25.vocab_dict]
        docs, scores = loaded.bm25.retrieve([known], k=len(loaded.bm25_ids), show_progress=False, n_threads=0)
        expected = [(int(loaded.bm25_ids[d]), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]
        got = loaded.bm25_search(query, len(loaded.bm25_ids))
        assert got and [s for _, s in got] == pytest.approx([s for _, s in expected])
        assert {i for i, _ in got} == {i for i, _ in expected}
        assert loaded.bm25_search(query, 1) == got[:1]


def test_query_embeddings_are_cached_read_only():
    from rag.embedding import embed

    first = embed_query("How hot are pyroclastic flows?")
    assert embed_query("How hot are pyroclastic flows?") is first and not first.flags.writeable
    assert first == pytest.approx(embed(["How hot are pyroclastic flows?"])[0], abs=1e-6)
