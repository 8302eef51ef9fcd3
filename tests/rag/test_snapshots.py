import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from rag import demo
from rag.models import Chunk, Collection, Document
from rag.retrieval import retrieve
from tests.rag.pdfs import make_pdf

pytestmark = pytest.mark.django_db


def test_export_then_import_on_another_node_gives_the_same_passages_and_search(collection, add_and_ingest, alice, bob, tmp_path, capsys, settings):
    add_and_ingest(collection, "geo.pdf", make_pdf(["Intro.", "Volcanoes erupt when magma pressure builds up."]))
    add_and_ingest(collection, "bees.txt", b"Honeybees dance to show where flowers are.")
    call_command("r3mes", "rag", "export", str(collection.pk), "--out", str(tmp_path))
    [path] = tmp_path.glob("*.r3mes-rag.tgz")
    assert "Exported collection alice notes (2 documents)" in capsys.readouterr().out

    call_command("r3mes", "rag", "export", str(collection.pk), "--out", str(tmp_path / "again"))
    assert [p.name for p in (tmp_path / "again").iterdir()] == [path.name]  # deterministic, content-addressed

    # "Another node": fresh index dir, bob imports.
    settings.INDEX_DIR = tmp_path / "node2-indexes"
    call_command("r3mes", "rag", "import", str(path), "--owner", "bob")
    assert "Imported 2 documents (3 passages)" in capsys.readouterr().out
    imported = Collection.objects.get(owner=bob)
    original = list(Chunk.objects.filter(document__collection=collection).values_list("text", "page", "vector"))
    copied = list(Chunk.objects.filter(document__collection=imported).values_list("text", "page", "vector"))
    assert [(t, p, bytes(v)) for t, p, v in copied] == [(t, p, bytes(v)) for t, p, v in original]
    [hit] = retrieve("magma eruption", bob, collections=[imported.pk], top_k=1)
    assert (hit.document_title, hit.page) == ("geo.pdf", 2)

    call_command("r3mes", "rag", "import", str(path), "--owner", "bob")  # again: nothing duplicated
    assert Document.objects.filter(collection=imported).count() == 2


def test_a_tampered_snapshot_is_refused(collection, add_and_ingest, tmp_path):
    add_and_ingest(collection, "bees.txt", b"Honeybees dance to show where flowers are.")
    call_command("r3mes", "rag", "export", str(collection.pk), "--out", str(tmp_path))
    [path] = tmp_path.glob("*.r3mes-rag.tgz")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CommandError, match="Hash mismatch"):
        call_command("r3mes", "rag", "import", str(path), "--owner", "alice")
    with pytest.raises(CommandError, match="not a snapshot name"):
        call_command("r3mes", "rag", "import", str(tmp_path / "x.tgz"), "--owner", "alice")
    with pytest.raises(CommandError, match="No collection"):
        call_command("r3mes", "rag", "export", "nope")


def test_demo_seeds_a_public_collection_once(django_user_model, alice, bob, capsys):
    django_user_model.objects.create_user("admin", password="x-Very-long-pass-1", is_staff=True)
    demo.seed(__import__("sys").stdout)
    demo.seed(__import__("sys").stdout)
    collection = Collection.objects.get(name=demo.COLLECTION)
    assert collection.visibility == "public" and collection.kind == "general"
    assert collection.documents.filter(status="ready").count() == 2 and Document.objects.count() == 2
    assert "2 ready documents" in capsys.readouterr().out
    assert retrieve("How are votes tallied?", bob, top_k=1)[0].document_title == "governance-and-mining.md"
