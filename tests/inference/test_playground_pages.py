"""Playground pages: login, listing and search, per-user access, rename/delete, feedback."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from inference.models import Conversation, Feedback, Message

pytestmark = pytest.mark.django_db


@pytest.fixture
def chat(alice):
    conversation = Conversation.objects.create(owner=alice, title="Rivers of Europe")
    prompt = Message.objects.create(conversation=conversation, role="user", content="Longest river?")
    old = Message.objects.create(conversation=conversation, role="assistant", content="The Rhine", reply_to=prompt,
                                 version=1, is_current=False)
    new = Message.objects.create(conversation=conversation, role="assistant", reply_to=prompt, version=2,
                                 content="The **Volga** <script>alert(1)</script>",
                                 experts={"history": 0.8, "general": 0.2},
                                 metrics={"completion_tokens": 7, "ttft_ms": 120, "backend": "pytorch-cpu"})
    return conversation, old, new


def test_anonymous_is_sent_to_login(client):
    response = client.get(reverse("playground"))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_page_shows_the_thread_rendered_and_sanitised_with_earlier_versions(alice_client, chat):
    conversation, old, new = chat
    response = alice_client.get(reverse("playground-conversation", args=[conversation.pk]))
    html = response.content.decode()
    assert "<strong>Volga</strong>" in html and "<script>alert(1)" not in html
    assert "Earlier versions (1)" in html and "The Rhine" in html
    assert '"history": 0.8' in html  # metadata for the answer's info line


def test_search_finds_conversations_by_title_and_content(alice_client, chat):
    assert "Rivers of Europe" in alice_client.get(reverse("playground"), {"q": "volga"}).content.decode()
    assert "No chat matches" in alice_client.get(reverse("playground"), {"q": "zebra"}).content.decode()


def test_someone_elses_conversation_is_404_everywhere(client, bob, chat):
    conversation, _, new = chat
    client.force_login(bob)
    assert client.get(reverse("playground-conversation", args=[conversation.pk])).status_code == 404
    assert client.post(reverse("playground-rename", args=[conversation.pk]), {"title": "x"}).status_code == 404
    assert client.post(reverse("playground-delete", args=[conversation.pk])).status_code == 404
    assert client.post(reverse("playground-feedback", args=[new.pk]), {"rating": "1"}).status_code == 404
    assert Conversation.objects.filter(pk=conversation.pk, title="Rivers of Europe").exists()


def test_rename_and_delete(alice_client, chat):
    conversation, _, _ = chat
    alice_client.post(reverse("playground-rename", args=[conversation.pk]), {"title": "  Rivers  "})
    conversation.refresh_from_db()
    assert conversation.title == "Rivers"
    alice_client.post(reverse("playground-delete", args=[conversation.pk]))
    assert not Conversation.objects.exists() and not Message.objects.exists()


def test_feedback_thumbs_down_with_correction_is_stored_once_per_answer(alice_client, alice, chat):
    _, _, new = chat
    url = reverse("playground-feedback", args=[new.pk])
    assert alice_client.post(url, {"rating": "1"}).json()["rating"] == 1
    response = alice_client.post(url, {"rating": "-1", "correction": "The Volga (3,530 km)."})
    assert response.json() == {"ok": True, "rating": -1, "correction": "The Volga (3,530 km)."}
    feedback = Feedback.objects.get()
    assert feedback.expert == "history" and feedback.user == alice
    assert alice_client.post(url, {"rating": "0"}).status_code == 400
    assert alice_client.post(url, {"rating": "1", "correction": "x" * 20001}).status_code == 400
    assert Feedback.objects.get().rating == -1


def test_feedback_needs_csrf(client, alice, chat):
    from django.test import Client

    _, _, new = chat
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(alice)
    assert strict.post(reverse("playground-feedback", args=[new.pk]), {"rating": "1"}).status_code == 403


def test_an_answer_left_streaming_by_a_dead_server_is_shown_as_interrupted(alice_client, chat):
    conversation, _, new = chat
    Message.objects.filter(pk=new.pk).update(status="streaming", created=timezone.now() - timedelta(hours=1))
    alice_client.get(reverse("playground-conversation", args=[conversation.pk]))
    new.refresh_from_db()
    assert new.status == "error" and "interrupted" in new.error


def test_admin_action_downloads_selected_feedback_as_jsonl(admin_client, alice, chat):
    import json

    _, old, new = chat
    up = Feedback.record(alice, new, 1)
    Feedback.record(alice, old, -1)  # no correction: nothing to learn, left out
    response = admin_client.post(reverse("admin:inference_feedback_changelist"),
                                 {"action": "export_jsonl", "_selected_action": [f.pk for f in Feedback.objects.all()]})
    assert response["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.content.decode().splitlines()]
    assert [(line["feedback_id"], line["source"], line["expert"]) for line in lines] == [(up.pk, "thumbs_up", "history")]
    assert lines[0]["messages"] == [{"role": "user", "content": "Longest river?"},
                                    {"role": "assistant", "content": new.content}]
