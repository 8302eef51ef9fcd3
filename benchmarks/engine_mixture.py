"""Cost of a 3-adapter DoRA mixture on single-stream decode, int4 serving mode, one process (and,
compiled, of one expert alone).

Alternates the configurations five times and compares medians (this machine is shared; runs far
apart in time are not comparable): no adapter and the mixture through the compiled decode graphs
(Engine.compile_decode, what the worker serves with), then eagerly: no adapter, the mixture through
the fused q|k|v and gate|up products with grouped low-rank paths, and the mixture with the fused
products switched off (each projection its own backbone product and low-rank path).

    python benchmarks/engine_mixture.py            # --no-compile: the eager rows only

--rounds N (default 5) alternations; --compiled-only skips the eager rows (more rounds in the same
time: the machine is shared, and the compiled ratio needs many pairs to settle).

Ablations of the compiled step's settings (Engine.compile_decode): --python-wrapper (Inductor's
Python wrapper instead of its C++ one), --parallel-mixture-loops (Inductor's default OpenMP
parallel loops in the mixture graphs instead of serial ones).
"""
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
torch.set_num_threads(2)
from engine import add_random_adapters  # noqa: E402

from inference.engine import Engine  # noqa: E402
from inference.engine import engine as engine_module  # noqa: E402

if "--python-wrapper" in sys.argv:
    engine_module.COMPILE_OPTIONS = {**engine_module.COMPILE_OPTIONS, "cpp_wrapper": False}
if "--parallel-mixture-loops" in sys.argv:
    import torch._inductor.config as inductor_config

    engine_module.SERIAL_LOOP_ELEMENTS = inductor_config.cpp.min_chunk_size

eng = Engine.load(cache_dir=str(ROOT / "var/models"), quant="int4")
add_random_adapters(eng)  # three random r=8 DoRA adapters on all seven projections of every layer
batch = eng.new_batch(max_batch=1, max_seq_len=256)
graph = None
if "--no-compile" not in sys.argv:
    started = time.perf_counter()
    assert eng.compile_decode(), "compile_decode failed (see the log)"
    graph = eng.model.compiled_decode
    print(f"compile_decode: {time.perf_counter() - started:.1f} s", flush=True)
layers = eng.model.model.layers
fused = [(layer.self_attn.qkv_proj, layer.mlp.gate_up_proj) for layer in layers]
MIX = {"a": 0.5, "b": 0.3, "c": 0.2}
ONE = {"a": 1.0}  # one expert: the compiled step reads a third of the mixture's factor bytes


def set_fused(on: bool) -> None:
    for layer, (qkv, gate_up) in zip(layers, fused):
        layer.self_attn.qkv_proj, layer.mlp.gate_up_proj = (qkv, gate_up) if on else (None, None)


def decode_tok_s(adapters, compiled=False) -> float:
    eng.model.compiled_decode = graph if compiled else None
    seq = eng.sequence("Explain in detail how a steam engine works, step by step.", max_tokens=48,
                       ignore_eos=True, adapters=adapters)
    batch.add(seq)
    batch.step()  # prefill
    t = time.perf_counter()
    while len(batch):
        batch.step()
    return (len(seq.output_ids) - 1) / (time.perf_counter() - t)


rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5
eager = graph is None or "--compiled-only" not in sys.argv
res = {"no adapter": [], "mixture, fused + grouped": [], "mixture, per projection": []} if eager else {}
if graph is not None:
    res = {"compiled, no adapter": [], "compiled, mixture": [], "compiled, one expert": [], **res}
COMPILED = {"compiled, no adapter": None, "compiled, mixture": MIX, "compiled, one expert": ONE}
for i in range(rounds):
    set_fused(True)
    if graph is not None:
        order = list(COMPILED)
        for key in order[i % 3:] + order[:i % 3]:  # none always runs first
            res[key].append(decode_tok_s(COMPILED[key], compiled=True))
    if not eager:
        continue
    res["no adapter"].append(decode_tok_s(None))
    res["mixture, fused + grouped"].append(decode_tok_s(MIX))
    set_fused(False)
    res["mixture, per projection"].append(decode_tok_s(MIX))
for name, runs in res.items():
    base = statistics.median(res["compiled, no adapter" if name.startswith("compiled") else "no adapter"])
    print(f"{name:26} median {statistics.median(runs):6.1f} tok/s  ÷ no adapter (same path) "
          f"{statistics.median(runs) / base:.2f}", [round(x) for x in runs])
for key in ("compiled, mixture", "compiled, one expert") if graph is not None else ():
    pairs = sorted(m / n for n, m in zip(res["compiled, no adapter"], res[key]))
    q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else pairs * 3
    print(f"{key} ÷ no adapter, round by round: median {statistics.median(pairs):.3f}, "
          f"quartiles {q[0]:.3f}–{q[2]:.3f}, {len(pairs)} rounds")
