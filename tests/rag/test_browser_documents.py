import os

import pytest

from rag.models import Collection, Document
from tests.browser import chromium_page
from tests.conftest import PASSWORD
from tests.rag.pdfs import make_pdf

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Playwright's sync API runs an event loop in this thread; Django's ORM is used only around it.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

MARKDOWN = b"# Glaciers\n\nGlaciers are rivers of ice. They carve U-shaped valleys and leave moraines behind.\n"


@pytest.fixture
def celery_worker():
    """A real Celery worker thread consuming from the test session's Redis."""
    from celery.contrib.testing.worker import start_worker

    from r3mes_site.celery import app

    app.control.purge()  # only this test's jobs: nothing another test left on the session's broker
    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=30) as worker:
        yield worker


def log_in(page, live_server, username):
    page.goto(live_server.url + "/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(live_server.url + "/")


def test_upload_a_pdf_and_a_markdown_file_and_watch_both_become_ready(live_server, alice, bob, celery_worker, tmp_path):
    pdf_path = tmp_path / "rocks.pdf"
    pdf_path.write_bytes(make_pdf(["Rocks, an introduction.", "Basalt is a dark volcanic rock formed from lava."]))
    md_path = tmp_path / "glaciers.md"
    md_path.write_bytes(MARKDOWN)
    bad_path = tmp_path / "archive.pdf"
    bad_path.write_bytes(b"PK\x03\x04 this is a zip, not a pdf")

    with chromium_page() as page:
        log_in(page, live_server, "alice")
        page.locator("nav").get_by_role("link", name="Documents").click()
        page.wait_for_url("**/documents/")
        page.fill("#id_name", "Earth science")
        page.select_option("#id_kind", "general")
        page.select_option("#id_visibility", "private")
        page.get_by_role("button", name="Create collection").click()
        page.wait_for_selector("#dropzone")

        page.set_input_files("#file-input", [str(pdf_path), str(md_path), str(bad_path)])
        page.wait_for_selector("tr.document-row:has-text('rocks.pdf')[data-status='ready']", timeout=120000)
        page.wait_for_selector("tr.document-row:has-text('glaciers.md')[data-status='ready']", timeout=120000)
        rejected = page.locator("tr.document-row:has-text('archive.pdf')")
        assert "ZIP archive" in rejected.inner_text()

        page.get_by_role("link", name="rocks.pdf").click()
        page.wait_for_selector("#page-2")
        assert "Basalt is a dark volcanic rock" in page.inner_text("#page-2")

    collection = Collection.objects.get(name="Earth science")
    assert sorted(collection.documents.values_list("original_name", "status", "pages")) == [
        ("glaciers.md", "ready", 1), ("rocks.pdf", "ready", 2)]
    assert Document.objects.count() == 2

    with chromium_page() as page:  # bob sees neither the collection nor its documents
        log_in(page, live_server, "bob")
        page.goto(live_server.url + "/documents/")
        assert "Earth science" not in page.content()
        document = collection.documents.get(original_name="rocks.pdf")
        response = page.goto(live_server.url + f"/documents/{document.pk}/")
        assert response.status == 404 and "Basalt" not in page.content()
