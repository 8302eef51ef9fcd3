"""The compiled lone-sequence decode graph without adapters and with a three-adapter mixture
(random r=8 DoRA experts on all seven projections, weights 0.5/0.3/0.2), int4, called directly and
interleaved call by call at one KV position: what the mixture costs inside the graph and dynamo,
without the batch's scheduling, sampling and text. Interleaving call by call cancels most of the
drift of a shared machine, so one run resolves differences of a few percent; step_breakdown.py
and engine_mixture.py measure whole requests.

    python benchmarks/graph_ab.py [--calls 1000] [--tree PATH]

--tree runs another source tree's engine (e.g. `git archive <rev> | tar -x -C /tmp/ab/rev`, with
its var/models linked to this checkout's), so that two versions compare in back-to-back runs.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--calls", type=int, default=1000, help="calls of each graph (after 50 warm-up pairs)")
parser.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent))
args = parser.parse_args()
ROOT = Path(args.tree).resolve()
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
torch.set_num_threads(2)
from engine import add_random_adapters  # noqa: E402

from inference.engine import Engine, dora  # noqa: E402

eng = Engine.load(cache_dir=str(ROOT / "var/models"), quant="int4")
add_random_adapters(eng)
batch = eng.new_batch(max_batch=1, max_seq_len=256)  # the KV cache the graphs are built for
started = time.perf_counter()
assert eng.compile_decode(), "compile_decode failed (see the log)"
print(f"{ROOT}: compile_decode {time.perf_counter() - started:.0f} s", flush=True)
model, ctx = eng.model, eng.model.adapter_context
with torch.inference_mode():
    ctx.set_mixture(torch.stack([dora.mixture_vector({"a": 0.5, "b": 0.3, "c": 0.2}, ctx.names)]))
    lowrank = dora.decode_lowrank(model, model.compiled_mixture_rank, model.compiled_mixture_dtype)
    ctx.set_mixture(None)
    token = torch.tensor([[42]])
assert lowrank is not None, "the mixture does not fit the graph"
times = {"no adapter": [], "mixture": []}
# As generate.decode_one_token calls it: slot 0 and position 40 (passed plus 2 and plus 3).
with torch.inference_mode(), torch.compiler.set_stance("eager_on_recompile", skip_guard_eval_unsafe=True):
    for i in range(args.calls + 50):
        pair = (("no adapter", None), ("mixture", lowrank))
        for name, lr in pair if i % 2 else pair[::-1]:
            t = time.perf_counter()
            model.compiled_decode(token, 2, 43, lr)
            if i >= 50:
                times[name].append(time.perf_counter() - t)
none, mix = (statistics.median(times[k]) * 1e3 for k in times)
quartiles = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
print(f"no adapter {none:.3f} ms, mixture {mix:.3f} ms a call (medians of {args.calls}): the mixture costs "
      f"{mix - none:.3f} ms, ratio {none / mix:.3f}; quartiles "
      + ", ".join(f"{k} {q[0] * 1e3:.3f}-{q[2] * 1e3:.3f}" for k, q in quartiles.items()), flush=True)
