"""Decoding while Engine.compile_decode runs in another thread, as the worker does: int4 serving
mode, a random 3-adapter mixture, greedy 32-token requests alternating no adapter / mixture for the
whole compile. Reports the compile's wall time, the eager speed before and during it, whether a
400-token sequence started before the compile and every request during it gave the eager
reference's tokens, then the compiled speed.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile_background.py [--cache-dir var/models]

(an empty Inductor cache: the cold first start, ~13 minutes; run it again with the same directory
for a later start, ~90 s, most of it dynamo's trace, which no cache keeps)
"""
import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
torch.set_num_threads(2)
from engine import add_random_adapters  # noqa: E402

from inference.engine import Engine  # noqa: E402
from inference.engine.generate import SamplingParams, Sequence  # noqa: E402

MIX = {"a": 0.5, "b": 0.3, "c": 0.2}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="the KV cache length (the worker's R3MES_MAX_SEQ_LEN: its Inductor cache then serves)")
    args = parser.parse_args()
    engine = Engine.load(quant="int4", cache_dir=args.cache_dir)
    add_random_adapters(engine)
    prompt = engine.tokenize(engine.render([{"role": "user", "content": "Write a short story about a lighthouse keeper."}]))
    batch = engine.new_batch(max_batch=8, max_seq_len=args.max_seq_len)

    def run(mixture, n=32):
        added = time.perf_counter()
        seq = batch.add(Sequence(list(prompt), SamplingParams(max_tokens=n, ignore_eos=True), mixture=mixture))
        batch.step()
        started = time.perf_counter()
        while len(batch):
            batch.step()
        ended = time.perf_counter()
        return seq.output_ids, (n - 1) / (ended - started), ended - added  # the wall time includes the prefill

    reference = {False: run(None)[0], True: run(MIX)[0]}
    long_reference = run(MIX, 400)[0]
    for mixed in (False, True):
        print(f"eager before, {'mixture' if mixed else 'no adapter'}: {run(MIX if mixed else None)[1]:.1f} tok/s")

    result = {}
    compiler = threading.Thread(target=lambda: result.update(ok=engine.compile_decode()))
    long_seq = batch.add(Sequence(list(prompt), SamplingParams(max_tokens=400, ignore_eos=True), mixture=MIX))
    batch.step()  # in slot 0, decoding across the compile's start
    started = time.perf_counter()
    compiler.start()
    while not long_seq.finished:
        batch.step()
    print(f"400-token sequence started before the compile: {time.perf_counter() - started:.1f} s, eager tokens:",
          long_seq.output_ids == long_reference, "(compile still running:", compiler.is_alive(), ")")
    speeds, walls, differ, n = [], [], [], 0
    while compiler.is_alive():
        mixed = n % 2 == 1
        graphs_before = engine.model.compiled_decode is not None
        ids, tok_s, wall = run(MIX if mixed else None)
        n += 1
        if not graphs_before and engine.model.compiled_decode is None:
            speeds.append(tok_s)
            walls.append(wall)
        if ids != reference[mixed]:
            differ.append((n, mixed, graphs_before, engine.model.compiled_decode is not None))
    compiler.join()
    print(f"compile_decode: {result.get('ok')} in {time.perf_counter() - started:.1f} s; {n} requests during it")
    if speeds:
        print(f"eager decode during the compile: median {statistics.median(speeds):.1f} tok/s, slowest "
              f"{min(speeds):.1f} tok/s; the longest request took {max(walls):.1f} s with its prefill")
        slow = sorted(round(w, 1) for w in walls if w > 5)
        print(f"requests that took over 5 s (a 32-token request takes ~1 s): {len(slow)} of {len(walls)}", slow)
    print("requests whose tokens differ from the eager reference (n, mixture, graphs in at start, at end):", differ)
    for mixed in (False, True):
        ids, tok_s, _ = run(MIX if mixed else None)
        print(f"compiled, {'mixture' if mixed else 'no adapter'}: {tok_s:.1f} tok/s, eager tokens: {ids == reference[mixed]}")


if __name__ == "__main__":
    main()
