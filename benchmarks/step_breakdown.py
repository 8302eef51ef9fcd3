"""Where one compiled decode step's time goes, int4 SmolLM2, a lone sequence: the whole step
(Batch.step: scheduling, sampling, detokenizing), the call of the compiled function (dynamo's guards
and its gathering of the graph's inputs, then the graph), and the graph alone (what Inductor built:
the int4 kernels, attention, its own C++ kernels). Without adapters and with a three-adapter
mixture, alternated; the figures are per token.

    python benchmarks/step_breakdown.py [--rounds 3] [--tokens 64]

Compiles the four lone-sequence graphs first (minutes on a cold TORCHINDUCTOR_CACHE_DIR). Also
times laying a new mixture out for the graph (dora.decode_lowrank, once per request before its
first compiled step): the first mixture after the adapters load, then new mixtures of them, and
what a batch's step pays to get its unchanged mixture again.
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
from engine import add_random_adapters  # noqa: E402

from inference.engine import Engine, dora  # noqa: E402
from inference.engine import engine as engine_module  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--tokens", type=int, default=64)
args = parser.parse_args()

graph_s = [0.0]  # time inside the graphs Inductor built, summed
call_s = [0.0]  # time inside the compiled function (dynamo, then the graph), summed
build = engine_module.compile_fx


def timing(fn, total):
    """fn, adding the seconds of every call to total[0]."""
    def run(*fn_args):
        started = time.perf_counter()
        try:
            return fn(*fn_args)
        finally:
            total[0] += time.perf_counter() - started

    return run


def timed_compile_fx(gm, example_inputs, **kwargs):
    print(f"graph with {len(example_inputs)} inputs", flush=True)
    return timing(build(gm, example_inputs, **kwargs), graph_s)


engine_module.compile_fx = timed_compile_fx
eng = Engine.load(cache_dir=str(ROOT / "var/models"), quant="int4")
add_random_adapters(eng)  # three random r=8 DoRA adapters on all seven projections of every layer
batch = eng.new_batch(max_batch=1, max_seq_len=256)
started = time.perf_counter()
assert eng.compile_decode(), "compile_decode failed (see the log)"
print(f"compile_decode: {time.perf_counter() - started:.1f} s", flush=True)
eng.model.compiled_decode = timing(eng.model.compiled_decode, call_s)
ctx = eng.model.adapter_context
for label, mixture in (("first mixture after loading", {"a": 0.5, "b": 0.3, "c": 0.2}),
                       ("a new 3-adapter mixture", {"a": 0.2, "b": 0.5, "c": 0.3}),
                       ("a new one-expert mixture", {"b": 1.0})):
    with torch.inference_mode():
        ctx.set_mixture(torch.stack([dora.mixture_vector(mixture, ctx.names)]))
        started = time.perf_counter()
        dora.decode_lowrank(eng.model, eng.model.compiled_mixture_rank, eng.model.compiled_mixture_dtype)
        print(f"decode_lowrank, {label}: {(time.perf_counter() - started) * 1e3:.1f} ms", flush=True)
        ctx.set_mixture(None)
with torch.inference_mode():  # a batch's compiled step asks for its (unchanged) mixture every token
    ctx.set_mixture(torch.stack([dora.mixture_vector({"a": 1 + i % 3, "b": 1, "c": 1 + i % 2}, ctx.names)
                                 for i in range(8)]))
    dora.decode_lowrank(eng.model, 2 * eng.model.compiled_mixture_rank, eng.model.compiled_mixture_dtype, rows=8)
    started = time.perf_counter()
    for _ in range(100):
        dora.decode_lowrank(eng.model, 2 * eng.model.compiled_mixture_rank, eng.model.compiled_mixture_dtype, rows=8)
    print(f"decode_lowrank, a batch of 8 asking again: {(time.perf_counter() - started) * 10:.3f} ms", flush=True)
    ctx.set_mixture(None)
MIX = {"a": 0.5, "b": 0.3, "c": 0.2}
res = {"no adapter": [], "3-adapter mixture": []}
for _ in range(args.rounds):
    for name, adapters in (("no adapter", None), ("3-adapter mixture", MIX)):
        seq = eng.sequence("Explain in detail how a steam engine works, step by step.", max_tokens=args.tokens,
                           ignore_eos=True, adapters=adapters)
        batch.add(seq)
        batch.step()  # prefill
        graph_s[0] = call_s[0] = 0.0
        t = time.perf_counter()
        while len(batch):
            batch.step()
        n = len(seq.output_ids) - 1
        res[name].append(((time.perf_counter() - t) / n, call_s[0] / n, graph_s[0] / n))
print("per token, medians over the rounds (ms):")
print(f"{'':18} {'step':>7} {'graph':>7} {'dynamo':>7} {'rest':>7}  (rest: scheduling, sampling, text, mixture lookup)")
for name, rows in res.items():
    step, call, graph = (statistics.median(r[i] for r in rows) * 1e3 for i in range(3))
    print(f"{name:18} {step:7.3f} {graph:7.3f} {call - graph:7.3f} {step - call:7.3f}")
