"""Helpers and decorators shared by the JSON API views.

Errors use the OpenAI error shape everywhere, so one client-side handler fits every endpoint:
{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}.
"""

import functools
import json
import logging
import math
import time

from django.conf import settings
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """Raised inside an API view to answer with a JSON error."""

    def __init__(self, status, message, *, param=None, code=None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def json_error(status, message, *, param=None, code=None, headers=None):
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "api_error"),
            "param": param,
            "code": code,
        }
    }
    response = JsonResponse(body, status=status)
    for key, value in (headers or {}).items():
        response[key] = value
    return response


def parse_json(request):
    """The request body as a JSON object, or ApiError(400) saying what is wrong with it."""
    if request.content_type not in ("application/json", ""):
        raise ApiError(415, f"Content-Type must be application/json, got {request.content_type!r}")
    try:
        body = json.loads(request.body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The JSON body must be an object")
    return body


def api_view(methods):
    """Marks a JSON API view: allowed methods, CSRF-exempt (bearer auth, no cookies), ApiError
    turned into a JSON error response."""

    def decorator(view):
        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                return json_error(
                    405,
                    f"Method {request.method} not allowed; use {', '.join(methods)}",
                    headers={"Allow": ", ".join(methods)},
                )
            try:
                return view(request, *args, **kwargs)
            except ApiError as exc:
                return json_error(exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers)

        return csrf_exempt(wrapper)

    return decorator


def authenticate_bearer(request):
    """The user of a valid `Authorization: Bearer <token>` header, or ApiError(401)."""
    from governance.models import ApiToken

    header = request.headers.get("Authorization", "")
    if not header:
        raise ApiError(401, "Missing Authorization header; send 'Authorization: Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    scheme, _, raw = header.partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise ApiError(401, "Malformed Authorization header; expected 'Bearer <token>'",
                       headers={"WWW-Authenticate": "Bearer"})
    token = ApiToken.authenticate(raw.strip())
    if token is None:
        raise ApiError(401, "Invalid or revoked API token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    request.user = token.user
    request.api_token = token
    return token.user


def api_token_required(view):
    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        authenticate_bearer(request)
        return view(request, *args, **kwargs)

    return wrapper


# --- Rate limits: a token bucket per (scope, user) in Redis ------------------------------------

_BUCKET_SCRIPT = """
local key = KEYS[1]
local capacity = tonumber(ARGV[1])
local refill = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', key, 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + (now - ts) * refill)
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = (1 - tokens) / refill
end
redis.call('HSET', key, 'tokens', tokens, 'ts', now)
redis.call('EXPIRE', key, math.ceil(capacity / refill) + 1)
return {allowed, tostring(wait)}
"""

_redis_client = None


def redis_client():
    global _redis_client
    if _redis_client is None:
        import redis

        _redis_client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
    return _redis_client


def take_token(scope, identity, capacity, per_seconds):
    """Takes one token from the bucket; returns (allowed, retry_after_seconds).

    `capacity` requests per `per_seconds`, refilled continuously. If Redis is unreachable the
    request is let through (and logged): an outage of the limiter must not take the site down."""
    import redis

    refill = capacity / per_seconds
    try:
        allowed, wait = redis_client().eval(
            _BUCKET_SCRIPT, 1, f"r3mes:rl:{scope}:{identity}", capacity, refill, time.time()
        )
    except redis.RedisError as exc:
        log.warning("rate limiter unavailable, letting request through: %s", exc)
        return True, 0
    return bool(allowed), max(1, math.ceil(float(wait))) if not allowed else 0


def rate_limited(scope, setting):
    """Per-user token bucket for an API view; `setting` names a (capacity, per_seconds) setting.
    Must sit under @api_token_required (it needs request.user)."""

    def decorator(view):
        @functools.wraps(view)
        def wrapper(request, *args, **kwargs):
            capacity, per_seconds = getattr(settings, setting)
            identity = request.user.pk if request.user.is_authenticated else request.META.get("REMOTE_ADDR", "anon")
            allowed, retry_after = take_token(scope, identity, capacity, per_seconds)
            if not allowed:
                raise ApiError(429, f"Rate limit exceeded for {scope}; retry after {retry_after} s",
                               headers={"Retry-After": str(retry_after)})
            return view(request, *args, **kwargs)

        return wrapper

    return decorator
