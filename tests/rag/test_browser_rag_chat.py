"""Issue 6's "done when", end to end in Debian's chromium against a live stack: Daphne serving the
real ASGI app, a real Celery worker process ingesting uploads (MiniLM, FAISS, BM25), and the real
inference worker process with SmolLM2-135M answering at temperature 0.

Alice uploads a PDF and a Markdown file on the documents page, watches both become ready, asks
the playground a question whose answer is only in the PDF, and gets an answer that cites the PDF
with a link to the right page. Bob, with a public collection of his own, cannot reach her private
collection's documents or passages through any page, the search API or chat: his answer cites
nothing of hers and his prompt held none of her passages (the worker reports the chunk ids it put
in the prompt as `retrieved_chunks`)."""

import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import types

import pytest
import requests

from tests.browser import chromium_page
from tests.inference.live import PYTHON, REPO, WorkerProcess, http_ping, stack_env, start_daphne
from tests.rag.pdfs import make_pdf
from tests.services import free_port

pytestmark = pytest.mark.browser

PASSWORD = "correct-horse-battery-9"
# The answer exists only in this PDF, on page 2: the model cannot know it otherwise.
PDF_PAGES = [
    "Field notes from the northern valleys, 2024.\nCompiled by the regional survey office.",
    "Dunmere is a small village in the northern valleys.\n"
    "In Dunmere every roof is painted bright orange, a rule kept since 1852.\n"
    "The village bakery opens at six in the morning.",
]
QUESTION = "What colour are the roofs in Dunmere?"
ANSWER_WORDS = "bright orange"
MARKDOWN = b"# Glaciers\n\nGlaciers are rivers of ice. They carve U-shaped valleys and leave moraines behind.\n"
# On a neighbouring topic, so that retrieval for Bob's roof question really finds his passage.
BOB_TEXT = b"Bob's garden notes: the shed roof is covered in moss, and tomatoes need full sun every morning.\n"


def manage(env, *args):
    return subprocess.run([PYTHON, "manage.py", *args], cwd=REPO, env=env, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture(scope="module")
def rag_stack():
    """Daphne + Celery worker + inference worker on one throw-away data dir and database, on
    channel-layer/broker Redis db 2 (the session's other stacks use 0 and 1)."""
    data_dir = tempfile.mkdtemp(prefix="r3mes-ragchat-")
    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/2"
    env = stack_env(data_dir, redis_url, R3MES_MAX_SEQ_LEN=1024, R3MES_STREAM_IDLE_TIMEOUT=20)
    subprocess.run(["redis-cli", "-u", redis_url, "flushdb"], check=False, capture_output=True)
    port = free_port()
    daphne = start_daphne(env, port, os.path.join(data_dir, "daphne.log"))
    worker = WorkerProcess(env, os.path.join(data_dir, "worker.log")).start()
    celery_log = open(os.path.join(data_dir, "celery.log"), "ab")
    celery = subprocess.Popen([os.path.join(os.path.dirname(PYTHON), "celery"), "-A", "r3mes_site", "worker",
                               "--pool", "solo", "--loglevel", "INFO", "--hostname", f"ragchat-{port}@%h"],
                              cwd=REPO, env=env, stdout=celery_log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        tokens = {}
        for name, stake in (("alice", "1000"), ("bob", "600")):
            out = manage(env, "r3mes", "user", "add", name, "--password", PASSWORD, "--stake", stake, "--token")
            tokens[name] = out.split()[-1]
        worker.wait_ready(http_ping(url))
        yield types.SimpleNamespace(url=url, tokens=tokens, db=os.path.join(data_dir, "r3mes.sqlite3"),
                                    data_dir=data_dir, env=env)
    finally:
        celery.terminate()
        try:
            celery.wait(30)
        except subprocess.TimeoutExpired:
            celery.kill()
        worker.terminate()
        daphne.terminate()
        daphne.wait(10)
        if not os.environ.get("R3MES_KEEP_TEST_LOGS"):
            shutil.rmtree(data_dir, ignore_errors=True)


def log_in(page, stack, username):
    page.goto(stack.url + "/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(stack.url + "/")


def api(stack, user, method, path, **kwargs):
    return requests.request(method, stack.url + path, headers={"Authorization": f"Bearer {stack.tokens[user]}"},
                            timeout=300, **kwargs)


def query(stack, sql, *params):
    with sqlite3.connect(stack.db) as db:
        return db.execute(sql, params).fetchall()


def ask(page, question, max_tokens=40):
    if not page.is_visible("input[name=max_tokens]"):
        page.click(".pg-options summary")
    page.fill("input[name=max_tokens]", str(max_tokens))
    page.fill("input[name=temperature]", "0")
    page.fill("#pg-input", question)
    page.click("#pg-send")
    page.wait_for_selector(".bubble.assistant .meta:not(:empty)", timeout=180000)
    return page.locator(".bubble.assistant").last


def test_cited_answer_from_an_uploaded_pdf_and_nothing_of_it_for_another_user(rag_stack, tmp_path):
    stack = rag_stack
    pdf_path = tmp_path / "survey.pdf"
    pdf_path.write_bytes(make_pdf(PDF_PAGES))
    md_path = tmp_path / "glaciers.md"
    md_path.write_bytes(MARKDOWN)

    # Bob's own public collection, so that retrieval really runs when he asks.
    bob_collection = api(stack, "bob", "POST", "/api/rag/collections",
                         json={"name": "Garden", "kind": "general", "visibility": "public"}).json()["id"]
    uploaded = api(stack, "bob", "POST", "/api/rag/documents", data={"collection": bob_collection},
                   files={"file": ("garden.txt", BOB_TEXT, "text/plain")})
    assert uploaded.status_code == 202, uploaded.text

    with chromium_page() as page:
        # Alice: a private collection, two files through the file input, both ingested for real.
        log_in(page, stack, "alice")
        page.locator("nav").get_by_role("link", name="Documents").click()
        page.wait_for_url("**/documents/")
        page.click(".new-collection summary")  # folded: Bob's public collection is listed already
        page.fill("#id_name", "Village survey")
        page.select_option("#id_kind", "general")
        page.select_option("#id_visibility", "private")
        page.get_by_role("button", name="Create collection").click()
        page.wait_for_selector("#dropzone")
        page.set_input_files("#file-input", [str(pdf_path), str(md_path)])
        page.wait_for_selector("tr.document-row:has-text('survey.pdf')[data-status='ready']", timeout=240000)
        page.wait_for_selector("tr.document-row:has-text('glaciers.md')[data-status='ready']", timeout=240000)

        # The playground uses her documents by default now that she has some; temperature 0.
        page.locator("nav").get_by_role("link", name="Playground").click()
        page.wait_for_url("**/playground/")
        assert page.is_checked("input[name=rag]")
        answer = ask(page, QUESTION)
        assert ANSWER_WORDS in answer.locator(".content").inner_text().lower()
        source = answer.locator(".pg-source").filter(has_text="survey.pdf")
        link = source.locator("a.pg-source-link")
        assert link.inner_text() == "survey.pdf"
        assert "page 2" in source.inner_text()
        assert ANSWER_WORDS in source.locator(".pg-source-quote").inner_text()
        [(pdf_id,)] = query(stack, "SELECT id FROM rag_document WHERE original_name = 'survey.pdf'")
        assert link.get_attribute("href") == f"/documents/{pdf_id}/#page-2"

        # Following the link lands on the PDF's page 2, which holds the passage.
        link.click()
        page.wait_for_url(f"**/documents/{pdf_id}/#page-2")
        assert "every roof is painted bright orange" in " ".join(page.inner_text("#page-2").split())
        assert page.evaluate("document.querySelector(':target')?.id") == "page-2"

    [(alice_collection,)] = query(stack, "SELECT id FROM rag_collection WHERE name = 'Village survey'")
    alice_documents = [row[0] for row in query(stack, "SELECT id FROM rag_document WHERE collection_id = ?",
                                               alice_collection)]
    alice_chunks = {row[0] for row in query(
        stack, "SELECT id FROM rag_chunk WHERE document_id IN (SELECT id FROM rag_document WHERE collection_id = ?)",
        alice_collection)}
    bob_chunks = {row[0] for row in query(
        stack, "SELECT id FROM rag_chunk WHERE document_id IN (SELECT id FROM rag_document WHERE collection_id = ?)",
        bob_collection)}
    assert len(alice_documents) == 2 and alice_chunks and bob_chunks
    assert query(stack, "SELECT status FROM rag_document WHERE collection_id = ?", bob_collection) == [("ready",)]
    [(alice_meta,)] = query(stack, "SELECT metrics FROM inference_message m JOIN inference_conversation c "
                                   "ON m.conversation_id = c.id JOIN governance_user u ON c.owner_id = u.id "
                                   "WHERE u.username = 'alice' AND m.role = 'assistant'")
    assert set(json.loads(alice_meta)["retrieved_chunks"]) & alice_chunks  # the prompt held her passage

    with chromium_page() as page:
        # Bob: no page shows the collection, its documents or their passages.
        log_in(page, stack, "bob")
        page.goto(stack.url + "/documents/")
        assert "Village survey" not in page.content()
        assert page.goto(stack.url + f"/documents/?collection={alice_collection}").status == 404
        for document_id in alice_documents:
            for path in (f"/documents/{document_id}/", f"/documents/{document_id}/status"):
                response = page.goto(stack.url + path)
                assert response.status == 404 and "orange" not in page.content(), path

        # Chat: the same question, with his documents on; the answer cites nothing of hers.
        page.goto(stack.url + "/playground/")
        assert page.is_checked("input[name=rag]")
        answer = ask(page, QUESTION)
        titles = answer.locator(".pg-source-link").all_inner_texts()
        assert "survey.pdf" not in titles and "glaciers.md" not in titles

    [(sources, metrics)] = query(stack, "SELECT sources, metrics FROM inference_message m JOIN inference_conversation c "
                                        "ON m.conversation_id = c.id JOIN governance_user u ON c.owner_id = u.id "
                                        "WHERE u.username = 'bob' AND m.role = 'assistant'")
    retrieved = set(json.loads(metrics)["retrieved_chunks"])
    assert retrieved and retrieved <= bob_chunks  # retrieval ran, over his passages only
    assert not {s["document_id"] for s in json.loads(sources)} & set(alice_documents)

    # The search API and the OpenAI-compatible API: nothing of hers either.
    for question in (QUESTION, "roof painted bright orange since 1852", "glaciers carve U-shaped valleys"):
        found = api(stack, "bob", "POST", "/api/rag/search", json={"query": question, "top_k": 50}).json()["data"]
        assert all(hit["document_id"] not in alice_documents and "orange" not in hit["text"] for hit in found)
    found = api(stack, "bob", "POST", "/api/rag/search", json={"query": "moss on the shed roof"}).json()["data"]
    assert [hit["document_title"] for hit in found] == ["garden.txt"]  # the search itself works for him
    denied = api(stack, "bob", "POST", "/api/rag/search", json={"query": QUESTION, "collections": [alice_collection]})
    assert denied.status_code == 404
    for document_id in alice_documents:
        assert api(stack, "bob", "GET", f"/api/rag/documents/{document_id}").status_code == 404
    assert "Village survey" not in api(stack, "bob", "GET", "/api/rag/collections").text
    chat = api(stack, "bob", "POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 16, "temperature": 0,
        "r3mes": {"rag": True}}).json()
    assert set(chat["r3mes"]["metrics"]["retrieved_chunks"]) <= bob_chunks
    assert not {s["document_id"] for s in chat["r3mes"]["sources"]} & set(alice_documents)
    refused = api(stack, "bob", "POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "r3mes": {"collections": [alice_collection]}})
    assert refused.status_code == 400 and "cannot read" in refused.json()["error"]["message"]

    # Alice gets the same citation through the OpenAI-compatible API.
    chat = api(stack, "alice", "POST", "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40, "temperature": 0,
        "r3mes": {"rag": True}}).json()
    [cited] = [s for s in chat["r3mes"]["sources"] if s["document_id"] == pdf_id]
    assert cited["page"] == 2 and cited["url"] == f"/documents/{pdf_id}/#page-2" and cited["cited"] in ("marker", "attributed")
