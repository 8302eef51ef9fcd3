"""The bearer-token HTTP API: OpenAI-compatible chat completions and models, plus R3MES's
inference endpoints. Async views: they talk to the worker through the channel layer exactly like
the chat websocket (inference.protocol.generate), and stream SSE under Daphne."""

import functools
import json
import time
import uuid

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from r3mes_site.api import ApiError, authenticate_bearer, json_error, parse_json, take_token

from . import protocol
from .chat import servable_experts
from .protocol import GenerationError, InvalidRequest

MODEL_ID = "r3mes"

# OpenAI request fields we accept (and their JSON types); anything else is a 400, so typos surface.
CHAT_FIELDS = {
    "model": str, "messages": list, "max_tokens": int, "max_completion_tokens": int, "temperature": (int, float),
    "top_p": (int, float), "stop": (str, list), "seed": int, "stream": bool, "n": int, "user": str,
    "stream_options": dict, "r3mes": dict, "top_k": int, "presence_penalty": (int, float),
    "frequency_penalty": (int, float), "repetition_penalty": (int, float),
}
R3MES_FIELDS = {"experts": (list, dict), "rag": bool, "collections": list, "system": str}


def async_api_view(methods, rate_scope="api"):
    """The async twin of r3mes_site.api's api_view + api_token_required + rate_limited: method
    check, bearer auth, per-user token bucket, ApiError -> OpenAI error shape."""

    def decorator(view):
        @functools.wraps(view)
        async def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                return json_error(405, f"Method {request.method} not allowed; use {', '.join(methods)}",
                                  headers={"Allow": ", ".join(methods)})
            try:
                await sync_to_async(authenticate_bearer)(request)
                allowed, retry_after = await sync_to_async(take_token, thread_sensitive=False)(
                    rate_scope, request.user.pk, *settings.R3MES_RATE_API)
                if not allowed:
                    raise ApiError(429, f"Rate limit exceeded; retry after {retry_after} s",
                                   code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)})
                return await view(request, *args, **kwargs)
            except ApiError as exc:
                return json_error(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)
            except InvalidRequest as exc:
                return json_error(400, exc.message, param=exc.param, code=exc.code)
            except GenerationError as exc:
                return generation_error_response(exc)

        return csrf_exempt(wrapper)

    return decorator


def generation_error_response(exc):
    if exc.code in ("busy", "draining", "loading"):
        return json_error(503, exc.message, code=exc.code, headers={"Retry-After": str(exc.retry_after or 2)})
    if exc.code in ("invalid_request", "unknown_expert"):
        return json_error(400, exc.message, code=exc.code)
    if exc.code == "timeout":
        return json_error(503, exc.message, code="worker_timeout", headers={"Retry-After": "5"})
    return json_error(500, exc.message, code=exc.code)


def check_chat_request(body, known_experts):
    """Validates an OpenAI chat request; returns (messages, options, stream, include_usage)."""
    for name, value in body.items():
        if name not in CHAT_FIELDS:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", name)
        if value is not None and (not isinstance(value, CHAT_FIELDS[name])
                                  or isinstance(value, bool) and CHAT_FIELDS[name] is not bool):
            raise InvalidRequest(f"{name} has the wrong type ({type(value).__name__})", name)
    model = body.get("model")
    if model is not None and model != MODEL_ID:
        raise ApiError(400, f"The model {model!r} does not exist; GET /v1/models lists {MODEL_ID!r}",
                       param="model", code="model_not_found")
    if body.get("n") not in (None, 1):
        raise InvalidRequest("only n=1 is supported", "n")
    messages = protocol.clean_messages(body.get("messages"))
    options = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        options["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "stop", "seed", "top_k", "frequency_penalty", "presence_penalty",
                 "repetition_penalty"):
        if body.get(name) is not None:
            options[name] = body[name]
    extensions = body.get("r3mes") or {}
    for name, value in extensions.items():
        if name not in R3MES_FIELDS:
            raise InvalidRequest(f"Unrecognized r3mes extension: {name}", f"r3mes.{name}")
        options[name] = value
    options = protocol.clean_options(options, known_experts=known_experts)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    return messages, options, bool(body.get("stream")), include_usage


def r3mes_block(done):
    return {"experts": done["experts"], "sources": done["sources"], "metrics": done["metrics"]}


def usage(done):
    m = done["metrics"]
    return {"prompt_tokens": m["prompt_tokens"], "completion_tokens": m["completion_tokens"],
            "total_tokens": m["prompt_tokens"] + m["completion_tokens"]}


def finish_reason(done):
    return "length" if done["finish_reason"] == "length" else "stop"


@async_api_view(["POST"])
async def chat_completions(request):
    body = parse_json(request)
    known = await sync_to_async(servable_experts)()
    messages, options, stream, include_usage = check_chat_request(body, known)
    completion_id = "chatcmpl-" + uuid.uuid4().hex
    created = int(time.time())
    frames = protocol.generate(messages, options, user_id=request.user.pk)
    # The first frame (accepted, or an error) arrives before any byte is sent, so a busy or
    # absent worker becomes an HTTP error, not a broken stream.
    first = await anext(frames)
    if not stream:
        text, done = "", None
        frame = first
        while True:
            if frame["type"] == "generate.done":
                done = frame
                break
            frame = await anext(frames)
        return JsonResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": MODEL_ID,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]},
                         "finish_reason": finish_reason(done), "logprobs": None}],
            "usage": usage(done), "r3mes": r3mes_block(done),
        })
    return StreamingHttpResponse(sse(frames, first, completion_id, created, include_usage),
                                 content_type="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                            "X-Accel-Buffering": "no"})


async def sse(frames, first, completion_id, created, include_usage):
    def chunk(delta, reason=None, **extra):
        return "data: " + json.dumps({
            "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}], **extra,
        }) + "\n\n"

    yield chunk({"role": "assistant", "content": ""})
    frame = first
    try:
        while True:
            if frame["type"] == "generate.tokens":
                yield chunk({"content": frame["text"]})
            elif frame["type"] == "generate.done":
                yield chunk({}, finish_reason(frame), r3mes=r3mes_block(frame))
                if include_usage:
                    yield "data: " + json.dumps({"id": completion_id, "object": "chat.completion.chunk",
                                                 "created": created, "model": MODEL_ID, "choices": [],
                                                 "usage": usage(frame)}) + "\n\n"
                break
            frame = await anext(frames)
    except GenerationError as exc:
        yield "data: " + json.dumps({"error": {"message": exc.message, "type": "server_error", "param": None,
                                               "code": exc.code}}) + "\n\n"
    finally:
        await frames.aclose()  # the reader left early: cancel the sequence in the worker
    yield "data: [DONE]\n\n"


@async_api_view(["GET"])
async def models(request):
    ready = await _worker_health()
    return JsonResponse({"object": "list", "data": [{
        "id": MODEL_ID, "object": "model", "created": 0, "owned_by": "r3mes",
        "r3mes": {"backbone": ready.get("model"), "weights": ready.get("weights"), "serving": ready.get("serving"),
                  "backend": ready.get("backend"),
                  "experts": sorted(await sync_to_async(servable_experts)())},
    }]})


async def _worker_health():
    try:
        return await protocol.ping_worker(settings.R3MES_WORKER_PING_TIMEOUT)
    except TimeoutError:
        return {}


async def _ask(message_type, timeout, **payload):
    try:
        return await protocol.ask_worker(message_type, timeout, **payload)
    except TimeoutError:
        raise ApiError(503, f"no inference worker answered within {timeout:g} s", code="worker_timeout",
                       headers={"Retry-After": "5"}) from None


def _experts_table():
    from .models import Adapter

    servable = Adapter.servable()
    return [{"expert": name, "version": a.version, "rank": a.rank, "alpha": a.alpha, "size_bytes": a.size_bytes,
             "sha256": a.sha256, "approved_at": a.approved_at.isoformat() if a.approved_at else None}
            for name, a in sorted(servable.items())]


@async_api_view(["GET"])
async def experts(request):
    table = await sync_to_async(_experts_table)()
    try:  # which adapters the worker holds in memory; the list itself needs no worker
        reply = await protocol.ask_worker("inference.stats", settings.R3MES_WORKER_PING_TIMEOUT)
        resident = set(reply.get("adapters", []))
    except TimeoutError:
        resident = set()
    for row in table:  # resident under the adapter cache's per-version name
        row["resident"] = f"{row['expert']}-v{row['version']}" in resident
    return JsonResponse({"experts": table, "total": len(table)})


@async_api_view(["GET"])
async def stats(request):
    reply = await _ask("inference.stats", settings.R3MES_WORKER_PING_TIMEOUT)
    reply.pop("type", None)
    reply.pop("reply_channel", None)
    return JsonResponse(reply)


@async_api_view(["POST"])
async def warmup(request):
    reply = await _ask("inference.warmup", 60)
    reply.pop("type", None)
    return JsonResponse(reply, status=200 if reply.get("ok") else 503)


@async_api_view(["POST"])
async def preload(request):
    body = parse_json(request)
    names = body.get("experts")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ApiError(400, "experts must be a non-empty list of expert names", param="experts")
    unknown = sorted(set(names) - await sync_to_async(servable_experts)())
    if unknown:
        raise ApiError(400, f"unknown or unservable experts: {', '.join(unknown)}", param="experts",
                       code="unknown_expert")
    reply = await _ask("adapters.preload", 60, experts=names)
    reply.pop("type", None)
    return JsonResponse(reply)
