"""`manage.py r3mes query|stream|experts|stats|health|metrics` against the live server, and the
feedback export."""

import io
import json
import subprocess

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from inference.models import Conversation, Feedback, Message
from tests.inference.live import PYTHON, REPO


def r3mes(live_stack, *args, check=True):
    env = {**live_stack.env, "R3MES_URL": live_stack.url, "R3MES_TOKEN": live_stack.token}
    return subprocess.run([PYTHON, "manage.py", "r3mes", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          check=check, timeout=180)


def test_query_json_returns_the_completion(live_stack):
    reply = json.loads(r3mes(live_stack, "query", "Say hello", "--max-tokens", "5", "--json").stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
    assert reply["usage"]["completion_tokens"] <= 5


def test_stream_prints_the_answer_and_its_metadata(live_stack):
    result = r3mes(live_stack, "stream", "Say hello", "--max-tokens", "5")
    assert result.stdout.strip()
    assert "tokens: " in result.stderr and "pytorch" in result.stderr


def test_stats_health_metrics_and_experts(live_stack):
    stats = json.loads(r3mes(live_stack, "stats", "--json").stdout)
    assert stats["model_loaded"] is True and "generated_tokens" in stats
    health = json.loads(r3mes(live_stack, "health", "--json").stdout)
    assert health["status"] == "ready"
    metrics = json.loads(r3mes(live_stack, "metrics", "--json").stdout)
    assert "r3mes_generated_tokens" in metrics and "r3mes_time_to_first_token_seconds" in metrics
    experts = json.loads(r3mes(live_stack, "experts", "served", "--json").stdout)
    assert experts["total"] == len(experts["experts"])


def test_bad_token_and_bad_input_fail_with_a_clear_message(live_stack):
    result = r3mes(live_stack, "query", "hi", "--token", "nope", check=False)
    assert result.returncode != 0 and "401" in result.stderr and "Invalid or revoked API token" in result.stderr
    result = r3mes(live_stack, "query", "hi", "--temperature", "-1", check=False)
    assert result.returncode != 0 and "temperature must be >= 0" in result.stderr


@pytest.mark.django_db
def test_feedback_export_writes_corrections_and_thumbs_up_for_one_expert(alice, tmp_path):
    conversation = Conversation.objects.create(owner=alice, title="t")

    def turn(question, answer, experts):
        prompt = Message.objects.create(conversation=conversation, role="user", content=question)
        return Message.objects.create(conversation=conversation, role="assistant", content=answer, reply_to=prompt,
                                      experts=experts)

    good = turn("2+2?", "4", {"coding": 0.7, "science": 0.3})
    bad = turn("Capital of France?", "Berlin", {"coding": 1.0})
    plain_down = turn("Hi", "Bye", {"coding": 1.0})
    other = turn("Pain?", "Rest", {"medical": 1.0})
    Feedback.record(alice, good, 1)
    Feedback.record(alice, bad, -1, "Paris")
    Feedback.record(alice, plain_down, -1)  # teaches nothing: not exported
    Feedback.record(alice, other, 1)
    out = tmp_path / "coding.jsonl"
    err = io.StringIO()
    call_command("r3mes", "feedback", "export", "--expert", "coding", "--out", str(out), stderr=err)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["messages"][-1]["content"] for line in lines] == ["4", "Paris"]
    assert lines[1]["messages"][:-1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                         {"role": "user", "content": "Capital of France?"}]
    assert lines[1]["source"] == "correction" and lines[0]["source"] == "thumbs_up"
    assert "2 examples written" in err.getvalue()
    assert Feedback.objects.filter(exported_at__isnull=False).count() == 2


@pytest.mark.django_db
def test_feedback_export_to_an_unwritable_path_fails_cleanly(tmp_path):
    with pytest.raises(CommandError, match="cannot write"):
        call_command("r3mes", "feedback", "export", "--out", str(tmp_path / "missing" / "x.jsonl"))
