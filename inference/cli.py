import json
import logging
import signal
from pathlib import Path

from channels.layers import get_channel_layer
from channels.routing import get_default_application
from channels.worker import Worker

from django.core.management.base import CommandError

from .protocol import INFERENCE_CHANNEL
from .worker import start_loading, state

log = logging.getLogger(__name__)


def register(subparsers):
    worker = subparsers.add_parser("worker", help="Run the inference worker (holds the model, serves the `inference` channel)")
    worker.set_defaults(handler=run_worker)

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
    def stop(signum, frame):
        # Channels' server exits cleanly on KeyboardInterrupt; SIGTERM (honcho, systemd) gets the same.
        state.draining = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    start_loading()
    log.info("inference worker listening on channel %r", INFERENCE_CHANNEL)
    Worker(
        application=get_default_application(),
        channels=[INFERENCE_CHANNEL],
        channel_layer=get_channel_layer(),
    ).run()
    log.info("inference worker stopped")
