"""The playground in Debian's chromium against the live stack (Daphne serving websockets, the
real inference worker and model): log in, chat with streaming tokens, Stop mid-answer (and the
worker stops), regenerate, thumbs down with a correction, reload and find the conversation."""

import sqlite3
import time

import pytest
import requests

from tests.browser import chromium_page

pytestmark = pytest.mark.browser


def stats(live_stack):
    return requests.get(live_stack.url + "/api/inference/stats", timeout=10,
                        headers={"Authorization": f"Bearer {live_stack.token}"}).json()


def set_max_tokens(page, value):
    if not page.is_visible("input[name=max_tokens]"):
        page.click(".pg-options summary")
    page.fill("input[name=max_tokens]", str(value))


def test_chat_stop_regenerate_correct_and_reload(live_stack):
    with chromium_page() as page:
        page.goto(live_stack.url + "/accounts/login/?next=/playground/")
        page.fill("#id_username", live_stack.username)
        page.fill("#id_password", live_stack.password)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url("**/playground/")

        # Chat: tokens arrive one batch after another before the final render.
        set_max_tokens(page, 12)
        page.fill("#pg-input", "What is the capital of France?")
        page.click("#pg-send")
        page.wait_for_selector(".bubble.assistant.streaming")
        seen = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            tokens = page.eval_on_selector_all(".bubble.assistant", "els => els.map(e => e.dataset.tokens || '')")
            seen.update(t for t in tokens if t)
            if page.query_selector(".bubble.assistant .meta"):
                break
            time.sleep(0.05)
        assert len(seen) >= 2, f"tokens did not stream (saw {seen})"
        meta = page.inner_text(".bubble.assistant .meta")
        assert "tokens" in meta and "TTFT" in meta and "dense SmolLM2" in meta
        page.wait_for_url("**/playground/c/*/")

        # Stop mid-answer: the page says so and the worker stops generating.
        set_max_tokens(page, 400)
        page.fill("#pg-input", "Count from one to one hundred in words.")
        page.click("#pg-send")
        page.wait_for_function("document.querySelectorAll('.bubble.assistant')[1]?.dataset.tokens > 2", timeout=60000)
        page.click("#pg-stop")
        page.wait_for_selector("#pg-status:has-text('Stopped.')")
        time.sleep(1.0)
        before = stats(live_stack)
        time.sleep(2.0)
        after = stats(live_stack)
        assert before["running"] == 0 and after["generated_tokens"] == before["generated_tokens"]
        assert "Stopped" in page.inner_text(".bubble.assistant >> nth=1")

        # Regenerate the last answer: a new version streams in, the old one is kept.
        set_max_tokens(page, 6)
        page.click(".bubble.assistant >> nth=1 >> .pg-regenerate")
        page.wait_for_function("[...document.querySelectorAll('.bubble.assistant')].filter(e => !e.hidden).length == 2"
                               " && document.querySelectorAll('.bubble.assistant .meta').length >= 3", timeout=60000)
        newest = page.locator(".bubble.assistant:not([hidden])").nth(1)
        answer_id = newest.get_attribute("data-id")

        # Thumbs down with a correction.
        newest.locator(".pg-correct").click()
        page.fill("#pg-correction", "One, two, three, four.")
        page.get_by_role("button", name="Save correction").click()
        page.wait_for_selector("#pg-status:has-text('Correction saved')")

        # Reload: the conversation is in the list and its thread is back, with earlier versions.
        title = page.inner_text("#pg-title")
        page.goto(live_stack.url + "/playground/")
        page.get_by_role("link", name=title).click()
        page.wait_for_selector(".bubble.assistant")
        assert page.locator(".bubble.user").count() == 2
        assert "Earlier versions (1)" in page.inner_text(".pg-versions")
        assert "chosen" in page.get_attribute(f".bubble.assistant[data-id='{answer_id}'] .pg-down", "class")

        # Phone-sized screen: the chat stays usable.
        page.set_viewport_size({"width": 390, "height": 800})
        assert page.is_visible("#pg-input") and page.is_visible("#pg-send")

    with sqlite3.connect(live_stack.db) as db:
        rows = db.execute("SELECT rating, correction, message_id FROM inference_feedback").fetchall()
        versions = db.execute("SELECT version, status FROM inference_message WHERE role='assistant' ORDER BY id").fetchall()
    assert rows == [(-1, "One, two, three, four.", int(answer_id))]
    assert versions[1:] == [(1, "stopped"), (2, "done")]
