"""The inference pipeline (seed "Inference Pipeline v3.3"): RAG retrieval → routing → adapter loading
→ generation, with the timings of every stage.

    pipeline = Pipeline(engine)
    result = pipeline.run([{"role": "user", "content": "How do I sort a dict by value?"}], Options(max_tokens=64))
    for piece in pipeline.stream(messages, options, user=user):   # text pieces, then the PipelineResult
        ...

Retrieval comes from the `rag` app, over the collections the user may read; anonymous callers
and users without readable passages get no context (never made-up context). Bad input raises `PipelineError` naming the parameter and,
where there is a fixed set, the valid choices.
"""

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import PermissionDenied

from inference import adapter_cache
from inference.experts import EXPERTS
from inference.router import hybrid
from r3mes_site import metrics

from rag import citations, retrieval


class PipelineError(ValueError):
    def __init__(self, message, param=None, choices=None):
        super().__init__(message)
        self.message, self.param, self.choices = message, param, list(choices) if choices is not None else None


@dataclass
class Options:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    system_prompt: str | None = None
    rag: bool = True
    collections: list | None = None
    rag_top_k: int = 5
    experts: list | dict | None = None  # forced experts: ids (equal weights) or {id: weight}
    stop: tuple = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = field(default_factory=lambda: settings.R3MES_REPETITION_PENALTY)

    def validate(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise PipelineError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if not 0 <= self.temperature <= 2:
            raise PipelineError(f"temperature must be between 0 and 2, got {self.temperature!r}", "temperature")
        if not 0 < self.top_p <= 1:
            raise PipelineError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise PipelineError(f"top_k must be a non-negative integer, got {self.top_k!r}", "top_k")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise PipelineError(f"{name} must be between -2 and 2, got {getattr(self, name)!r}", name)
        if not 0 < self.repetition_penalty <= 2:
            raise PipelineError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}",
                                "repetition_penalty")

    def sampling(self) -> dict:
        """The keyword arguments of Engine.sequence these options set."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed, "stop": self.stop,
                "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                "repetition_penalty": self.repetition_penalty}


@dataclass
class Plan:
    """What `Pipeline.prepare` decided for one request; `finish` turns it into a result."""

    options: Options
    prompt: list  # chat messages with the system prompt, the numbered sources before the question
    mixture: list  # [(expert id, weight)]
    adapters: dict  # engine adapter name -> weight, for engine.sequence
    served: dict  # engine adapter name -> cache tier it came from (pinned until released)
    results: list  # retrieved chunks
    routing: hybrid.RoutingResult | None
    skipped: dict
    timings: dict
    started: float
    overhead_s: float = 0.0
    released: bool = False
    query: str = ""  # the question: attribution does not count the words an answer repeats from it


@dataclass
class PipelineResult:
    text: str
    experts: list  # [(expert id, weight)] actually used
    sources: list  # cited sources (rag.citations.cited_sources), [] without retrieval
    metrics: dict
    routing: hybrid.RoutingResult | None = None
    skipped: dict = field(default_factory=dict)  # expert -> why its adapter was not used (corrupt file)
    finish_reason: str | None = None


def query_of(messages) -> str:
    if not isinstance(messages, list) or not messages:
        raise PipelineError("messages must be a non-empty list of {role, content}", "messages")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant") \
                or not isinstance(message.get("content"), str):
            raise PipelineError("each message needs a role (system, user, assistant) and a string content",
                                "messages", ["system", "user", "assistant"])
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise PipelineError("the query is empty: the last user message has no text", "messages")
    return users[-1].strip()


def forced_mixture(forced, servable: dict) -> list:
    """Validate forced experts ({id: weight} or [ids]) → [(id, weight)] summing to 1."""
    weights = dict(forced) if isinstance(forced, dict) else {e: 1.0 for e in forced}
    if not weights:
        raise PipelineError("experts is empty; leave it out to let the router choose", "experts", sorted(servable))
    unknown = [e for e in weights if e not in EXPERTS]
    if unknown:
        raise PipelineError(f"unknown expert(s): {', '.join(map(str, unknown))}", "experts", list(EXPERTS))
    missing = [e for e in weights if e not in servable]
    if missing:
        raise PipelineError(f"expert(s) without an approved adapter: {', '.join(missing)}", "experts", sorted(servable))
    if any(not isinstance(w, (int, float)) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise PipelineError("expert weights must be non-negative numbers with a positive sum", "experts")
    total = sum(weights.values())
    return [(e, w / total) for e, w in weights.items() if w > 0]


class Pipeline:
    def __init__(self, engine, cache: adapter_cache.AdapterCache | None = None):
        self.engine = engine
        self.cache = cache or adapter_cache.AdapterCache.from_settings(engine)
        self.lock = threading.Lock()
        self.totals = Counter()
        self.expert_usage = Counter()

    def run(self, messages, options: Options | None = None, user=None, cancel=None) -> PipelineResult:
        for item in self.stream(messages, options, user, cancel):
            if isinstance(item, PipelineResult):
                return item
        raise RuntimeError("pipeline stream ended without a result")  # unreachable: stream always ends with one

    def stream(self, messages, options: Options | None = None, user=None, cancel=None):
        """Stages 1–4 for one request in this thread: yields text pieces, then the PipelineResult.
        The inference worker runs `prepare` and `finish` around its own continuous batch instead."""
        plan = self.prepare(messages, options, user)
        pieces, ttft, gen_seconds, seq = [], None, 0.0, None
        try:
            seq = self.engine.sequence(plan.prompt, adapters=plan.adapters or None, cancel=cancel,
                                       **plan.options.sampling())
            from inference.engine.generate import generate

            gen_started = time.perf_counter()
            with self.engine.lock:
                for piece in generate(self.engine.model, self.engine.tokenizer, seq,
                                      self.engine.config.max_seq_len, self.engine.mixture_matrix):
                    if ttft is None:
                        ttft = time.perf_counter() - plan.started
                    pieces.append(piece)
                    yield piece
            gen_seconds = time.perf_counter() - gen_started
        except BaseException:
            self.release(plan)
            raise
        result = self.finish(plan, "".join(pieces), len(seq.output_ids), ttft, gen_seconds, seq.finish_reason)
        metrics.request_latency.observe(result.metrics["total_ms"] / 1000)
        if ttft is not None:
            metrics.time_to_first_token.observe(ttft)
        metrics.generated_tokens.inc(result.metrics["tokens"])
        yield result

    def prepare(self, messages, options: Options | None = None, user=None) -> "Plan":
        """Stages 1–3: validation, retrieval, routing (skipped for forced experts) and adapter loading
        through the tiered cache. The plan holds the cache pins: pass it to `finish` (or `release`)."""
        options = options or Options()
        started = time.perf_counter()
        options.validate()
        query = query_of(messages)
        servable = adapter_servable()
        forced = forced_mixture(options.experts, servable) if options.experts is not None else None
        timings = {"retrieval_ms": 0.0, "routing_ms": 0.0, "adapter_loading_ms": 0.0}

        # Stage 1: retrieval
        results = []
        # Anonymous callers own no collections, so there is nothing to retrieve for them.
        if options.rag and user is not None:
            t = time.perf_counter()
            try:
                results = retrieval.retrieve(query, user, collections=options.collections, top_k=options.rag_top_k)
            except PermissionDenied as exc:
                raise PipelineError(str(exc), "collections") from exc
            timings["retrieval_ms"] = (time.perf_counter() - t) * 1000
        prompt = self._prompt(messages, options, results)
        self._check_length(prompt, options)

        # Stage 2: routing (skipped when the request forces experts)
        routing, skipped = None, {}
        if forced is None:
            t = time.perf_counter()
            routing = hybrid.route(query, servable=set(servable), device=str(self.engine.device))
            timings["routing_ms"] = (time.perf_counter() - t) * 1000
            metrics.router_requests.inc()
            if routing.fast_path:
                metrics.router_fast_path.inc()
            mixture = routing.experts
        else:
            mixture = forced

        # Stage 3: adapters, through the tiered cache; a corrupt one is skipped and routing falls back
        t = time.perf_counter()
        served = {}
        while True:
            rows = [servable[e] for e, _ in mixture]
            try:
                served = self.cache.acquire(rows)
                break
            except adapter_cache.CorruptAdapter as exc:
                bad = next(e for e, _ in mixture if adapter_cache.engine_name(servable[e]) == exc.name)
                skipped[bad] = str(exc)
                if forced is not None:
                    raise PipelineError(f"the adapter of expert {bad!r} failed its checksum and is not loaded",
                                        "experts", sorted(set(servable) - set(skipped))) from exc
                routing = hybrid.route(query, servable=set(servable), device=str(self.engine.device),
                                       exclude=skipped)
                mixture = routing.experts
        timings["adapter_loading_ms"] = (time.perf_counter() - t) * 1000
        if routing is not None:
            self._prefetch(routing, servable, mixture)
        adapters = {adapter_cache.engine_name(servable[e]): w for e, w in mixture}
        return Plan(options, prompt, mixture, adapters, served, results, routing, skipped, timings, started,
                    overhead_s=time.perf_counter() - started, query=query)

    def release(self, plan):
        """Unpins the plan's adapters (idempotent): a cancelled or failed request calls only this."""
        if not plan.released:
            plan.released = True
            self.cache.release(plan.served)

    def finish(self, plan, text, tokens, ttft, gen_seconds, finish_reason) -> PipelineResult:
        """Releases the adapters, keeps the stats and lists the sources the answer cites."""
        self.release(plan)
        total = time.perf_counter() - plan.started
        hits = sum(1 for tier in plan.served.values() if tier != "disk")
        routing = plan.routing
        result_metrics = {
            "total_ms": total * 1000, **plan.timings, "overhead_ms": plan.overhead_s * 1000,
            "time_to_first_token_ms": ttft * 1000 if ttft is not None else None,
            "generation_ms": gen_seconds * 1000, "tokens": tokens,
            "tokens_per_s": tokens / gen_seconds if gen_seconds > 0 else None,
            "fast_path": routing.fast_path if routing else False,
            "keyword_confidence": routing.keyword_confidence if routing else None,
            "routed": routing is not None, "cache_hits": hits, "cache_misses": len(plan.served) - hits,
            "cache_tiers": plan.served, "retrieved": len(plan.results),
            # Which passages the prompt held (all from collections the user may read), best first.
            "retrieved_chunks": [result.chunk_id for result in plan.results],
            "backend": self.engine.capabilities()["backend"],
        }
        self._record(result_metrics, plan.mixture, tokens)
        sources = citations.cited_sources(text, plan.results, plan.query) if plan.results else []
        return PipelineResult(text, plan.mixture, sources, result_metrics, routing, plan.skipped, finish_reason)

    def stats(self) -> dict:
        with self.lock:
            n, routed = self.totals["requests"], self.totals["routed"]
            lookups = self.totals["cache_hits"] + self.totals["cache_misses"]
            return {
                "requests": n,
                "fast_path_rate": self.totals["fast_path"] / routed if routed else None,
                "cache_hit_rate": self.totals["cache_hits"] / lookups if lookups else None,
                "expert_usage": dict(self.expert_usage.most_common()),
                "mean_overhead_ms": self.totals["overhead_ms"] / n if n else None,
                "tokens": self.totals["tokens"],
                "cache": self.cache.stats(),
            }

    # -- helpers -------------------------------------------------------------------------------
    def _prompt(self, messages, options, results) -> list:
        system = [m["content"] for m in messages if m["role"] == "system"]
        if options.system_prompt:
            system.insert(0, options.system_prompt)
        if results:
            system.append(citations.SOURCES_INSTRUCTION)
        chat = citations.with_sources([m for m in messages if m["role"] != "system"], results)
        return ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + chat

    def _check_length(self, prompt, options):
        n = len(self.engine.tokenize(self.engine.render(prompt)))
        context = self.engine.config.max_seq_len
        if n + options.max_tokens > context:
            raise PipelineError(f"the prompt has {n} tokens; with max_tokens={options.max_tokens} it exceeds the "
                                f"context length of {context} tokens", "messages")

    def _prefetch(self, routing, servable, mixture):
        if not settings.R3MES_ADAPTER_PREFETCH:
            return
        chosen = {e for e, _ in mixture}
        ranked = sorted(routing.scores.items(), key=lambda kv: -kv[1])
        nxt = [servable[e] for e, _ in ranked if e in servable and e not in chosen][:2]
        self.cache.prefetch(nxt)

    def _record(self, m, mixture, tokens):
        with self.lock:
            self.totals.update(requests=1, routed=int(m["routed"]), fast_path=int(m["fast_path"]),
                               cache_hits=m["cache_hits"], cache_misses=m["cache_misses"], tokens=tokens)
            self.totals["overhead_ms"] += m["overhead_ms"]
            self.expert_usage.update(e for e, _ in mixture)


def adapter_servable() -> dict:
    from inference.models import Adapter

    return Adapter.servable()
