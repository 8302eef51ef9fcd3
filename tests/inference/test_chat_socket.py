"""The playground's chat websocket against the real ASGI app, the real channel layer (the
session's redis-server) and the real inference worker process holding the real model."""

import asyncio
import json
import time

import pytest
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator

from inference.models import Conversation, Message
from inference.protocol import ask_worker
from r3mes_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


def run(coro):
    channel_layers.backends.clear()  # each asyncio.run gets a layer bound to its own loop
    try:
        return asyncio.run(coro)
    finally:
        channel_layers.backends.clear()


async def connect(user):
    communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://127.0.0.1")])
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def collect(communicator, until=("done", "error"), timeout=60):
    frames = []
    while True:
        frame = json.loads(await communicator.receive_from(timeout=timeout))
        frames.append(frame)
        if frame["type"] in until:
            return frames


async def worker_tokens():
    return (await ask_worker("inference.stats", 5))["generated_tokens"]


def chat(content, conversation=None, **options):
    return {"type": "chat", "conversation": conversation, "content": content, "options": {"max_tokens": 8, **options}}


def test_anonymous_socket_gets_an_error_frame_and_is_closed(inference_worker):
    from django.contrib.auth.models import AnonymousUser

    async def scenario():
        communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://127.0.0.1")])
        communicator.scope["user"] = AnonymousUser()
        await communicator.connect()
        frame = json.loads(await communicator.receive_from())
        closed = await communicator.receive_output()
        # Let the consumer finish before the loop closes (left to asyncio.run's cancel-all, the
        # suite hung here once, in the loop's shutdown).
        await communicator.disconnect()
        return frame, closed

    frame, closed = run(scenario())
    assert frame == {"type": "error", "code": "not_authenticated", "message": "Log in to chat."}
    assert closed["type"] == "websocket.close"


def test_foreign_origin_is_refused(alice):
    async def scenario():
        communicator = WebsocketCommunicator(application, "/ws/chat/", headers=[(b"origin", b"http://evil.example")])
        communicator.scope["user"] = alice
        connected, _ = await communicator.connect()
        return connected

    assert run(scenario()) is False


def test_chat_streams_escaped_tokens_then_a_rendered_answer_and_stores_it(inference_worker, alice):
    async def scenario():
        communicator = await connect(alice)
        await communicator.send_json_to(chat("Write <b>bold</b> HTML tags please", max_tokens=12))
        frames = await collect(communicator)
        await communicator.disconnect()
        return frames

    frames = run(scenario())
    start, tokens, done = frames[0], [f for f in frames if f["type"] == "tokens"], frames[-1]
    assert start["type"] == "start" and done["type"] == "done", frames
    assert tokens, "the answer must stream in token frames"
    assert [f["tokens"] for f in tokens] == sorted(f["tokens"] for f in tokens)
    streamed = "".join(f["html"] for f in tokens)
    assert "<" not in streamed.replace("&lt;", "")  # every piece HTML-escaped
    assert done["metrics"]["completion_tokens"] <= 12 and done["metrics"]["ttft_ms"] > 0
    assert done["metrics"]["backend"].startswith("pytorch") and done["metrics"]["weights"] == "dense"
    answer = Message.objects.get(pk=start["message"])
    assert answer.status == "done" and answer.content and answer.metrics["completion_tokens"] == done["metrics"]["completion_tokens"]
    conversation = Conversation.objects.get(pk=start["conversation"], owner=alice)
    assert [m.role for m in conversation.visible_messages()] == ["user", "assistant"]


@pytest.mark.parametrize("raw, code", [
    ("not json", "bad_frame"),
    ("[1, 2]", "bad_frame"),
    ('{"type": "dance"}', "bad_frame"),
    ('{"type": "chat", "content": "   "}', "invalid_request"),
    ('{"type": "chat", "content": "' + "x" * 16001 + '"}', "message_too_long"),
    ('{"type": "chat", "content": "hi", "options": {"temperature": -1}}', "invalid_request"),
    ('{"type": "chat", "content": "hi", "options": {"max_tokens": 0}}', "invalid_request"),
    ('{"type": "chat", "content": "hi", "options": {"max_tokens": "many"}}', "invalid_request"),
    ('{"type": "chat", "content": "hi", "options": {"colour": "red"}}', "invalid_request"),
    ('{"type": "chat", "content": "hi", "options": {"experts": ["astrology"]}}', "unknown_expert"),
    ('{"type": "chat", "content": "hi", "conversation": "abc"}', "invalid_request"),
])
def test_bad_frames_get_an_error_frame_and_store_nothing(alice, raw, code):
    async def scenario():
        communicator = await connect(alice)
        await communicator.send_to(text_data=raw)
        frame = json.loads(await communicator.receive_from())
        await communicator.disconnect()
        return frame

    frame = run(scenario())
    assert frame["type"] == "error" and frame["code"] == code, frame
    assert not Message.objects.exists() and not Conversation.objects.exists()


def test_someone_elses_conversation_reads_as_not_found(alice, bob):
    theirs = Conversation.objects.create(owner=bob, title="bob's")

    async def scenario():
        communicator = await connect(alice)
        await communicator.send_json_to(chat("hello", conversation=theirs.pk))
        frame = json.loads(await communicator.receive_from())
        await communicator.disconnect()
        return frame

    frame = run(scenario())
    assert frame["code"] == "not_found"
    assert not Message.objects.exists()


def test_stop_cancels_the_sequence_in_the_worker_and_keeps_the_partial_answer(inference_worker, alice):
    async def scenario():
        communicator = await connect(alice)
        await communicator.send_json_to(chat("Count from one to one hundred in words.", max_tokens=400))
        frames = [json.loads(await communicator.receive_from(timeout=60))]
        while not any(f["type"] == "tokens" for f in frames):
            frames.append(json.loads(await communicator.receive_from(timeout=60)))
        # A second prompt on the same socket while this one generates is refused.
        await communicator.send_json_to(chat("another", conversation=frames[0]["conversation"]))
        busy = json.loads(await communicator.receive_from(timeout=10))
        while busy["type"] == "tokens":
            busy = json.loads(await communicator.receive_from(timeout=10))
        await communicator.send_json_to({"type": "stop"})
        frames += await collect(communicator, until=("done",), timeout=10)
        await asyncio.sleep(1.0)  # the worker drops the sequence at its next step
        before = await worker_tokens()
        await asyncio.sleep(2.0)
        after = await worker_tokens()
        stats = await ask_worker("inference.stats", 5)
        await communicator.disconnect()
        return frames, busy, before, after, stats

    frames, busy, before, after, stats = run(scenario())
    assert busy["type"] == "error" and busy["code"] == "busy"
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "stopped"
    assert after == before, "the worker kept generating after Stop"
    assert stats["running"] == 0
    answer = Message.objects.get(pk=frames[0]["message"])
    assert answer.status == "stopped" and answer.content  # the partial answer is kept
    assert Message.objects.filter(role="user").count() == 1  # the refused prompt stored nothing


def test_disconnect_cancels_the_sequence_in_the_worker(inference_worker, alice):
    async def scenario():
        communicator = await connect(alice)
        await communicator.send_json_to(chat("Tell me a very long story about a dragon.", max_tokens=400))
        while json.loads(await communicator.receive_from(timeout=60))["type"] != "tokens":
            pass
        await communicator.disconnect()
        await asyncio.sleep(1.0)
        before = await worker_tokens()
        await asyncio.sleep(2.0)
        return before, await worker_tokens()

    before, after = run(scenario())
    assert after == before
    assert Message.objects.get(role="assistant").status == "stopped"


def test_regenerate_adds_a_version_and_keeps_the_earlier_one(inference_worker, alice):
    async def scenario():
        communicator = await connect(alice)
        await communicator.send_json_to(chat("Say hi", max_tokens=4))
        first = await collect(communicator)
        await communicator.send_json_to({"type": "regenerate", "conversation": first[0]["conversation"],
                                         "options": {"max_tokens": 4, "temperature": 1.0, "seed": 7}})
        second = await collect(communicator)
        await communicator.send_json_to({"type": "edit", "conversation": first[0]["conversation"],
                                         "content": "Say bye", "options": {"max_tokens": 4}})
        third = await collect(communicator)
        await communicator.disconnect()
        return first, second, third

    first, second, third = run(scenario())
    assert second[0]["version"] == 2 and third[0]["version"] == 3
    conversation = Conversation.objects.get(pk=first[0]["conversation"])
    answers = Message.objects.filter(conversation=conversation, role="assistant").order_by("version")
    assert [a.version for a in answers] == [1, 2, 3] and [a.is_current for a in answers] == [False, False, True]
    assert conversation.last_user_message().content == "Say bye"
    assert [m.pk for m in conversation.visible_messages()] == [conversation.last_user_message().pk, answers[2].pk]


def test_killed_worker_gives_an_error_frame_then_a_restarted_worker_serves(inference_worker, alice, settings):
    settings.R3MES_STREAM_IDLE_TIMEOUT = 4
    async def until_tokens(communicator):
        await communicator.send_json_to(chat("Write a long poem about the sea.", max_tokens=400))
        frames = []
        while not any(f["type"] == "tokens" for f in frames):
            frames.append(json.loads(await communicator.receive_from(timeout=60)))
        return frames

    async def killed():
        communicator = await connect(alice)
        frames = await until_tokens(communicator)
        inference_worker.kill()
        started = time.monotonic()
        frames += await collect(communicator, until=("error",), timeout=30)
        waited = time.monotonic() - started
        await communicator.disconnect()
        return frames, waited

    frames, waited = run(killed())
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "timeout"
    assert waited < 10  # R3MES_STREAM_IDLE_TIMEOUT (4 s in tests) plus slack, never silence
    assert Message.objects.get(pk=frames[0]["message"]).status == "error"

    inference_worker.restart()

    async def again():
        communicator = await connect(alice)
        await communicator.send_json_to(chat("Say hi", max_tokens=4))
        frames = await collect(communicator)
        await communicator.disconnect()
        return frames

    assert run(again())[-1]["type"] == "done"


def test_chat_messages_are_rate_limited_per_user_with_an_error_frame(alice, settings):
    settings.R3MES_RATE_CHAT = (1, 60)

    async def scenario():
        communicator = await connect(alice)
        frames = []
        for _ in range(2):
            await communicator.send_json_to({"type": "chat", "content": ""})
            frames.append(json.loads(await communicator.receive_from()))
        await communicator.disconnect()
        return frames

    first, second = run(scenario())
    assert first["code"] == "invalid_request"
    assert second["code"] == "rate_limited" and second["retry_after"] >= 1


def test_a_conversation_answering_in_another_tab_refuses_a_second_prompt(alice):
    conversation = Conversation.objects.create(owner=alice, title="busy")
    prompt = Message.objects.create(conversation=conversation, role="user", content="first")
    Message.objects.create(conversation=conversation, role="assistant", reply_to=prompt, status="streaming")

    async def scenario():
        communicator = await connect(alice)
        await communicator.send_json_to(chat("second", conversation=conversation.pk))
        frame = json.loads(await communicator.receive_from())
        await communicator.disconnect()
        return frame

    frame = run(scenario())
    assert frame["code"] == "busy"
    assert conversation.messages.count() == 2
