"""Channels consumers: the inference worker's side of the `inference` channel, and the
playground's chat websocket. Both are thin: the worker consumer hands messages to
inference/worker.py (where the torch code lives), the chat consumer validates a frame, writes the
turn through inference/chat.py and relays the worker's frames."""

import asyncio
import json
import logging
import time

from channels.consumer import AsyncConsumer
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from r3mes_site.api import take_token

from . import chat, protocol, worker
from .markdown import escape_piece, render_markdown
from .models import Message
from .protocol import GenerationError, InvalidRequest
from .worker import state

log = logging.getLogger(__name__)


class InferenceWorkerConsumer(AsyncConsumer):
    """Receives the `inference` channel's messages (and those sent to this worker's own channel,
    such as cancels) in the worker process."""

    pump_task = None

    def _ensure_pump(self):
        if self.pump_task is None or self.pump_task.done():
            self.pump_task = asyncio.create_task(worker.pump(self.channel_layer, self.channel_name))

    async def health_ping(self, message):
        self._ensure_pump()
        reply = state.health()
        reply.update({"type": "health.pong", "worker": self.channel_name})
        await self.channel_layer.send(message["reply_channel"], reply)

    async def generate_request(self, message):
        self._ensure_pump()
        try:
            reply = worker.accept(message, self.channel_name)
        except worker.Rejected as exc:
            reply = {"type": "generate.error", "request_id": message.get("request_id"), "worker": self.channel_name,
                     "code": exc.code, "message": exc.message, "retry_after": exc.retry_after}
        await self.channel_layer.send(message["reply_channel"], reply)

    async def generate_cancel(self, message):
        if state.scheduler is not None:
            state.scheduler.cancel(message["request_id"])

    async def inference_stats(self, message):
        self._ensure_pump()
        reply = await asyncio.to_thread(state.stats)
        reply.update({"type": "inference.stats", "worker": self.channel_name})
        await self.channel_layer.send(message["reply_channel"], reply)

    async def inference_warmup(self, message):
        asyncio.create_task(self._answer_slow(message, "inference.warmed", worker.warmup))

    async def adapters_preload(self, message):
        experts = [e for e in message.get("experts", []) if isinstance(e, str)]
        asyncio.create_task(self._answer_slow(message, "adapters.preloaded", lambda: {"adapters": worker.preload(experts)}))

    async def _answer_slow(self, message, reply_type, function):
        # Off the dispatch path, so cancels and new requests are handled while this runs.
        self._ensure_pump()
        if state.scheduler is None:
            reply = {"ok": False, "error": state.load_error or "the model is still loading"}
        else:
            reply = await asyncio.to_thread(function)
        reply.update({"type": reply_type, "worker": self.channel_name})
        await self.channel_layer.send(message["reply_channel"], reply)


class ChatConsumer(AsyncWebsocketConsumer):
    """/ws/chat/: one socket per playground tab. Client frames:

        {"type": "chat", "conversation": id|null, "content": str, "options": {...}}
        {"type": "regenerate", "conversation": id, "options": {...}}
        {"type": "edit", "conversation": id, "content": str, "options": {...}}
        {"type": "stop"}

    Server frames: start, tokens (HTML-escaped pieces), done (rendered, sanitised answer and its
    metadata), error. Each answer streams in its own task, so a Stop or a disconnect is seen at once.
    """

    async def connect(self):
        self.user = self.scope.get("user")
        self.task = None
        await self.accept()
        if self.user is None or not self.user.is_authenticated:
            await self.send_error("not_authenticated", "Log in to chat.")
            await self.close(code=4401)

    async def disconnect(self, code):
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the stream's cleanup cancels the sequence in the worker

    async def send_json(self, frame):
        await self.send(text_data=json.dumps(frame))

    async def send_error(self, code, text, **extra):
        await self.send_json({"type": "error", "code": code, "message": text, **extra})

    async def receive(self, text_data=None, bytes_data=None):
        if not self.user or not self.user.is_authenticated:
            return await self.send_error("not_authenticated", "Log in to chat.")
        try:
            frame = json.loads(text_data if text_data is not None else bytes_data)
        except (TypeError, ValueError, UnicodeDecodeError):
            return await self.send_error("bad_frame", "Frames must be JSON objects.")
        if not isinstance(frame, dict):
            return await self.send_error("bad_frame", "Frames must be JSON objects.")
        kind = frame.get("type")
        if kind == "stop":
            if self.task is not None and not self.task.done():
                self.task.cancel()
            return
        if kind not in ("chat", "regenerate", "edit"):
            return await self.send_error("bad_frame", f"Unknown frame type {kind!r}; use chat, regenerate, edit or stop.")
        if self.task is not None and not self.task.done():
            return await self.send_error("busy", "An answer is still being generated; stop it first.")
        allowed, retry_after = await asyncio.to_thread(take_token, "chat", self.user.pk, *settings.R3MES_RATE_CHAT)
        if not allowed:
            return await self.send_error("rate_limited", f"Too many messages; retry in {retry_after} s.",
                                         retry_after=retry_after)
        try:
            options = await database_sync_to_async(chat.check_turn)(kind, frame.get("content"), frame.get("options"))
            conversation, answer, history = await database_sync_to_async(chat.start_turn)(
                self.user, kind, frame.get("conversation"), frame.get("content"), options)
        except InvalidRequest as exc:
            return await self.send_error(exc.code, exc.message, param=exc.param)
        await self.send_json({"type": "start", "conversation": conversation.pk, "title": conversation.title,
                              "message": answer.pk, "reply_to": answer.reply_to_id, "version": answer.version})
        self.task = asyncio.create_task(self.stream(answer.pk, history, options))

    async def stream(self, answer_id, history, options):
        text, done, started = "", None, time.monotonic()
        try:
            async for frame in protocol.generate(history, options, user_id=self.user.pk):
                if frame["type"] == "generate.tokens":
                    text += frame["text"]
                    await self.send_json({"type": "tokens", "message": answer_id, "html": escape_piece(frame["text"]),
                                          "tokens": frame["tokens"]})
                elif frame["type"] == "generate.done":
                    done = frame
        except GenerationError as exc:
            await database_sync_to_async(chat.finish_answer)(answer_id, Message.Status.ERROR, text, error=exc.message)
            await self.send_error(exc.code, exc.message, answer=answer_id, retry_after=exc.retry_after,
                                  html=render_markdown(text))
            return
        except asyncio.CancelledError:
            # Stop or disconnect: keep what was written, tell the page (if it is still there).
            metrics = {"completion_tokens": None, "total_ms": round((time.monotonic() - started) * 1000, 1)}
            await database_sync_to_async(chat.finish_answer)(answer_id, Message.Status.STOPPED, text, metrics=metrics)
            try:
                await self.send_json({"type": "done", "message": answer_id, "finish_reason": "stopped",
                                      "html": render_markdown(text), "experts": {}, "sources": [], "metrics": metrics})
            except Exception:  # the socket is already closed (disconnect)
                pass
            return
        await database_sync_to_async(chat.finish_answer)(
            answer_id, Message.Status.DONE, done["text"], experts=done["experts"], sources=done["sources"],
            metrics=done["metrics"] | {"finish_reason": done["finish_reason"]})
        await self.send_json({"type": "done", "message": answer_id, "finish_reason": done["finish_reason"],
                              "html": render_markdown(done["text"]), "experts": done["experts"],
                              "sources": done["sources"], "metrics": done["metrics"]})
