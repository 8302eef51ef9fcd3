"""The inference worker's process-wide state: the engine, loaded once, and what it reports.

The channel consumer (inference/consumers.py) delivers messages here; no torch code lives in the
consumer. The model loads in a background thread at start-up so health pings are answered while
it loads (and say so).
"""

import logging
import os
import threading
import time

from django.conf import settings

log = logging.getLogger(__name__)


class WorkerState:
    def __init__(self):
        self.engine = None
        self.load_error = None
        self.loading = False
        self.started_at = time.time()
        self.draining = False
        self.lock = threading.Lock()

    @property
    def model_loaded(self):
        return self.engine is not None

    def health(self):
        caps = self.engine.capabilities() if self.engine is not None else {}
        return {
            "model_loaded": self.model_loaded,
            "loading": self.loading,
            "load_error": self.load_error,
            "draining": self.draining,
            "uptime_s": round(time.time() - self.started_at, 1),
            "pid": os.getpid(),
            "model": caps.get("model"),
            "backend": caps.get("backend"),
            "device": caps.get("device"),
        }


state = WorkerState()


def load_engine():
    """Loads the configured backbone into `state`; failures are recorded, not raised."""
    state.loading = True
    started = time.monotonic()
    try:
        import torch

        if settings.R3MES_TORCH_THREADS:
            torch.set_num_threads(settings.R3MES_TORCH_THREADS)
        from inference.engine import Engine

        device = None if settings.R3MES_DEVICE == "auto" else settings.R3MES_DEVICE
        engine = Engine.load(
            settings.R3MES_BACKBONE or None,
            dtype=settings.R3MES_DTYPE,
            device=device,
            cache_dir=settings.MODEL_CACHE_DIR,
        )
    except Exception as exc:  # the worker stays up and reports the reason through health pings
        state.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("model failed to load")
    else:
        state.engine = engine
        state.load_error = None
        log.info("model loaded in %.1f s: %s", time.monotonic() - started, engine.capabilities())
    finally:
        state.loading = False


def start_loading():
    thread = threading.Thread(target=load_engine, name="engine-loader", daemon=True)
    thread.start()
    return thread
