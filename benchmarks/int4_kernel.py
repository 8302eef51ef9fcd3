"""Our int4 kernel (inference/engine/int4mm.cpp) against PyTorch's `_weight_int4pack_mm_for_cpu`,
side by side on the same quantised weights: SmolLM2-135M's product shapes (q|k|v, o, gate|up,
down, the vocabulary), 1 to 64 rows, bfloat16 activations, 2 threads. Times are medians of
alternating batches of calls (the machine is shared); the weights stay in the caches between calls,
as a microbenchmark's do, so a decode step's figures (engine_mixture.py, engine_batch.py) are the
ones that count.

    python benchmarks/int4_kernel.py [--rows 1,2,4,8,64]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from inference.engine import int4mm  # noqa: E402

SHAPES = {"q|k|v": (960, 576), "o": (576, 576), "gate|up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def per_call_us(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2,4,8,64")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not int4mm.available():
        raise SystemExit("our int4 kernel needs AVX512-BF16 (and g++ to build it)")
    gen = torch.Generator().manual_seed(0)
    print(f"{'product':>8} {'rows':>4} {'PyTorch µs':>11} {'ours µs':>8} {'PyTorch ÷ ours':>14}")
    for name, (n, k) in SHAPES.items():
        q = torch.randint(0, 16, (n, k), generator=gen)
        scale = (torch.rand(n, k // 32, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
        zero = (torch.randn(n, k // 32, generator=gen) * 0.01).to(torch.bfloat16)
        theirs_w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        theirs_sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        ours_w = int4mm.pack_int4(q, scale, zero)
        for rows in map(int, args.rows.split(",")):
            x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
            calls = max(5, int(2e5 / (n * k / 1e3) / rows ** 0.5))

            def theirs():
                return torch.ops.aten._weight_int4pack_mm_for_cpu(x, theirs_w, 32, theirs_sz)

            def ours():
                return int4mm.int4_mm(x, ours_w)

            torch.testing.assert_close(ours().float(), theirs().float(), rtol=2 ** -7, atol=1e-3)
            t_theirs, t_ours = [], []
            for _ in range(args.rounds):
                t_theirs.append(per_call_us(theirs, calls))
                t_ours.append(per_call_us(ours, calls))
            a, b = statistics.median(t_theirs), statistics.median(t_ours)
            print(f"{name:>8} {rows:>4} {a:11.1f} {b:8.1f} {a / b:14.2f}", flush=True)


if __name__ == "__main__":
    main()
