"""The OpenAI-compatible API through the official `openai` client against a live Daphne server,
its inference worker and Redis; plus the R3MES inference endpoints."""

import json

import openai
import pytest
import requests


@pytest.fixture(scope="module")
def client(live_stack):
    return openai.OpenAI(base_url=live_stack.url + "/v1", api_key=live_stack.token, max_retries=0, timeout=120)


def test_openai_client_gets_a_completion_with_usage_and_r3mes_metadata(client):
    completion = client.chat.completions.create(
        model="r3mes", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=8)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    r3mes = completion.model_extra["r3mes"]
    assert r3mes["metrics"]["backend"].startswith("pytorch") and r3mes["experts"] == {} and r3mes["sources"] == []


def test_openai_client_streams_chunks_that_add_up_to_the_answer(client):
    stream = client.chat.completions.create(
        model="r3mes", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=10,
        stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) >= 2 and "".join(pieces).strip()
    assert finish in ("stop", "length")
    assert 0 < usage.completion_tokens <= 10


def test_same_seed_gives_the_same_sampled_answer(client):
    def ask():
        return client.chat.completions.create(
            model="r3mes", messages=[{"role": "user", "content": "Invent a word."}], max_tokens=6,
            temperature=1.0, seed=1234).choices[0].message.content

    assert ask() == ask()


def test_penalties_reach_the_engine(client):
    """OpenAI's frequency and presence penalties and the repetition penalty (an extra field, as in
    vLLM) change a greedy answer that repeats itself."""
    def ask(**penalties):
        return client.chat.completions.create(
            model="r3mes", messages=[{"role": "user", "content": "Write a poem about the sea."}], max_tokens=40,
            temperature=0, extra_body={"repetition_penalty": penalties.pop("repetition_penalty", 1.0)},
            **penalties).choices[0].message.content

    plain = ask()
    assert plain == ask()
    for penalty in ({"frequency_penalty": 1.5}, {"presence_penalty": 1.5}, {"repetition_penalty": 1.5}):
        assert ask(**penalty) != plain, penalty


def test_raw_sse_ends_with_done(live_stack):
    response = requests.post(live_stack.url + "/v1/chat/completions", stream=True, timeout=120,
                             headers={"Authorization": f"Bearer {live_stack.token}"},
                             json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][6:])
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and "metrics" in final["r3mes"]


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}, 400, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "r3mes": {"experts": ["astrology"]}}, 400, "experts"),
])
def test_openai_client_sees_bad_requests_as_errors(client, body, status, param):
    body = {"model": "r3mes", **body}
    extra = {"r3mes": body.pop("r3mes")} if "r3mes" in body else None  # R3MES extensions ride in extra_body
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body, extra_body=extra)
    assert info.value.status_code == status and info.value.body["param"] == param


def test_models_endpoint_lists_r3mes(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["r3mes"]


def test_stats_count_generated_tokens(live_stack):
    headers = {"Authorization": f"Bearer {live_stack.token}"}
    warm = requests.post(live_stack.url + "/api/inference/warmup", headers=headers, timeout=120)
    assert warm.status_code == 200 and warm.json()["ok"]  # a short generation through the batch
    stats = requests.get(live_stack.url + "/api/inference/stats", headers=headers, timeout=10).json()
    assert stats["model_loaded"] and stats["generated_tokens"] > 0 and stats["running"] == 0
    experts = requests.get(live_stack.url + "/api/inference/experts", headers=headers, timeout=10).json()
    assert experts == {"experts": [], "total": 0}
    bad = requests.post(live_stack.url + "/api/inference/adapters/preload", headers=headers, json={"experts": ["x"]},
                        timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_expert"


def test_api_needs_a_bearer_token(live_stack):
    response = requests.post(live_stack.url + "/v1/chat/completions", json={"messages": []}, timeout=10)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"


MAKE_ADAPTER = """
import os, torch
from django.conf import settings
from inference.engine import Engine
from inference.adapter_cache import file_sha256
from inference.models import Adapter
torch.set_num_threads(1)
engine = Engine.load(cache_dir=settings.MODEL_CACHE_DIR)
engine.new_adapter("coding", r=4, alpha=8, seed=1)
path = engine.save_adapter("coding", os.path.join(settings.DATA_DIR, "adapters", "coding-v1"))
sha = file_sha256(os.path.join(path, "adapter_model.safetensors"))
Adapter.objects.create(expert="coding", version=1, path=str(path), sha256=sha, rank=4, alpha=8).approve()
"""


def test_an_approved_adapter_preloads_and_serves_forced_expert_requests(live_stack, client):
    import subprocess

    from tests.inference.live import PYTHON, REPO

    subprocess.run([PYTHON, "manage.py", "shell", "-c", MAKE_ADAPTER], cwd=REPO, env=live_stack.env, check=True,
                   capture_output=True, timeout=180)
    headers = {"Authorization": f"Bearer {live_stack.token}"}
    preload = requests.post(live_stack.url + "/api/inference/adapters/preload", headers=headers,
                            json={"experts": ["coding"]}, timeout=120)
    assert preload.status_code == 200 and preload.json()["adapters"] == {"coding": "loaded from disk"}
    experts = requests.get(live_stack.url + "/api/inference/experts", headers=headers, timeout=10).json()
    assert [(e["expert"], e["version"], e["resident"]) for e in experts["experts"]] == [("coding", 1, True)]

    completion = client.chat.completions.create(
        model="r3mes", messages=[{"role": "user", "content": "Write a Python loop."}], max_tokens=5,
        extra_body={"r3mes": {"experts": ["coding"]}})
    assert completion.model_extra["r3mes"]["experts"] == {"coding": 1.0}
    assert completion.model_extra["r3mes"]["metrics"]["routing"] == "forced"


def test_a_stream_reader_that_leaves_cancels_the_sequence_in_the_worker(live_stack):
    import time

    headers = {"Authorization": f"Bearer {live_stack.token}"}
    response = requests.post(live_stack.url + "/v1/chat/completions", stream=True, timeout=120, headers=headers,
                             json={"messages": [{"role": "user", "content": "Write a long story about a cat."}],
                                   "max_tokens": 400, "stream": True})
    lines = response.iter_lines(decode_unicode=True)
    content_chunks = 0
    for line in lines:
        if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
            content_chunks += 1
            if content_chunks == 2:
                break
    response.close()  # the reader leaves mid-answer
    deadline = time.monotonic() + 30  # generous: the cancel is seen at the next step, even on a busy machine
    while True:
        before = requests.get(live_stack.url + "/api/inference/stats", headers=headers, timeout=10).json()
        if before["running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    time.sleep(2.0)
    after = requests.get(live_stack.url + "/api/inference/stats", headers=headers, timeout=10).json()
    assert before["running"] == 0 and after["generated_tokens"] == before["generated_tokens"]
    assert after["cancelled"] >= 1


MAKE_COLLECTION = """
from django.core.files.uploadedfile import SimpleUploadedFile
from governance.models import User
from rag import actions
from rag.models import Collection
alice = User.objects.get(username="alice")
collection = Collection.objects.create(owner=alice, name="rivers", kind="general", visibility="private")
text = b"The Danube flows through ten countries and ends in the Black Sea. Its delta is a wetland reserve."
document, _ = actions.add_document(collection, alice, SimpleUploadedFile("danube.md", text), enqueue=False)
actions.ingest(document.pk)
"""


def test_the_worker_runs_the_pipeline_retrieval_and_routing_for_the_requesting_user(live_stack, client):
    import subprocess

    from tests.inference.live import PYTHON, REPO

    subprocess.run([PYTHON, "manage.py", "shell", "-c", MAKE_COLLECTION], cwd=REPO, env=live_stack.env, check=True,
                   capture_output=True, timeout=300)
    question = [{"role": "user", "content": "Which sea does the Danube end in?"}]
    with_rag = client.chat.completions.create(model="r3mes", messages=question, max_tokens=8,
                                              extra_body={"r3mes": {"rag": True}})
    metrics = with_rag.model_extra["r3mes"]["metrics"]
    assert metrics["rag"] is True and metrics["retrieved"] >= 1  # alice's private passage reached the prompt
    assert metrics["routing"] in ("hybrid", "fast path") and metrics["routing_ms"] > 0
    without = client.chat.completions.create(model="r3mes", messages=question, max_tokens=8)
    assert without.model_extra["r3mes"]["metrics"]["retrieved"] == 0
    assert with_rag.usage.prompt_tokens > without.usage.prompt_tokens  # the sources are in the prompt
