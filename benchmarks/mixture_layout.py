"""Laying out a NEW three-expert mixture for the compiled decode step (dora.decode_lowrank, once per
mixture; the context keeps the last DECODE_CACHE_SIZE): median of 12 mixtures, each a little
different so that none is cached. Several source trees run one after another in one process, so
that two versions compare side by side (e.g. `git archive <rev> | tar -x -C /tmp/ab/rev`, with its
var/models linked to this checkout's).

    python benchmarks/mixture_layout.py [TREE ...]     # default: this checkout
"""
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(2)
trees = sys.argv[1:] or [str(Path(__file__).resolve().parent.parent)]
for root in trees:
    for name in [m for m in sys.modules if m == "engine" or m.startswith("inference")]:
        del sys.modules[name]  # this tree's engine, not the last one's
    sys.path[:0] = [root, root + "/benchmarks"]
    from engine import add_random_adapters  # noqa: E402

    from inference.engine import Engine, dora  # noqa: E402

    eng = Engine.load(cache_dir=str(Path(root) / "var/models"), quant="int4")
    add_random_adapters(eng)
    for path in dora.linear_paths(eng.model):  # wrapped as Engine.compile_decode wraps them
        if path.rsplit(".", 1)[-1] in dora.DEFAULT_TARGETS:
            dora.wrap_module(eng.model, path)
    ctx, times = eng.model.adapter_context, []
    with torch.inference_mode():
        for i in range(12):
            ctx.set_mixture(torch.stack([dora.mixture_vector({"a": 0.5, "b": 0.3, "c": 0.2 + i * 1e-3}, ctx.names)]))
            started = time.perf_counter()
            laid_out = dora.decode_lowrank(eng.model, 64, torch.bfloat16)
            times.append(time.perf_counter() - started)
            ctx.set_mixture(None)
    assert laid_out is not None
    print(f"{root}: a new mixture's layout, median {statistics.median(times) * 1e3:.2f} ms", flush=True)
    del sys.path[:2]
