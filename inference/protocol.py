"""The messages the web process and the inference worker exchange over the channel layer.

Requests go to the shared channel `inference`, where any worker may take them; a worker answers
from its own channel name (`worker` in every reply), so follow-ups such as cancels reach the worker
that holds the sequence. Every reply goes to the `reply_channel` the request named.

A generation, as the worker answers it:

    -> {"type": "generate.request", "request_id", "reply_channel", "messages", "options", "user_id", "sent_at"}
    <- {"type": "generate.accepted", "request_id", "worker", "queued": n}
    <- {"type": "generate.tokens", "request_id", "worker", "text": piece, "tokens": n}   (every ~40 ms)
    <- {"type": "generate.heartbeat", "request_id", "worker", "state"}                 (when idle ~1 s)
    <- {"type": "generate.done", "request_id", "worker", "text", "finish_reason", "experts", "sources", "metrics"}
    or {"type": "generate.error", "request_id", "worker", "code", "message"}
    -> {"type": "generate.cancel", "request_id"}   (to the `worker` channel)

`generate()` below is the one client of that exchange; the websocket consumer and the HTTP API
both use it, so they time out, cancel and report errors the same way.
"""

import asyncio
import time
import uuid

from channels.layers import get_channel_layer
from django.conf import settings

from r3mes_site import metrics

INFERENCE_CHANNEL = "inference"

OPTION_TYPES = {
    "max_tokens": int,
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": int,
    "frequency_penalty": (int, float),
    "presence_penalty": (int, float),
    "repetition_penalty": (int, float),
    "seed": int,
    "stop": (str, list),
    "system": str,
    "experts": (list, dict),
    "rag": bool,
    "collections": list,
}


class InvalidRequest(Exception):
    """A request the worker must not see; `param` names the offending field."""

    def __init__(self, message, param=None, code="invalid_request"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class GenerationError(Exception):
    """The worker answered with an error, or none answered in time (code "timeout", "busy", ...)."""

    def __init__(self, code, message, retry_after=None):
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


def _number(options, name, minimum, maximum):
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number", name)
    if not minimum <= value <= maximum:
        raise InvalidRequest(f"{name} must be between {minimum} and {maximum}, got {value}", name)
    return value


def clean_messages(messages):
    """[{role, content}] checked for shape, roles and size; raises InvalidRequest."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > settings.R3MES_MAX_MESSAGES:
        raise InvalidRequest(f"at most {settings.R3MES_MAX_MESSAGES} messages per request", "messages")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequest(f"messages[{i}] must be an object", f"messages[{i}]")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise InvalidRequest(f"messages[{i}].role must be system, user or assistant, got {role!r}",
                                 f"messages[{i}].role")
        if isinstance(content, list):  # OpenAI's content parts: only text parts are understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidRequest(f"messages[{i}].content parts must all be text", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        if len(content) > settings.R3MES_MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"messages[{i}].content has {len(content)} characters; the limit is {settings.R3MES_MAX_PROMPT_CHARS}",
                f"messages[{i}].content", code="message_too_long")
        cleaned.append({"role": role, "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in cleaned):
        raise InvalidRequest("messages must contain a non-empty user message", "messages")
    return cleaned


def clean_options(options, known_experts=None):
    """Generation options checked for type and range; returns a new dict. `known_experts` (a set)
    rejects experts that cannot serve. Raises InvalidRequest naming the field."""
    if not isinstance(options, dict):
        raise InvalidRequest("options must be an object", "options")
    out = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in OPTION_TYPES:
            raise InvalidRequest(f"unknown option {name!r}", name)
        if not isinstance(value, OPTION_TYPES[name]) or (isinstance(value, bool) and name != "rag"):
            raise InvalidRequest(f"{name} has the wrong type ({type(value).__name__})", name)
        out[name] = value
    if "max_tokens" in out:
        _number(out, "max_tokens", 1, settings.R3MES_MAX_NEW_TOKENS)
    if "temperature" in out:
        if out["temperature"] < 0:
            raise InvalidRequest("temperature must be >= 0", "temperature")
        _number(out, "temperature", 0, 2)
    if "top_p" in out:
        _number(out, "top_p", 0, 1)
        if out["top_p"] == 0:
            raise InvalidRequest("top_p must be > 0", "top_p")
    if "top_k" in out:
        _number(out, "top_k", 0, 1000)
    for name in ("frequency_penalty", "presence_penalty"):
        if name in out:
            _number(out, name, -2, 2)
    if "repetition_penalty" in out:
        _number(out, "repetition_penalty", 0, 2)
        if out["repetition_penalty"] == 0:
            raise InvalidRequest("repetition_penalty must be > 0", "repetition_penalty")
    if "seed" in out:
        _number(out, "seed", 0, 2**63 - 1)
    if "stop" in out:
        stop = [out["stop"]] if isinstance(out["stop"], str) else out["stop"]
        if len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 100 for s in stop):
            raise InvalidRequest("stop must be up to 4 non-empty strings of at most 100 characters", "stop")
        out["stop"] = stop
    if "system" in out and len(out["system"]) > settings.R3MES_MAX_PROMPT_CHARS:
        raise InvalidRequest("system prompt is too long", "system")
    if "experts" in out:
        out["experts"] = clean_experts(out["experts"], known_experts)
    if "collections" in out and not all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                        for c in out["collections"]):
        raise InvalidRequest("collections must be a list of collection names or ids", "collections")
    return out


def clean_experts(experts, known=None):
    """A forced expert mix: a list of names (equal weights) or {name: weight}; -> {name: weight}."""
    if isinstance(experts, list):
        if not all(isinstance(e, str) and e for e in experts):
            raise InvalidRequest("experts must be a list of expert names", "experts")
        experts = {e: 1.0 for e in experts}
    mix = {}
    for name, weight in experts.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise InvalidRequest(f"expert weight for {name!r} must be a positive number", "experts")
        mix[name] = float(weight)
    if known is not None:
        unknown = sorted(set(mix) - set(known))
        if unknown:
            have = ", ".join(sorted(known)) or "none"
            raise InvalidRequest(f"unknown or unservable experts: {', '.join(unknown)} (servable: {have})",
                                 "experts", code="unknown_expert")
    if not mix:
        return {}
    total = sum(mix.values())
    return {name: round(weight / total, 6) for name, weight in mix.items()}


async def ask_worker(message_type, timeout, **payload):
    """Sends one request/reply message to any inference worker; returns its reply or raises
    TimeoutError."""
    layer = get_channel_layer()
    reply_channel = await layer.new_channel()  # one prefix per process: channels_redis receives all of them in one pop
    sent_at = time.time()
    await layer.send(INFERENCE_CHANNEL, {"type": message_type, "reply_channel": reply_channel,
                                         "sent_at": sent_at, **payload})
    # A worker that was down leaves older requests queued; their replies went to other channels,
    # so the first reply here is for this request.
    async with asyncio.timeout(timeout):
        reply = await layer.receive(reply_channel)
    reply["round_trip_ms"] = round((time.time() - sent_at) * 1000, 1)
    return reply


async def ping_worker(timeout):
    """Asks any inference worker for its health; returns its reply dict or raises TimeoutError."""
    return await ask_worker("health.ping", timeout)


async def generate(messages, options, *, user_id=None, request_id=None, accept_timeout=None, idle_timeout=None):
    """Runs one generation on some worker; yields the worker's frames (accepted, tokens, done).

    Raises GenerationError on a worker error or when no frame comes in time (the caller turns it
    into an error frame or an HTTP error). Closing the generator early (client Stop, disconnect,
    SSE reader gone) sends `generate.cancel` to the worker holding the sequence, so it stops
    spending compute on it.
    """
    layer = get_channel_layer()
    accept_timeout = accept_timeout or settings.R3MES_WORKER_ACCEPT_TIMEOUT
    idle_timeout = idle_timeout or settings.R3MES_STREAM_IDLE_TIMEOUT
    request_id = request_id or uuid.uuid4().hex
    reply_channel = await layer.new_channel()
    worker = None
    finished = False
    meter = _Meter()
    try:
        for attempt in range(3):  # a draining worker may take the request; send it again for another
            await layer.send(INFERENCE_CHANNEL, {
                "type": "generate.request", "request_id": request_id, "reply_channel": reply_channel,
                "messages": messages, "options": options, "user_id": user_id, "sent_at": time.time(),
                "accept_timeout": accept_timeout,
            })
            frame = await _receive(layer, reply_channel, accept_timeout,
                                   f"no inference worker accepted the request within {accept_timeout:g} s")
            if frame["type"] == "generate.error" and frame.get("code") == "draining" and attempt < 2:
                continue
            break
        while True:
            if frame.get("request_id") != request_id:  # a stale frame of an earlier attempt
                frame = await _receive(layer, reply_channel, idle_timeout, "the inference worker stopped answering")
                continue
            worker = frame.get("worker", worker)
            if frame["type"] == "generate.error":
                finished = True
                raise GenerationError(frame.get("code", "error"), frame.get("message", "generation failed"),
                                      frame.get("retry_after"))
            meter.see(frame)
            if frame["type"] != "generate.heartbeat":
                yield frame
            if frame["type"] == "generate.done":
                finished = True
                return
            frame = await _receive(layer, reply_channel, idle_timeout,
                                   f"the inference worker stopped answering (nothing for {idle_timeout:g} s)")
    finally:
        meter.close()
        if not finished and worker:
            # Runs on Stop, disconnect, timeout: the worker drops the sequence at its next step.
            await asyncio.shield(layer.send(worker, {"type": "generate.cancel", "request_id": request_id}))


class _Meter:
    """Records the Prometheus series of one stream in the web process, as its frames pass."""

    def __init__(self):
        self.started = time.monotonic()
        self.last = None
        self.tokens = 0
        self.state = "waiting"
        metrics.requests_waiting.inc()

    def _move(self, new):
        if self.state == "waiting":
            metrics.requests_waiting.dec()
        elif self.state == "running":
            metrics.requests_running.dec()
        if new == "running":
            metrics.requests_running.inc()
        self.state = new

    def see(self, frame):
        now = time.monotonic()
        if frame["type"] == "generate.tokens":
            new = frame["tokens"] - self.tokens
            if new > 0:
                if self.last is None:
                    metrics.time_to_first_token.observe(now - self.started)
                    self._move("running")
                    new -= 1
                else:
                    # Tokens arrive in batches; spread the gap over the tokens it carried.
                    for _ in range(new):
                        metrics.inter_token_latency.observe((now - self.last) / new)
                metrics.generated_tokens.inc(frame["tokens"] - self.tokens)
                self.tokens, self.last = frame["tokens"], now
        elif frame["type"] == "generate.done":
            extra = frame["metrics"]["completion_tokens"] - self.tokens
            if extra > 0:
                metrics.generated_tokens.inc(extra)
            metrics.request_latency.observe(now - self.started)

    def close(self):
        self._move("closed")


async def _receive(layer, channel, timeout, message):
    try:
        async with asyncio.timeout(timeout):
            return await layer.receive(channel)
    except TimeoutError:
        raise GenerationError("timeout", message) from None
