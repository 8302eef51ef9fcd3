"""Readiness checks: each returns None when healthy or a short reason when not."""

import asyncio
import time

import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from inference.protocol import ping_worker

from . import metrics


def check_database():
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any driver error means "not ready"; the reason is reported
        return f"database error: {exc}"
    return None


def check_redis():
    try:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
        client.ping()
    except redis.RedisError as exc:
        return f"redis unreachable: {exc}"
    return None


def unapplied_migrations():
    executor = MigrationExecutor(connection)
    return executor.migration_plan(executor.loader.graph.leaf_nodes())


async def check_inference_worker():
    """The worker must answer a ping and report a loaded model; returns (reason, reply)."""
    try:
        reply = await ping_worker(settings.R3MES_WORKER_PING_TIMEOUT)
    except TimeoutError:
        return f"no inference worker answered within {settings.R3MES_WORKER_PING_TIMEOUT} s", None
    except Exception as exc:  # channel layer errors (Redis down) surface as various types
        return f"channel layer error: {type(exc).__name__}: {exc}", None
    if not reply.get("model_loaded"):
        reason = reply.get("load_error") or "model still loading"
        return f"inference worker up but no model loaded ({reason})", reply
    return None, reply


async def run_readiness_checks():
    """Runs all checks concurrently; returns (ok, {check: {"ok", "error", "ms"}}, worker_reply)."""

    async def timed(name, coro):
        started = time.monotonic()
        result = await coro
        elapsed = time.monotonic() - started
        metrics.readiness_check_latency.labels(name).observe(elapsed)
        return name, result, round(elapsed * 1000, 1)

    results = await asyncio.gather(
        timed("database", sync_to_async(check_database, thread_sensitive=True)()),
        timed("redis", sync_to_async(check_redis, thread_sensitive=False)()),
        timed("inference_worker", check_inference_worker()),
    )
    checks, worker = {}, None
    for name, result, ms in results:
        if name == "inference_worker":
            result, worker = result
        checks[name] = {"ok": result is None, "error": result, "ms": ms}
        if result is not None:
            metrics.readiness_check_failures.labels(name).inc()
    return all(c["ok"] for c in checks.values()), checks, worker
