"""Chat decode while an adapter trains on the same two cores, as under `make run` when the Celery
worker trains the starter experts (or a mining shard): the compiled decode graph's per-call times
(`graph_ab.py`: no adapter and a three-adapter mixture, interleaved) with nothing in the
background, then beside a DoRA training loop (float32 engine, 2 threads, as the worker runs it)
in its own session, as honcho starts each process: under `nice -n 10`; under Linux's SCHED_IDLE
policy (`chrt --idle 0`); and under SCHED_IDLE with its session's autogroup at nice 19 (what the
Procfile gives the Celery worker). With the kernel's autogroups (`/proc/sys/kernel/
sched_autogroup_enabled`), CPU time is shared between sessions before a session's own processes'
nice values and policies count.

    python benchmarks/background_training.py [--calls 500]

Medians show the typical step; the upper quartile shows how many steps the trainer slows down.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_forever() -> None:
    """The background load: short DoRA trainings on chat examples, one after another."""
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(2)
    from inference.engine import Engine
    from inference.engine.train import TrainConfig, train_dora

    engine = Engine.load(cache_dir=str(ROOT / "var/models"))
    examples = [{"messages": [{"role": "user", "content": f"Question {i}: how does a steam engine work?"},
                              {"role": "assistant", "content": "Steam pushes a piston inside a cylinder. " * 6}]}
                for i in range(16)]
    print("training", flush=True)
    for i in range(10**6):
        train_dora(engine, examples, TrainConfig(steps=5, batch_size=4, max_len=128), adapter=f"t{i}")
        engine.unload_adapter(f"t{i}")
        print(f"trained {i + 1}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--trainer", action="store_true", help="(internal) be the background load")
    args = parser.parse_args()
    if args.trainer:
        return train_forever()

    def idle():
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

    def idle_and_group_nice():
        idle()
        Path("/proc/self/autogroup").write_text("19")  # the new session's group (start_new_session)

    policies = {"nothing in the background": None,
                "training under nice -n 10": lambda: os.nice(10),
                "training under SCHED_IDLE": idle,
                "training under SCHED_IDLE, its autogroup at nice 19": idle_and_group_nice}
    for label, policy in policies.items():
        trainer = None
        if policy is not None:
            trainer = subprocess.Popen([sys.executable, __file__, "--trainer"], preexec_fn=policy,
                                       start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       text=True)
            assert trainer.stdout.readline().strip() == "training"
        try:
            started = time.perf_counter()
            out = subprocess.run([sys.executable, str(ROOT / "benchmarks/graph_ab.py"), "--calls", str(args.calls)],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            elapsed = time.perf_counter() - started
        finally:
            if trainer is not None:
                trainer.kill()
                rounds = sum(1 for line in trainer.stdout if line.startswith("trained"))
        extra = "" if trainer is None else f"; the trainer finished {rounds} trainings in those {elapsed:.0f} s"
        print(f"{label}: {out}{extra}", flush=True)


if __name__ == "__main__":
    main()
