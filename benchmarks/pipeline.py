"""Pipeline benchmark: adapter load times per cache tier and pipeline overhead excluding generation.

    python benchmarks/pipeline.py [--rounds 5] [--queries 40]

Runs against a throw-away data dir (its own SQLite, migrated here) and the real default model.
- cold: adapter read from disk (sha256 check, safetensors read, validation) and installed;
- warm: adapter spec already in RAM, installed into the engine;
- hot:  adapter already resident on the device (pin only);
  plus `Engine.load_adapter(dir)` as the engine's own reference.
- overhead: time from `Pipeline.stream()` start until generation starts (validation, servable
  lookup, routing, context-length check, adapter acquisition), over labelled routing queries with
  four servable rank-8 adapters resident, reported as p50/p95.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = tempfile.mkdtemp(prefix="r3mes-bench-")
os.environ["R3MES_DATA_DIR"] = DATA
os.environ.setdefault("R3MES_MODEL_CACHE_DIR", str(ROOT / "var" / "models"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r3mes_site.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")

import django  # noqa: E402

django.setup()

import torch  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402

torch.set_num_threads(2)

from inference.adapter_cache import AdapterCache, engine_name, file_sha256  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.models import Adapter  # noqa: E402
from inference.pipeline import Options, Pipeline  # noqa: E402
from inference.starters import STARTERS  # noqa: E402


def pct(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def make_adapters(engine, root: Path):
    rows = []
    for i, expert in enumerate(STARTERS):
        directory = root / expert
        engine.new_adapter(f"bench-{expert}", r=8, alpha=16, seed=i)
        engine.save_adapter(f"bench-{expert}", directory)
        engine.unload_adapter(f"bench-{expert}")
        weights = directory / "adapter_model.safetensors"
        rows.append(Adapter.objects.create(expert=expert, version=1, path=str(directory), sha256=file_sha256(weights),
                                           size_bytes=weights.stat().st_size, status=Adapter.Status.APPROVED))
    return rows


def tier_times(engine, rows, rounds):
    times = {"cold (disk)": [], "warm (RAM)": [], "hot (device)": [], "Engine.load_adapter": []}
    for _ in range(rounds):
        for row in rows:
            cache = AdapterCache(engine, 512 * 2**20, 1024 * 2**20)
            name = engine_name(row)
            for label in ("cold (disk)", "hot (device)"):
                started = time.perf_counter()
                cache.acquire([row])
                times[label].append(time.perf_counter() - started)
                cache.release([name])
            engine.unload_adapter(name)  # device copy gone, spec still in RAM
            cache.device_lru.pop(name)
            cache.entries[name].on_device = False
            started = time.perf_counter()
            assert cache.acquire([row]) == {name: "ram"}
            times["warm (RAM)"].append(time.perf_counter() - started)
            cache.release([name])
            engine.unload_adapter(name)
            cache.close()
            started = time.perf_counter()
            engine.load_adapter("ref", row.path)
            times["Engine.load_adapter"].append(time.perf_counter() - started)
            engine.unload_adapter("ref")
    return times


def overhead(engine, queries):
    pipe = Pipeline(engine, AdapterCache(engine, 512 * 2**20, 1024 * 2**20))
    for q in queries[:3]:  # warm-up: semantic model, embeddings, adapters onto the device
        pipe.run([{"role": "user", "content": q}], Options(max_tokens=1, rag=False), None)
    for expert in STARTERS:  # every starter resident, as in steady state
        pipe.cache.acquire([Adapter.servable()[expert]])
        pipe.cache.release([engine_name(Adapter.servable()[expert])])
    values, routing, fast = [], [], 0
    for q in queries:
        result = pipe.run([{"role": "user", "content": q}], Options(max_tokens=1, rag=False), None)
        values.append(result.metrics["overhead_ms"])
        routing.append(result.metrics["routing_ms"])
        fast += result.metrics["fast_path"]
    return values, routing, fast / len(queries), pipe.stats()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=40)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    started = time.perf_counter()
    engine = Engine.load(settings.R3MES_BACKBONE or None, dtype="float32", device="cpu",
                         cache_dir=settings.MODEL_CACHE_DIR)
    print(f"engine {engine.capabilities()['model']} on {engine.device}, loaded in {time.perf_counter() - started:.1f} s")
    rows = make_adapters(engine, Path(DATA) / "adapters")
    print(f"{len(rows)} rank-8 DoRA adapters, {rows[0].size_bytes / 2**20:.1f} MiB each on disk\n")

    times = tier_times(engine, rows, args.rounds)
    hot = statistics.median(times["hot (device)"])
    print(f"{'adapter load':<22} {'p50 ms':>9} {'p95 ms':>9} {'x hot':>9}")
    for label, values in times.items():
        p50 = statistics.median(values) * 1000
        print(f"{label:<22} {p50:>9.3f} {pct(values, 0.95) * 1000:>9.3f} {p50 / (hot * 1000):>9.0f}")

    lines = (ROOT / "tests" / "data" / "routing_queries.jsonl").read_text(encoding="utf-8").splitlines()
    queries = [json.loads(line)["query"] for line in lines if line.strip()][:: max(1, len(lines) // args.queries)]
    values, routing, fast, stats = overhead(engine, queries[: args.queries])
    print(f"\npipeline overhead excluding generation over {len(values)} queries (fast path {fast:.0%}):")
    print(f"  p50 {statistics.median(values):.2f} ms, p95 {pct(values, 0.95):.2f} ms "
          f"(routing p50 {statistics.median(routing):.2f} ms); cache hit rate {stats['cache_hit_rate']:.2f}")


if __name__ == "__main__":
    main()
