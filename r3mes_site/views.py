import time

from asgiref.sync import sync_to_async
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from . import health

STARTED_AT = time.time()  # module import: the first request after start-up
_startup_complete = False


def home(request):
    return render(request, "home.html")


def healthz(request):
    """Liveness: 200 while the process serves requests."""
    return JsonResponse({"status": "ok", "uptime_s": round(time.time() - STARTED_AT, 1)})


async def readyz(request):
    """Readiness: 200 only when the database, Redis and an inference worker with a loaded model answer."""
    ok, checks, worker = await health.run_readiness_checks()
    body = {"status": "ready" if ok else "not ready", "checks": checks}
    if worker:
        body["worker"] = {k: worker.get(k) for k in ("worker", "model_loaded", "model", "serving", "backend", "device",
                                                     "round_trip_ms")}
    return JsonResponse(body, status=200 if ok else 503)


async def startupz(request):
    """Startup: 200 once the database is reachable and fully migrated."""
    global _startup_complete
    if not _startup_complete:
        error = await sync_to_async(health.check_database)()
        if error is None:
            pending = await sync_to_async(health.unapplied_migrations)()
            if pending:
                error = f"{len(pending)} migrations not applied; run manage.py migrate"
        if error is not None:
            return JsonResponse({"status": "starting", "error": error}, status=503)
        _startup_complete = True
    return JsonResponse({"status": "started"})


def metrics_view(request):
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)
