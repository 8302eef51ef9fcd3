"""The inference worker's process-wide state: the engine (loaded once), the scheduler thread that
batches every running sequence, and the pump that sends their text back.

The channel consumer (inference/consumers.py) delivers messages here; no torch code lives in the
consumer. The model loads in a background thread at start-up so health pings are answered while
it loads (and say so).

Threads and loops: the scheduler thread owns the engine's `Batch` (sequences join and leave
between decode steps) and only appends text to each job under a lock; the pump coroutine on the
worker's event loop sends what accumulated every R3MES_TOKEN_FLUSH_MS, so token pieces travel in
batches and the channel layer is only touched from its own loop.
"""

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from django.conf import settings

log = logging.getLogger(__name__)


class WorkerState:
    def __init__(self):
        self.engine = None
        self.pipeline = None
        self.scheduler = None
        self.load_error = None
        self.loading = False
        self.compiling = False
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
            "weights": caps.get("weights"),
            "serving": caps.get("serving"),
            "compiling": self.compiling,
            "compiled_decode": caps.get("compiled_decode", False),
            "compiled_mixture_rank": caps.get("compiled_mixture_rank", 0),
        }

    def stats(self):
        out = self.health()
        if self.scheduler is not None:
            out.update(self.scheduler.stats())
        if self.pipeline is not None:
            out["pipeline"] = self.pipeline.stats()
        if self.engine is not None:
            caps = self.engine.capabilities()
            out.update({"adapters": caps["adapters"], "dtype": caps["dtype"], "memory": caps["memory"],
                        "context_length": caps["context_length"], "n_params": caps["n_params"]})
        return out


state = WorkerState()


def load_engine():
    """Loads the configured backbone into `state` and starts the scheduler; failures are recorded,
    not raised."""
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
            quant=None if settings.R3MES_QUANT == "none" else settings.R3MES_QUANT,
        )
        from inference.pipeline import Pipeline

        pipeline = Pipeline(engine)
        scheduler = Scheduler(engine, pipeline)
        warm_router()
    except Exception as exc:  # the worker stays up and reports the reason through health pings
        from inference.engine.errors import QuantModeError

        name = f"R3MES_QUANT={settings.R3MES_QUANT}" if isinstance(exc, QuantModeError) else type(exc).__name__
        state.load_error = f"{name}: {exc}"
        log.exception("model failed to load")
    else:
        state.compiling = bool(settings.R3MES_COMPILE)  # so no health reply says loaded and not compiling
        state.engine = engine
        state.pipeline = pipeline
        state.scheduler = scheduler
        scheduler.start()
        state.load_error = None
        log.info("model loaded in %.1f s: %s", time.monotonic() - started, engine.capabilities())
        if settings.R3MES_COMPILE:
            start_compiling(engine)
    finally:
        state.loading = False


def start_compiling(engine):
    """Compile the decode step (Engine.compile_decode) while the scheduler already serves: requests
    decode eagerly until the graphs are in, minutes on a cold Inductor cache, seconds on a warm one
    (the cache lives with the data: use_data_dir_caches)."""
    state.compiling = True

    def run():
        try:
            engine.compile_decode(settings.R3MES_COMPILE_MIXTURE_RANK)  # False (logged) leaves it eager
        except Exception:  # serving goes on eagerly
            log.exception("compiling the decode step failed")
        finally:
            state.compiling = False
            # Inductor's pool of compile processes is not needed again: free it now, not at exit.
            from torch._inductor.async_compile import shutdown_compile_workers

            shutdown_compile_workers()

    thread = threading.Thread(target=run, name="decode-compiler", daemon=True)
    thread.start()
    return thread


def warm_router():
    """Load the router's embedding model and run one query through it before serving: otherwise
    the first request pays for it (2.5 s on a quiet machine here, ~10 s while adapters train)."""
    try:
        from inference.router import semantic

        started = time.monotonic()
        semantic.get_router().route("warm-up")
        log.info("router ready in %.1f s", time.monotonic() - started)
    except Exception:  # routing degrades per request (keyword stage); serving must not wait on it
        log.exception("router warm-up failed")


def use_data_dir_caches():
    """Inductor's compiled graphs live in the data directory ($R3MES_DATA_DIR/cache/inductor), so
    that instances side by side keep their own and a restart finds them. Set before anything
    imports the engine: importing torch._inductor fixes the directory (its default, under /tmp,
    goes into the environment), and a later setdefault would change nothing."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.DATA_DIR / "cache" / "inductor"))


def start_loading():
    use_data_dir_caches()
    thread = threading.Thread(target=load_engine, name="engine-loader", daemon=True)
    thread.start()
    return thread


# --- Requests ------------------------------------------------------------------------------------

class Rejected(Exception):
    """A request this worker will not run; `code` goes into the error frame."""

    def __init__(self, code, message, retry_after=None):
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


@dataclass(eq=False)
class Job:
    request_id: str
    reply_channel: str
    messages: list
    options: dict
    user_id: int | None = None
    received: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    seq: object = None  # the engine's Sequence once admitted
    plan: object = None  # the pipeline's Plan (retrieval, routing, pinned adapters) once admitted
    experts: dict = field(default_factory=dict)
    sources: list = field(default_factory=list)
    pipeline_metrics: dict = field(default_factory=dict)
    pending: str = ""  # text generated but not yet sent
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    last_sent: float = field(default_factory=time.monotonic)
    finish_reason: str | None = None
    error: tuple | None = None  # (code, message)

    @property
    def ended(self):
        return self.finish_reason is not None or self.error is not None


def pipeline_options(options):
    """The worker protocol's option names (inference/protocol.py) as pipeline Options."""
    from inference.pipeline import Options

    collections = options.get("collections") or None
    stop = options.get("stop") or ()
    return Options(
        max_tokens=options.get("max_tokens", settings.R3MES_DEFAULT_MAX_TOKENS),
        temperature=float(options.get("temperature", 0.0)),
        top_p=float(options.get("top_p", 1.0)),
        top_k=int(options.get("top_k", 0)),
        seed=options.get("seed"),
        system_prompt=options.get("system") or None,
        # Retrieval only when asked for (or collections named): sources a 135M model did not need
        # only crowd its context.
        rag=bool(options.get("rag", collections is not None)),
        collections=collections,
        experts=options.get("experts") or None,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        frequency_penalty=float(options.get("frequency_penalty", 0.0)),
        presence_penalty=float(options.get("presence_penalty", 0.0)),
        repetition_penalty=float(options.get("repetition_penalty", settings.R3MES_REPETITION_PENALTY)),
    )


def plan(pipeline, job):
    """Stages 1–3 of the pipeline for a job (retrieval, routing, adapters); generation then runs in
    the scheduler's shared batch. Raises Rejected with the pipeline's reason for bad requests."""
    from django.contrib.auth import get_user_model
    from django.db import close_old_connections

    from inference.pipeline import PipelineError

    User = get_user_model()
    close_old_connections()  # the scheduler thread is long-lived
    user = User.objects.filter(pk=job.user_id, is_active=True).first() if job.user_id else None
    try:
        return pipeline.prepare(list(job.messages), pipeline_options(job.options), user=user)
    except PipelineError as exc:
        choices = f" (valid: {', '.join(map(str, exc.choices))})" if exc.choices else ""
        raise Rejected("invalid_request", exc.message + choices) from exc


class Scheduler:
    """Continuous batching over the engine's `Batch`: requests join between decode steps, each
    step decodes one token for every running sequence in one forward, finished ones leave."""

    def __init__(self, engine, pipeline, max_batch=None, max_queue=None):
        self.engine = engine
        self.pipeline = pipeline
        self.max_batch = max_batch or settings.R3MES_MAX_BATCH
        self.max_queue = settings.R3MES_MAX_QUEUE if max_queue is None else max_queue
        self.batch = engine.new_batch(max_batch=self.max_batch, max_seq_len=settings.R3MES_MAX_SEQ_LEN)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.jobs = {}  # request_id -> Job, from submit until its last frame is sent
        self.incoming = []
        self.stopping = False
        self.thread = None
        self.generated_tokens = 0
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.steps = 0

    def start(self):
        self.thread = threading.Thread(target=self.run, name="scheduler", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping = True
        self.wake.set()

    # -- called from the event loop ----------------------------------------------------------
    def submit(self, job):
        with self.lock:
            if len(self.jobs) >= self.max_batch + self.max_queue:
                raise Rejected("busy", f"all {self.max_batch} batch slots and {self.max_queue} queue places "
                                       "are taken; retry shortly", retry_after=2)
            if job.request_id in self.jobs:
                raise Rejected("duplicate", f"request {job.request_id} is already running")
            self.jobs[job.request_id] = job
            self.incoming.append(job)
        self.wake.set()

    def cancel(self, request_id):
        with self.lock:
            job = self.jobs.get(request_id)
        if job is not None:
            job.cancel.set()
            self.wake.set()
        return job is not None

    def running(self):
        with self.lock:
            return sum(1 for j in self.jobs.values() if j.seq is not None and not j.ended)

    def waiting(self):
        with self.lock:
            return sum(1 for j in self.jobs.values() if j.seq is None and not j.ended)

    def stats(self):
        return {
            "running": self.running(),
            "waiting": self.waiting(),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "generated_tokens": self.generated_tokens,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "failed": self.failed,
            "steps": self.steps,
        }

    def take_frames(self, worker, heartbeat_s):
        """Frames due now: accumulated text, finished answers, heartbeats for quiet jobs."""
        now = time.monotonic()
        frames = []
        with self.lock:
            for job in list(self.jobs.values()):
                if not job.reply_channel:  # a warmup: its caller watches the job itself
                    continue
                base = {"request_id": job.request_id, "worker": worker}
                if job.pending:
                    frames.append((job.reply_channel, {"type": "generate.tokens", **base, "text": job.pending,
                                                       "tokens": job.tokens}))
                    job.pending, job.last_sent = "", now
                if job.error is not None:
                    code, message = job.error
                    frames.append((job.reply_channel, {"type": "generate.error", **base, "code": code,
                                                       "message": message}))
                    del self.jobs[job.request_id]
                elif job.finish_reason is not None:
                    frames.append((job.reply_channel, {"type": "generate.done", **base, **self.summary(job)}))
                    del self.jobs[job.request_id]
                elif now - job.last_sent >= heartbeat_s:
                    frames.append((job.reply_channel, {"type": "generate.heartbeat", **base,
                                                       "state": "running" if job.seq else "waiting"}))
                    job.last_sent = now
        return frames

    def summary(self, job):
        caps = self.engine.capabilities()
        decode_s = (job.last_token_at - job.first_token_at) if job.first_token_at and job.last_token_at else 0
        ttft = (job.first_token_at - job.received) if job.first_token_at else None
        return {
            "text": job.text,
            "finish_reason": job.finish_reason,
            "experts": job.experts,
            "sources": job.sources,
            "metrics": {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": job.tokens,
                "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None,
                "total_ms": round((time.monotonic() - job.received) * 1000, 1),
                "tokens_per_s": round((job.tokens - 1) / decode_s, 2) if decode_s > 0 and job.tokens > 1 else None,
                "backend": caps["backend"],
                "device": caps["device"],
                "model": caps["model"],
                "weights": caps["weights"],
                "serving": caps["serving"],
                "rag": bool(job.plan and job.plan.options.rag),
                "routing": ("forced" if job.options.get("experts") else
                            "fast path" if job.pipeline_metrics.get("fast_path") else "hybrid"),
                **job.pipeline_metrics,
            },
        }

    # -- the scheduler thread ----------------------------------------------------------------
    def run(self):
        while not self.stopping:
            self._admit()
            if not len(self.batch):
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                outputs = self.batch.step()  # under the engine's lock: adapter swaps never race a forward
            except Exception as exc:  # a failed forward ends every sequence in it, with the reason
                log.exception("decode step failed")
                self._fail_all("engine_error", f"{type(exc).__name__}: {exc}")
                continue
            self.steps += 1
            now = time.monotonic()
            ended = []
            with self.lock:
                for out in outputs:
                    job = out.seq.job
                    if out.token is not None:
                        job.tokens = len(out.seq.output_ids)  # the end-of-sequence token is not text
                        job.first_token_at = job.first_token_at or now
                        job.last_token_at = now
                    if out.piece:
                        job.pending += out.piece
                        job.text += out.piece
                    if out.finished and job.error is None:  # a failed job already has its frame
                        ended.append((job, out.seq.finish_reason))
                self.generated_tokens += sum(1 for o in outputs if o.token is not None)
            for job, reason in ended:
                self._finish(job, reason)

    def _admit(self):
        from inference.engine import EngineError

        with self.lock:
            incoming, self.incoming = self.incoming, []
        for job in incoming:
            if job.cancel.is_set():
                with self.lock:
                    job.finish_reason = "cancelled"
                self.cancelled += 1
                continue
            plan_ = None
            try:
                plan_ = plan(self.pipeline, job)
                opts = plan_.options
                seq = self.engine.sequence(plan_.prompt, adapters=plan_.adapters or None, cancel=job.cancel,
                                           **opts.sampling())
                seq.job = job
                self.batch.add(seq)
            except Rejected as exc:
                self._fail(job, exc.code, exc.message, plan_)
            except EngineError as exc:  # context too long, bad adapter mix: the client's request
                self._fail(job, "invalid_request", str(exc), plan_)
            except Exception as exc:  # anything else is ours; the client still hears why
                log.exception("admitting %s failed", job.request_id)
                self._fail(job, "engine_error", f"{type(exc).__name__}: {exc}", plan_)
            else:
                with self.lock:
                    job.seq, job.plan = seq, plan_
                    job.experts = {expert: round(weight, 4) for expert, weight in plan_.mixture}
                    job.prompt_tokens = len(seq.prompt_ids)

    def _finish(self, job, reason):
        """The pipeline's last stage for an ended sequence (unpin adapters, cite sources, stats);
        the finish reason is set last, so the done frame already carries the sources."""
        sources, extra = [], {}
        if reason == "cancelled":
            self.pipeline.release(job.plan)
            self.cancelled += 1
        else:
            ttft = (job.first_token_at - job.received) if job.first_token_at else None
            gen_s = (job.last_token_at - job.first_token_at) if job.first_token_at and job.last_token_at else 0.0
            try:
                result = self.pipeline.finish(job.plan, job.text, job.tokens, ttft, gen_s, reason)
                sources = result.sources
                extra = {k: result.metrics[k] for k in (
                    "retrieval_ms", "routing_ms", "adapter_loading_ms", "fast_path", "keyword_confidence",
                    "cache_hits", "cache_misses", "retrieved", "retrieved_chunks")}
            except Exception:  # the answer stands; only its sources and stats are lost
                log.exception("finishing %s failed", job.request_id)
                self.pipeline.release(job.plan)
            self.completed += 1
        with self.lock:
            job.sources, job.pipeline_metrics = sources, extra
            job.finish_reason = reason

    def _fail(self, job, code, message, plan_=None):
        plan_ = plan_ or job.plan
        if plan_ is not None:
            self.pipeline.release(plan_)
        with self.lock:
            job.error = (code, message)
        self.failed += 1

    def _fail_all(self, code, message):
        with self.lock:
            jobs = [j for j in self.jobs.values() if not j.ended]
        for job in jobs:
            job.cancel.set()
            self._fail(job, code, message)
        # The batch still holds the sequences; a step with every one cancelled frees their slots.
        try:
            self.batch.step()
        except Exception:  # the batch is beyond repair: start a fresh one
            log.exception("resetting the batch")
            self.batch = self.engine.new_batch(max_batch=self.max_batch, max_seq_len=settings.R3MES_MAX_SEQ_LEN)

    def end_all(self, code, message):
        """Ends every unfinished job with an error frame (drain grace period is over). Called from
        the drain thread, so it only flags the jobs; the scheduler's next step frees their slots."""
        with self.lock:
            jobs = [j for j in self.jobs.values() if not j.ended]
        for job in jobs:
            job.cancel.set()
            self._fail(job, code, message)
        self.wake.set()


async def pump(layer, worker):
    """Sends accumulated frames every R3MES_TOKEN_FLUSH_MS until the scheduler is gone."""
    interval = settings.R3MES_TOKEN_FLUSH_MS / 1000
    while True:
        scheduler = state.scheduler
        if scheduler is not None:
            for channel, frame in scheduler.take_frames(worker, settings.R3MES_HEARTBEAT_S):
                try:
                    await layer.send(channel, frame)
                except Exception as exc:  # the client's channel is full or gone: stop generating for it
                    log.warning("cannot reach %s (%s); cancelling %s", channel, exc, frame["request_id"])
                    scheduler.cancel(frame["request_id"])
                if frame["type"] == "generate.done":
                    _record_done(frame)
        await asyncio.sleep(interval)


def _record_done(frame):
    log.info("request %s %s: %s tokens, ttft %s ms, %s tok/s", frame["request_id"], frame["finish_reason"],
             frame["metrics"]["completion_tokens"], frame["metrics"]["ttft_ms"], frame["metrics"]["tokens_per_s"])


def accept(message, worker):
    """Validates a generate.request and hands it to the scheduler; returns the `accepted` frame.
    Raises Rejected (busy, draining, stale, loading)."""
    if state.draining:
        raise Rejected("draining", "this worker is shutting down; retry")
    if state.scheduler is None:
        raise Rejected("loading" if state.load_error is None else "model_unavailable",
                       "the model is still loading; retry shortly" if state.load_error is None
                       else f"the model failed to load: {state.load_error}", retry_after=5)
    # A request older than its own accept timeout was given up by its client (the worker was
    # down when it was sent); running it would spend compute on nobody.
    if time.time() - message.get("sent_at", time.time()) > message.get("accept_timeout", 30) + 1:
        raise Rejected("stale", "request expired before a worker took it")
    job = Job(message["request_id"], message["reply_channel"], message["messages"], message.get("options") or {},
              user_id=message.get("user_id"))
    state.scheduler.submit(job)
    return {"type": "generate.accepted", "request_id": job.request_id, "worker": worker,
            "queued": state.scheduler.waiting()}


def drain(grace_s):
    """SIGTERM: stop taking requests, give running ones `grace_s` to finish, end the rest with an
    error frame; returns once their last frames have had time to leave."""
    state.draining = True
    scheduler = state.scheduler
    if scheduler is None:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        with scheduler.lock:
            if not scheduler.jobs:
                break
        time.sleep(0.1)
    else:
        scheduler.end_all("shutdown", "the inference worker shut down before the answer finished")
    flush_deadline = time.monotonic() + 2
    while time.monotonic() < flush_deadline:
        with scheduler.lock:
            if not scheduler.jobs:
                break
        time.sleep(0.05)
    scheduler.stop()
    if scheduler.thread is not None:
        # Exiting while a forward runs in the (daemon) scheduler thread aborts the interpreter.
        scheduler.thread.join(timeout=30)


def warmup():
    """One short generation through the batch (the first forward pays for allocation)."""
    job = Job("warmup-" + os.urandom(4).hex(), "", [{"role": "user", "content": "Hi"}], {"max_tokens": 2})
    started = time.monotonic()
    state.scheduler.submit(job)
    while not job.ended and time.monotonic() - started < 60:
        time.sleep(0.05)
    with state.scheduler.lock:  # nobody listens for a warmup's frames
        state.scheduler.jobs.pop(job.request_id, None)
    return {"ok": job.finish_reason is not None, "ms": round((time.monotonic() - started) * 1000, 1),
            "error": job.error[1] if job.error else None}


def preload(experts):
    """Brings the servable adapters of `experts` onto the device through the pipeline's tiered
    cache; returns {expert: "loaded from <tier>" | reason}."""
    from inference.adapter_cache import CorruptAdapter

    from .models import Adapter

    servable = Adapter.servable()
    cache = state.pipeline.cache
    out = {}
    for name in experts:
        adapter = servable.get(name)
        if adapter is None:
            out[name] = "no approved adapter"
            continue
        try:
            served = cache.acquire([adapter])
        except CorruptAdapter as exc:
            out[name] = f"refused: {exc}"
            continue
        except Exception as exc:  # a broken adapter is reported, not fatal
            out[name] = f"{type(exc).__name__}: {exc}"
            continue
        cache.release(served)
        out[name] = "loaded from " + ", ".join(sorted(set(served.values())))
    return out