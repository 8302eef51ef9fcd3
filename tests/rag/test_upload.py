import io
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from rag.extract import ExtractionError, check, extract_pages
from rag.models import Chunk, Document
from tests.rag.pdfs import encrypt_pdf, make_pdf

pytestmark = pytest.mark.django_db


def zip_bytes():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("secret.txt", "hello")
    return buffer.getvalue()


BAD_FILES = [
    ("empty.txt", b"", 422, "The file is empty"),
    ("binary.txt", b"\x00\x01\x02\x03ELF-ish binary\x00\x00", 422, "binary data"),
    ("latin1.txt", "Ça coûte très cher".encode("latin-1"), 422, "not valid UTF-8"),
    ("locked.pdf", encrypt_pdf(make_pdf(["Top secret page."])), 422, "encrypted"),
    ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage without xref", 422, "PDF"),
    ("archive.pdf", zip_bytes(), 422, "ZIP archive"),
    ("photo.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", 422, "binary"),
]


@pytest.mark.parametrize("name,data,status,message", BAD_FILES, ids=[f[0] for f in BAD_FILES])
def test_bad_files_are_refused_with_a_clear_error_and_nothing_stored(api_client, collection, settings, name, data, status, message):
    response = api_client.post("/api/rag/documents", {"file": SimpleUploadedFile(name, data), "collection": collection.pk})
    assert response.status_code == status, response.content
    assert message in response.json()["error"]["message"]
    assert not Document.objects.exists()
    assert not (settings.BLOB_DIR / "rag").exists() or not any((settings.BLOB_DIR / "rag").rglob("*"))


def test_files_over_the_size_limit_are_refused(api_client, collection, settings):
    settings.R3MES_MAX_UPLOAD_BYTES = 100
    response = api_client.post("/api/rag/documents", {"file": SimpleUploadedFile("big.txt", b"a " * 60), "collection": collection.pk})
    assert response.status_code == 413
    assert "limit is 100 bytes" in response.json()["error"]["message"]
    assert not Document.objects.exists()


def test_an_oversized_request_is_refused_before_it_is_read(api_client, collection, settings):
    settings.R3MES_MAX_UPLOAD_BYTES = 1000
    response = api_client.post("/api/rag/documents", {"file": SimpleUploadedFile("big.txt", b"word " * 40000), "collection": collection.pk})
    assert response.status_code == 413 and "limit is 1000 bytes" in response.json()["error"]["message"]
    assert not Document.objects.exists()


def test_the_type_comes_from_the_content_not_the_name():
    assert check(b"# Title\n\nSome *markdown* text.\n") == "text/markdown"
    assert check(b"plain words, nothing else\n") == "text/plain"
    assert check(b"<!DOCTYPE html><html><body><p>hi</p></body></html>") == "text/html"
    assert check(make_pdf(["a page"])) == "application/pdf"
    with pytest.raises(ExtractionError, match="ZIP"):
        check(zip_bytes())


def test_html_scripts_and_styles_are_stripped_from_the_text():
    html = (b"<html><head><title>T</title><style>body{color:red}</style><script>steal(document.cookie)</script></head>"
            b"<body><h1>Rivers</h1><p>Water flows <b>downhill</b>.</p><script>alert(1)</script><noscript>x</noscript></body></html>")
    [text] = extract_pages(html, check(html))
    assert text == "Rivers\n\nWater flows downhill."
    assert "steal" not in text and "alert" not in text and "color" not in text


def test_html_with_scripts_is_ingested_without_the_script(collection, add_and_ingest):
    document = add_and_ingest(collection, "page.html",
                              b"<html><body><p>Glaciers carve fjords.</p><script>var evil = 'payload';</script></body></html>")
    assert document.status == "ready"
    assert [c.text for c in Chunk.objects.filter(document=document)] == ["Glaciers carve fjords."]


def test_a_utf8_bom_is_accepted():
    assert extract_pages(b"\xef\xbb\xbfhello world", "text/plain") == ["hello world"]


def test_a_pdf_without_text_fails_at_ingestion_with_the_reason(collection, add_and_ingest):
    # The upload check only opens PDFs (cheap); reading the text is the ingestion job's work.
    document = add_and_ingest(collection, "scan.pdf", make_pdf([""]))
    assert document.status == "failed" and "no extractable text" in document.error
    assert not Chunk.objects.exists()
