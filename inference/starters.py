"""Starter experts: small instruction sets we wrote ourselves (inference/starter_data/*.jsonl), trained
with the engine's DoRA trainer and registered as approved adapters, so a fresh install serves real
experts without manual steps. The model is English-only, so the data is English."""

import json
import logging
import time
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction

from inference.adapter_cache import WEIGHTS_FILE, file_sha256
from inference.models import Adapter

log = logging.getLogger(__name__)
DATA_DIR = Path(__file__).resolve().parent / "starter_data"
STARTERS = ("coding", "medical", "summarization", "general")


def load_examples(expert: str) -> list[dict]:
    path = DATA_DIR / f"{expert}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def missing_starters() -> list[str]:
    have = set(Adapter.objects.filter(expert__in=STARTERS).values_list("expert", flat=True))
    return [e for e in STARTERS if e not in have]


def load_training_engine():
    import torch

    from inference.engine import Engine

    if settings.R3MES_TORCH_THREADS:
        torch.set_num_threads(settings.R3MES_TORCH_THREADS)
    device = None if settings.R3MES_DEVICE == "auto" else settings.R3MES_DEVICE
    # Training runs in float32 whatever the serving dtype: the adapter is saved in float32 anyway.
    return Engine.load(settings.R3MES_BACKBONE or None, dtype="float32", device=device,
                       cache_dir=settings.MODEL_CACHE_DIR)


def train_starter(engine, expert: str, steps: int, log_every=10) -> Adapter:
    from inference.engine.train import TrainConfig, train_dora

    version = Adapter.next_version(expert)
    out = Path(settings.ADAPTER_DIR) / expert / f"v{version}"
    config = TrainConfig(rank=8, alpha=16.0, lr=2e-3, steps=steps, batch_size=4, max_len=256, seed=0)
    started = time.monotonic()
    name = f"train-{expert}"
    result = train_dora(engine, load_examples(expert), config, adapter=name, save_to=out,
                        on_step=lambda step, loss: step % log_every == 0 and log.info("%s step %d loss %.3f",
                                                                                        expert, step, loss))
    engine.unload_adapter(name)
    weights = out / WEIGHTS_FILE
    try:
        with transaction.atomic():
            adapter = Adapter.objects.create(
                expert=expert, version=version, path=str(out), sha256=file_sha256(weights),
                base_model=engine.config.name or engine.source, rank=config.rank, alpha=config.alpha,
                target_modules=list(config.target_modules), size_bytes=weights.stat().st_size,
                metrics={"first_loss": result.losses[0], "final_loss": result.losses[-1], "steps": steps,
                         "examples": result.n_train, "seconds": round(time.monotonic() - started, 1),
                         "source": "starter"},
            )
            adapter.approve()
    except IntegrityError:  # another run registered this version first; keep theirs
        log.warning("starter %s v%d was registered concurrently; skipping", expert, version)
        return Adapter.objects.get(expert=expert, version=version)
    log.info("starter expert %s v%d trained: loss %.3f -> %.3f", expert, version, result.losses[0], result.losses[-1])
    return adapter


def train_starters(experts=None, steps=None, force=False, engine=None) -> list[Adapter]:
    """Train and approve the starter experts that have no adapter yet (all named ones with force)."""
    experts = list(experts or STARTERS)
    unknown = [e for e in experts if e not in STARTERS]
    if unknown:
        raise ValueError(f"no starter data for {', '.join(unknown)}; starters: {', '.join(STARTERS)}")
    todo = experts if force else [e for e in experts if e in missing_starters()]
    if not todo:
        return []
    engine = engine or load_training_engine()
    return [train_starter(engine, e, steps or settings.R3MES_STARTER_STEPS) for e in todo]
