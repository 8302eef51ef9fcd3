"""Loading an expert while Engine.compile_decode runs in another thread, as the worker does: int4
serving mode, one r=8 DoRA adapter on all seven projections of every layer (random, saved in PEFT
format), loaded and unloaded in turn with Python's default GIL switch interval (5 ms) and with the
short one `generate.quick_gil_while_compiling` sets during a compile (100 us), first with nothing
else running, then for as long as the compile runs.

    TORCHINDUCTOR_CACHE_DIR=<a warm cache> python benchmarks/adapter_load.py [--cache-dir var/models]

(a warm Inductor cache, e.g. one `benchmarks/compile_background.py` filled: the compile is then
mostly dynamo's and AOT autograd's traces, pure Python that keeps the GIL, ~90 s)
"""
import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
torch.set_num_threads(2)
from inference.engine import Engine, generate  # noqa: E402

SHORT = generate.COMPILING_SWITCH_INTERVAL


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()
    engine = Engine.load(quant="int4", cache_dir=args.cache_dir)
    engine.new_batch(max_batch=8, max_seq_len=2048)  # the worker's cache, so its Inductor cache serves
    path = Path(tempfile.mkdtemp(prefix="r3mes-adapter-load-")) / "expert"
    engine.new_adapter("expert", r=8, alpha=16)
    engine.save_adapter("expert", path)
    engine.unload_adapter("expert")

    def load(interval):
        generate.COMPILING_SWITCH_INTERVAL = interval  # what quick_gil_while_compiling sets
        started = time.perf_counter()
        engine.load_adapter("expert", path)
        took = time.perf_counter() - started
        engine.unload_adapter("expert")
        return took

    engine.model.compiling = True  # as during a compile, with nothing compiling
    print(f"alone: 5 ms {load(0.005):.2f} s, 100 us {load(SHORT):.2f} s")
    engine.model.compiling = False
    compiler = threading.Thread(target=engine.compile_decode)
    compiler.start()
    time.sleep(5)  # into the first trace
    times = {0.005: [], SHORT: []}
    while compiler.is_alive():
        for interval in times:
            times[interval].append(round(load(interval), 2))
    compiler.join()
    for interval, took in times.items():
        print(f"beside the compile, {interval * 1e6:.0f} us: {took} s")


if __name__ == "__main__":
    main()
