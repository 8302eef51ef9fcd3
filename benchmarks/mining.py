"""Mining benchmarks: shard training speed on CPU, aggregation time, robustness to poisoning.

    python benchmarks/mining.py [--threads 2] [--shards 5] [--steps 8] [--sizes 10,50,200]

1. Training: steps/s (and tokens/s) of the engine's DoRA trainer for one shard on CPU.
2. Aggregation time of each method for 10, 50, 200 synthetic submissions with SmolLM2-135M
   shapes (q_proj 576x576 and v_proj 192x576 of 2 layers, rank 8; time grows linearly with modules).
3. Robustness: `--shards` honest adapters trained for real on shards of a small dataset; 20% of
   the submissions replaced by poisoned ones (scaled x10, sign-flipped, random); the aggregated
   adapter's held-out eval loss relative to the honest-only mean, per method — with the norm
   pre-filter (the default pipeline) and without it (the method alone).
"""

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r3mes_site.settings")

import django  # noqa: E402

django.setup()

import torch  # noqa: E402

from inference.engine import Engine  # noqa: E402
from inference.engine.train import TrainConfig, train_dora  # noqa: E402
from mining import aggregation, training  # noqa: E402
from mining.models import Round  # noqa: E402

METHODS = list(aggregation.METHODS)
TARGETS = ("q_proj", "v_proj")


def dataset(n=72, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        rows.append({"instruction": f"Add {a} and {b}.", "response": f"Result: {a} + {b} = {a + b}. Done."})
    return rows


def synthetic(n, rank=8, layers=2, seed=0):
    """n submissions around a shared update, plus the base adapter they started from (returned first)."""
    shapes = {}
    for layer in range(layers):
        shapes[f"model.layers.{layer}.self_attn.q_proj"] = (576, 576)
        shapes[f"model.layers.{layer}.self_attn.v_proj"] = (192, 576)
    gen = torch.Generator().manual_seed(seed)
    centre = {k: (torch.randn(rank, i, generator=gen) * 0.02, torch.randn(o, rank, generator=gen) * 0.02)
              for k, (o, i) in shapes.items()}
    base = {}
    for k, (o, i) in shapes.items():
        base[f"base_model.model.{k}.lora_A.weight"] = centre[k][0]
        base[f"base_model.model.{k}.lora_B.weight"] = torch.zeros(o, rank)
        base[f"base_model.model.{k}.lora_magnitude_vector"] = torch.ones(o)
    out = [(base, 2.0)]
    for _ in range(n):
        state = {}
        for k, (o, i) in shapes.items():
            A, B = centre[k]
            state[f"base_model.model.{k}.lora_A.weight"] = A + torch.randn(rank, i, generator=gen) * 0.002
            state[f"base_model.model.{k}.lora_B.weight"] = B + torch.randn(o, rank, generator=gen) * 0.002
            state[f"base_model.model.{k}.lora_magnitude_vector"] = 1 + torch.randn(o, generator=gen) * 0.01
        out.append((state, 2.0))
    return out


def poison(state, base, kind, gen):
    """Poison in update space (relative to the base adapter, whose B is 0)."""
    out = {}
    for key, t in state.items():
        b = base[key]
        if kind == "scaled":
            out[key] = t * 10 if "lora_B" in key else (b + 10 * (t - b) if "magnitude" in key else t)
        elif kind == "sign_flipped":
            out[key] = -t if "lora_B" in key else (b - (t - b) if "magnitude" in key else t)
        else:  # random: Gaussian noise of 5x the honest tensor's spread
            out[key] = (torch.randn(t.shape, generator=gen) * float((t - b).std()) * 5 + b) if "lora_A" not in key else t
    return out


def eval_state(engine, state, report_or_config, examples, name="bench-eval"):
    if isinstance(report_or_config, dict):
        config = report_or_config
    else:
        config = training.peft_config(report_or_config.rank, report_or_config.alpha, TARGETS)
    return training.eval_packed(engine, training.pack(state, config), examples, name)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--agg-threads", type=int, default=1, help="torch threads for the aggregation timings")
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sizes", default="10,50,200")
    parser.add_argument("--skip-robustness", action="store_true")
    parser.add_argument("--reuse", help="directory of an earlier run (base/, s0/…): skip training, reuse its shards")
    parser.add_argument("--skip-timings", action="store_true", help="skip the aggregation timings")
    args = parser.parse_args()
    torch.set_num_threads(args.agg_threads)
    from django.conf import settings

    print(f"# mining benchmark: torch {torch.__version__}, CPU, {args.threads} threads for the engine, "
          f"{args.agg_threads} for aggregation timings")

    # 2. aggregation time (no engine needed)
    print("\n## Aggregation time, synthetic submissions, 4 modules of SmolLM2 shapes, rank 8")
    print(f"wall s / process CPU s (load average at start: {os.getloadavg()[0]:.1f})")
    sizes = [int(s) for s in args.sizes.split(",")]
    print("| method | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    subs = {n: synthetic(n) for n in sizes} if not args.skip_timings else {}
    for method in METHODS if not args.skip_timings else []:
        times = []
        for n in sizes:
            start, cpu = time.perf_counter(), time.process_time()
            aggregation.aggregate(subs[n][1:], method, weights=[1] * n, base=subs[n][0])
            times.append((time.perf_counter() - start, time.process_time() - cpu))
        print(f"| {method} | " + " | ".join(f"{w:.2f} / {c:.2f}" for w, c in times) + " |", flush=True)

    # 1. training speed
    torch.set_num_threads(args.threads)
    engine = Engine.load(None, cache_dir=settings.MODEL_CACHE_DIR)
    rows = dataset()
    shard_round = Round(shards=args.shards, seed=0, eval_fraction=0.15)
    eval_part, shards = shard_round.split(rows)
    config = TrainConfig(rank=8, alpha=16, lr=3e-3, steps=args.steps, batch_size=4, seed=0, target_modules=TARGETS)
    base_name = "bench-base"
    engine.new_adapter(base_name, 8, 16, TARGETS, seed=0)
    tmp = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp())
    print(f"shard adapters in {tmp}")
    if not args.reuse:
        engine.save_adapter(base_name, tmp / "base")
    engine.unload_adapter(base_name)
    base_state, base_config = training.unpack(training.pack_dir(tmp / "base"))
    honest, speeds = [], []
    for k, shard in enumerate(shards):
        if args.reuse:
            honest.append(training.unpack(training.pack_dir(tmp / f"s{k}")))
            continue
        start, cpu = time.perf_counter(), time.process_time()
        result = train_dora(engine, shard, config, adapter=f"bench-{k}", init_from=tmp / "base",
                            save_to=tmp / f"s{k}")
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        engine.unload_adapter(f"bench-{k}")
        speeds.append(args.steps / elapsed)
        honest.append(training.unpack(training.pack_dir(tmp / f"s{k}")))
        print(f"shard {k}: {len(shard)} examples, {args.steps} steps in {elapsed:.1f} s "
              f"({args.steps / elapsed:.3f} steps/s wall, {cpu:.1f} CPU s), loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}",
              flush=True)
        if args.skip_robustness:
            break
    if speeds:
        print(f"\n## Training: {sum(speeds) / len(speeds):.3f} steps/s (batch 4, rank 8, targets q,v, "
              f"SmolLM2-135M fp32)")
    if args.skip_robustness:
        return

    # 3. robustness
    scaling = training.scaling_of(base_config)
    baseline = training.eval_loss(engine, eval_part)
    honest_state, honest_report = aggregation.aggregate([(s, scaling) for s, _ in honest], "mean")
    honest_loss = eval_state(engine, honest_state, honest_report, eval_part)
    print(f"\n## Robustness: {args.shards} submissions, {max(1, args.shards // 5)} poisoned (20%)")
    print(f"backbone eval loss {baseline:.4f}; honest-only mean {honest_loss:.4f} "
          f"(ratio 1.000 is the honest-only aggregate; lower is better)")
    gen = torch.Generator().manual_seed(0)
    n_bad = max(1, args.shards // 5)
    print("| attack | filter | " + " | ".join(METHODS) + " |")
    print("|---|---|" + "---|" * len(METHODS))
    for kind in ("scaled", "sign_flipped", "random"):
        subs_k = [(s, scaling) for s, _ in honest[n_bad:]]
        subs_k += [(poison(s, base_state, kind, gen), scaling) for s, _ in honest[:n_bad]]
        for label, z in (("norm filter", 3.5), ("method only", math.inf)):
            cells = []
            for method in METHODS:
                try:
                    state, report = aggregation.aggregate(subs_k, method, base=(base_state, scaling), z_threshold=z)
                    loss = eval_state(engine, state, report, eval_part)
                    cells.append(f"{loss / honest_loss:.3f}")
                except ValueError as exc:
                    cells.append(f"error: {exc}")
            print(f"| {kind} | {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
