"""Router benchmark: latency of each stage and routing quality on tests/data/routing_queries.jsonl.

    python benchmarks/router.py [--repeat 3]

Quality: top-1 accuracy (the first expert the router returns, gating over ALL experts so adapters
need not exist) and fast-path rate, for keyword-only, semantic-only and hybrid routing, overall and
per query language. Latency: p50/p95 per mode over the same queries (after one warm-up pass).
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r3mes_site.settings")

import django  # noqa: E402

django.setup()

import torch  # noqa: E402

torch.set_num_threads(2)

from inference.router import hybrid  # noqa: E402

QUERIES = ROOT / "tests" / "data" / "routing_queries.jsonl"


def load(path=QUERIES):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evaluate(rows, mode):
    correct, fast, by_lang, confusion = 0, 0, defaultdict(lambda: [0, 0]), Counter()
    for row in rows:
        result = hybrid.route(row["query"], all_experts=True, max_experts=1, mode=mode)
        ok = result.top == row["expert"]
        correct += ok
        fast += result.fast_path
        by_lang[row["language"]][0] += ok
        by_lang[row["language"]][1] += 1
        if not ok:
            confusion[(row["expert"], result.top)] += 1
    return {
        "top1": correct / len(rows),
        "fast_path_rate": fast / len(rows),
        "by_language": {k: round(v[0] / v[1], 3) for k, v in sorted(by_lang.items())},
        "confusions": confusion.most_common(8),
    }


def latency(rows, mode, repeat):
    times = []
    for _ in range(repeat):
        for row in rows:
            started = time.perf_counter()
            hybrid.route(row["query"], all_experts=True, mode=mode)
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"p50_ms": statistics.median(times), "p95_ms": times[int(len(times) * 0.95)], "n": len(times)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--show-errors", action="store_true")
    args = parser.parse_args()
    rows = load()
    langs = Counter(r["language"] for r in rows)
    print(f"{len(rows)} labelled queries ({dict(langs)}), {len({r['expert'] for r in rows})} experts")
    for row in rows[:5]:  # warm-up: model load and embedding cache
        hybrid.route(row["query"], all_experts=True)
    quality = {mode: evaluate(rows, mode) for mode in hybrid.MODES}
    speed = {mode: latency(rows, mode, args.repeat) for mode in hybrid.MODES}
    print(f"\n{'mode':<10} {'top-1':>7} {'fast path':>10} {'p50 ms':>8} {'p95 ms':>8}   top-1 by language")
    for mode in ("keyword", "semantic", "hybrid"):
        q, s = quality[mode], speed[mode]
        print(f"{mode:<10} {q['top1']:>7.3f} {q['fast_path_rate']:>10.3f} {s['p50_ms']:>8.3f} {s['p95_ms']:>8.3f}   "
              f"{q['by_language']}")
    h = quality["hybrid"]["top1"]
    print(f"\nhybrid / keyword top-1: {h / max(quality['keyword']['top1'], 1e-9):.2f}x, "
          f"hybrid / semantic top-1: {h / max(quality['semantic']['top1'], 1e-9):.2f}x; "
          f"hybrid p50 / semantic p50: {speed['hybrid']['p50_ms'] / speed['semantic']['p50_ms']:.2f}x")
    if args.show_errors:
        for mode in hybrid.MODES:
            print(mode, "most frequent (label, routed) errors:", quality[mode]["confusions"])


if __name__ == "__main__":
    main()
