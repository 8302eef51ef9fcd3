import _thread
import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from channels.layers import get_channel_layer
from channels.routing import get_default_application
from channels.worker import Worker

from django.core.management.base import CommandError

from .protocol import INFERENCE_CHANNEL
from .worker import drain, start_loading, state

log = logging.getLogger(__name__)


def register(subparsers):
    worker = subparsers.add_parser("worker", help="Run the inference worker (holds the model, serves the `inference` channel)")
    worker.set_defaults(handler=run_worker)
    register_client(subparsers)
    register_feedback(subparsers)

    route = subparsers.add_parser("route", help="Show which experts the hybrid router picks for a query")
    route.add_argument("query", nargs="?", help="The query (or use --file)")
    route.add_argument("--file", help="Route every non-empty line of this file")
    route.add_argument("--json", action="store_true", help="One JSON object per query")
    route.add_argument("--all-experts", action="store_true",
                       help="Gate over every registered expert, servable or not (to measure routing quality)")
    route.set_defaults(handler=run_route)

    experts = subparsers.add_parser("experts", help="List experts; train the starter experts")
    verbs = experts.add_subparsers(dest="experts_verb", required=True)
    verbs.add_parser("list", help="Registered experts and their servable adapter").set_defaults(handler=list_experts)
    train = verbs.add_parser("train-starters", help="Train and approve the starter experts that have no adapter yet")
    train.add_argument("--expert", action="append", help="Only this starter (repeatable)")
    train.add_argument("--steps", type=int, help="Optimiser steps per expert (default R3MES_STARTER_STEPS)")
    train.add_argument("--force", action="store_true", help="Train a new version even if one exists")
    train.set_defaults(handler=run_train_starters)
    register_served_experts(verbs)


def run_route(command, options):
    from .router import hybrid

    if bool(options["query"]) == bool(options["file"]):
        raise CommandError("give either a query or --file, not both or neither")
    if options["file"]:
        path = Path(options["file"])
        if not path.is_file():
            raise CommandError(f"--file {path}: no such file")
        queries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        queries = [options["query"]]
    if any(not q.strip() for q in queries) or not queries:
        raise CommandError("the query is empty")
    for query in queries:
        result = hybrid.route(query.strip(), all_experts=options["all_experts"])
        if options["json"]:
            data = result.as_json()
            command.stdout.write(json.dumps({k: data[k] for k in ("query", "experts", "fast_path", "scores")},
                                            ensure_ascii=False))
        else:
            mix = ", ".join(f"{e} {w:.2f}" for e, w in result.experts) or "(no servable expert: base model)"
            path = "fast path" if result.fast_path else "keyword+semantic"
            command.stdout.write(f"{query}\n  -> {mix}  [{path}, keyword confidence {result.keyword_confidence:.2f},"
                                 f" {result.timings['total_ms']:.1f} ms]")


def list_experts(command, options):
    from .experts import EXPERTS
    from .models import Adapter

    servable = Adapter.servable()
    for expert in EXPERTS.values():
        adapter = servable.get(expert.id)
        state = f"v{adapter.version} approved" if adapter else "no approved adapter"
        command.stdout.write(f"{expert.id:<14} {expert.kind:<9} {state:<22} {expert.description}")


def run_train_starters(command, options):
    from .starters import train_starters

    try:
        adapters = train_starters(options["expert"], options["steps"], options["force"])
    except ValueError as exc:
        raise CommandError(str(exc))
    if not adapters:
        command.stdout.write("all starter experts already have adapters (use --force for new versions)")
    for adapter in adapters:
        command.stdout.write(f"{adapter.expert} v{adapter.version} approved: loss {adapter.metrics['first_loss']:.3f}"
                             f" -> {adapter.metrics['final_loss']:.3f} ({adapter.path})")


def run_worker(command, options):
    from django.conf import settings

    def drain_then_exit():
        drain(settings.R3MES_DRAIN_GRACE_S)
        _thread.interrupt_main()  # Channels' server exits cleanly on KeyboardInterrupt

    def stop(signum, frame):
        # SIGTERM (honcho, systemd): no new requests, running answers get the grace period, the
        # rest end with an error frame; the event loop keeps sending frames meanwhile.
        if not state.draining:
            log.info("draining: %s s grace for running answers", settings.R3MES_DRAIN_GRACE_S)
            state.draining = True
            threading.Thread(target=drain_then_exit, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    start_loading()
    log.info("inference worker listening on channel %r", INFERENCE_CHANNEL)
    Worker(
        application=get_default_application(),
        channels=[INFERENCE_CHANNEL],
        channel_layer=get_channel_layer(),
    ).run()
    log.info("inference worker stopped")
    # Every answer has ended and its frames are out; what is left is the interpreter freeing the
    # model, Inductor's graphs and dynamo's caches: 4-5 s with the compiled default model, past the
    # 5 s that honcho (`make run`'s Ctrl-C) gives before SIGKILL. Skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- Client verbs: talk to a running server over HTTP (playground branch) ------------------------

def register_client(subparsers):
    def connection(parser):
        parser.add_argument("--url", default=None, help="Server URL (env R3MES_URL, default http://127.0.0.1:8000)")
        parser.add_argument("--token", default=None, help="API token (env R3MES_TOKEN)")
        parser.add_argument("--json", action="store_true", help="Print JSON")
        parser.add_argument("--timeout", type=float, default=300)

    def generation(parser):
        parser.add_argument("prompt")
        parser.add_argument("--system", default=None)
        parser.add_argument("--max-tokens", type=int, default=None)
        parser.add_argument("--temperature", type=float, default=None)
        parser.add_argument("--top-p", type=float, default=None)
        parser.add_argument("--top-k", type=int, default=None)
        parser.add_argument("--frequency-penalty", type=float, default=None)
        parser.add_argument("--presence-penalty", type=float, default=None)
        parser.add_argument("--repetition-penalty", type=float, default=None,
                            help="1 = off; the server's default is R3MES_REPETITION_PENALTY")
        parser.add_argument("--seed", type=int, default=None)
        parser.add_argument("--stop", action="append", default=None)
        parser.add_argument("--experts", default=None, help="Force experts, comma-separated")
        parser.add_argument("--rag", action=argparse.BooleanOptionalAction, default=None, help="Use documents")
        parser.add_argument("--collections", default=None, help="RAG collections, comma-separated")

    query = subparsers.add_parser("query", help="Ask the running server once and print the answer")
    connection(query)
    generation(query)
    query.set_defaults(handler=run_query)
    stream = subparsers.add_parser("stream", help="Ask the running server and print the answer as it streams")
    connection(stream)
    generation(stream)
    stream.set_defaults(handler=run_stream)
    stats = subparsers.add_parser("stats", help="Inference worker statistics")
    connection(stats)
    stats.add_argument("--watch", type=float, default=None, metavar="SECONDS", help="Refresh every SECONDS")
    stats.set_defaults(handler=run_stats)
    health = subparsers.add_parser("health", help="Readiness of the running server (database, Redis, worker)")
    connection(health)
    health.set_defaults(handler=run_health)
    metrics = subparsers.add_parser("metrics", help="The server's r3mes_ Prometheus series")
    connection(metrics)
    metrics.add_argument("--watch", type=float, default=None, metavar="SECONDS")
    metrics.add_argument("--all", action="store_true", help="Every series, not only r3mes_")
    metrics.set_defaults(handler=run_metrics)


def register_served_experts(verbs, connection=None):
    served = verbs.add_parser("served", help="Servable experts on a running server (over HTTP)")
    if connection is None:
        served.add_argument("--url", default=None, help="Server URL (env R3MES_URL)")
        served.add_argument("--token", default=None, help="API token (env R3MES_TOKEN)")
        served.add_argument("--json", action="store_true")
        served.add_argument("--timeout", type=float, default=300)
    else:
        connection(served)
    served.set_defaults(handler=run_experts)


def _endpoint(options):
    import os

    url = (options["url"] or os.environ.get("R3MES_URL") or "http://127.0.0.1:8000").rstrip("/")
    token = options.get("token") or os.environ.get("R3MES_TOKEN") or ""
    return url, token


def _request(options, method, path, *, body=None, stream=False, auth=True):
    import requests
    from django.core.management.base import CommandError

    url, token = _endpoint(options)
    headers = {}
    if auth:
        if not token:
            raise CommandError("an API token is needed: pass --token or set R3MES_TOKEN (create one on your profile page)")
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = requests.request(method, url + path, json=body, headers=headers, stream=stream,
                                    timeout=options["timeout"])
    except requests.RequestException as exc:
        raise CommandError(f"cannot reach {url}: {exc}") from None
    if response.status_code >= 400 and path != "/readyz":
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise CommandError(f"{method} {path} failed ({response.status_code}): {message}")
    return response


def _chat_body(options, stream):
    from django.core.management.base import CommandError

    messages = [{"role": "user", "content": options["prompt"]}]
    body = {"model": "r3mes", "messages": messages, "stream": stream}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "frequency_penalty", "presence_penalty",
                 "repetition_penalty"):
        if options[name] is not None:
            body[name] = options[name]
    extensions = {}
    if options["system"]:
        extensions["system"] = options["system"]
    if options["experts"]:
        extensions["experts"] = [e.strip() for e in options["experts"].split(",") if e.strip()]
    if options["rag"] is not None:
        extensions["rag"] = options["rag"]
    if options["collections"]:
        extensions["collections"] = [c.strip() for c in options["collections"].split(",") if c.strip()]
    if extensions:
        body["r3mes"] = extensions
    if not options["prompt"].strip():
        raise CommandError("the prompt is empty")
    return body


def _describe(r3mes):
    metrics = r3mes.get("metrics", {})
    experts = ", ".join(f"{e} {w:.2f}" for e, w in (r3mes.get("experts") or {}).items()) or "none (base model)"
    return (f"experts: {experts} · tokens: {metrics.get('completion_tokens')} · TTFT: {metrics.get('ttft_ms')} ms · "
            f"{metrics.get('tokens_per_s')} tok/s · {metrics.get('backend')} · {metrics.get('weights')}")


def run_query(command, options):
    import json

    reply = _request(options, "POST", "/v1/chat/completions", body=_chat_body(options, False)).json()
    if options["json"]:
        command.stdout.write(json.dumps(reply, indent=2))
        return
    command.stdout.write(reply["choices"][0]["message"]["content"])
    command.stderr.write(_describe(reply.get("r3mes", {})))


def run_stream(command, options):
    import json

    from django.core.management.base import CommandError

    response = _request(options, "POST", "/v1/chat/completions", body=_chat_body(options, True), stream=True)
    last = {}
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise CommandError(f"the stream failed: {chunk['error']['message']}")
        if options["json"]:
            command.stdout.write(json.dumps(chunk))
            continue
        for choice in chunk.get("choices", []):
            piece = choice.get("delta", {}).get("content")
            if piece:
                command.stdout.write(piece, ending="")
                command.stdout.flush()
        last = chunk.get("r3mes", last)
    if not options["json"]:
        command.stdout.write("")
        if last:
            command.stderr.write(_describe(last))


def run_experts(command, options):
    import json

    reply = _request(options, "GET", "/api/inference/experts").json()
    if options["json"]:
        command.stdout.write(json.dumps(reply, indent=2))
        return
    if not reply["experts"]:
        command.stdout.write("No servable experts (no approved adapter yet).")
    for row in reply["experts"]:
        command.stdout.write(f"{row['expert']:<16} v{row['version']:<4} rank {row['rank']:<3} "
                             f"{'resident' if row.get('resident') else 'on disk'}")


def _watch(options, show):
    import time

    while True:
        show()
        if not options["watch"]:
            return
        time.sleep(options["watch"])


def run_stats(command, options):
    import json

    def show():
        reply = _request(options, "GET", "/api/inference/stats").json()
        if options["json"]:
            command.stdout.write(json.dumps(reply))
            return
        command.stdout.write(
            f"model {reply.get('model')} ({reply.get('weights')}, {reply.get('backend')}) · running {reply.get('running')} "
            f"· waiting {reply.get('waiting')} · generated {reply.get('generated_tokens')} tokens · completed "
            f"{reply.get('completed')} · cancelled {reply.get('cancelled')} · failed {reply.get('failed')}")

    _watch(options, show)


def run_health(command, options):
    import json

    from django.core.management.base import CommandError

    reply = _request(options, "GET", "/readyz", auth=False)
    body = reply.json()
    if options["json"]:
        command.stdout.write(json.dumps(body, indent=2))
    else:
        command.stdout.write(body["status"])
        for name, check in body["checks"].items():
            command.stdout.write(f"  {name:<18} {'ok' if check['ok'] else 'FAIL: ' + str(check['error'])} ({check['ms']} ms)")
    if reply.status_code != 200:
        raise CommandError("not ready")


def run_metrics(command, options):
    import json

    from prometheus_client.parser import text_string_to_metric_families

    def show():
        text = _request(options, "GET", "/metrics", auth=False).text
        families = [f for f in text_string_to_metric_families(text) if options["all"] or f.name.startswith("r3mes_")]
        if options["json"]:
            command.stdout.write(json.dumps({f.name: [{"name": s.name, "labels": s.labels, "value": s.value}
                                                      for s in f.samples] for f in families}))
            return
        for family in families:
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
                command.stdout.write(f"{sample.name}{{{labels}}} {sample.value}" if labels else f"{sample.name} {sample.value}")

    _watch(options, show)


# --- Feedback export (playground branch) ----------------------------------------------------------

def register_feedback(subparsers):
    feedback = subparsers.add_parser("feedback", help="Playground feedback")
    verbs = feedback.add_subparsers(dest="feedback_verb", required=True, metavar="ACTION")
    export = verbs.add_parser("export", help="Write corrections and thumbs-up answers as a JSONL training set")
    export.add_argument("--expert", default=None, help="Only feedback on this expert's answers")
    export.add_argument("--out", required=True, help="Output file ('-' for stdout)")
    export.set_defaults(handler=run_feedback_export)


def run_feedback_export(command, options):
    import sys

    from django.core.management.base import CommandError

    from .models import Feedback

    if options["out"] == "-":
        count = Feedback.export_jsonl(sys.stdout, expert=options["expert"])
    else:
        try:
            with open(options["out"], "w", encoding="utf-8") as out:
                count = Feedback.export_jsonl(out, expert=options["expert"])
        except OSError as exc:
            raise CommandError(f"cannot write {options['out']}: {exc.strerror}") from None
    command.stderr.write(f"{count} examples written")
