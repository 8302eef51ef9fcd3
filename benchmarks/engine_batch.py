"""Batched decode through the compiled batch graphs (Transformer.decode_rows) against the eager
batch, int4 serving mode, one process: 8 sequences of 64 new tokens, without adapters and with the
8 different 3-adapter mixtures of benchmarks/engine.py; the configurations alternate --rounds times
and the medians are compared (this machine is shared).

    python benchmarks/engine_batch.py [--rounds 3] [--tokens 64] [--cache-dir var/models]

The first run compiles every decode graph (Engine.compile_decode: minutes with a cold Inductor
cache; TORCHINDUCTOR_CACHE_DIR keeps it between runs).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
torch.set_num_threads(2)
from engine import PROMPT, add_random_adapters, timed_runs  # noqa: E402

from inference.engine import Engine  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    engine = Engine.load(quant="int4", cache_dir=args.cache_dir)
    add_random_adapters(engine)
    engine.new_batch(max_batch=8, max_seq_len=1024)
    started = time.perf_counter()
    assert engine.compile_decode(), "compile_decode failed (see the log)"
    print(f"compile_decode: {time.perf_counter() - started:.1f} s", flush=True)
    ids = engine.tokenize(engine.render(PROMPT))
    mixes = [{"a": 1 + i % 3, "b": 1 + (i // 3) % 3, "c": 1 + i % 2} for i in range(8)]
    graph = engine.model.compiled_rows
    results = {}
    for rnd in range(args.rounds):
        for label, rows, adapters in (("compiled, 8 mixtures", graph, mixes), ("eager, 8 mixtures", None, mixes),
                                      ("compiled, no adapter", graph, None), ("eager, no adapter", None, None)):
            engine.model.compiled_rows = rows
            tok_s = timed_runs(engine, ids, args, adapters=adapters, n_seqs=8)["decode_tok_s"]
            results.setdefault(label, []).append(tok_s)
            print(f"round {rnd}: {label}: {tok_s:.1f} tok/s", flush=True)
    engine.model.compiled_rows = graph
    print("\naggregate tok/s, medians:")
    for label, values in results.items():
        print(f"  {label}: {statistics.median(values):.1f}")
    for kind in ("8 mixtures", "no adapter"):
        ratio = statistics.median(results[f"compiled, {kind}"]) / statistics.median(results[f"eager, {kind}"])
        print(f"  compiled / eager, {kind}: {ratio:.2f}")


if __name__ == "__main__":
    main()
