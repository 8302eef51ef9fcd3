"""Fixtures shared by the router/cache/pipeline tests (imported explicitly by those modules)."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def serving_engine():
    """The real default model (SmolLM2-135M-Instruct), loaded once; the conversion is cached in var/models."""
    from django.conf import settings

    from inference.engine import Engine

    return Engine.load(cache_dir=settings.MODEL_CACHE_DIR)


def save_identity_adapter(engine, name, directory, rank=4, seed=0):
    """A valid PEFT DoRA adapter straight from `new_adapter` (B = 0): right format and size, no effect."""
    engine.new_adapter(name, r=rank, alpha=2.0 * rank, seed=seed)
    try:
        engine.save_adapter(name, directory)
    finally:
        engine.unload_adapter(name)
    return directory


def make_adapter_row(expert, version, directory, status="approved"):
    from inference.adapter_cache import WEIGHTS_FILE, file_sha256
    from inference.models import Adapter

    weights = directory / WEIGHTS_FILE
    adapter = Adapter.objects.create(expert=expert, version=version, path=str(directory), sha256=file_sha256(weights),
                                     size_bytes=weights.stat().st_size, status=Adapter.Status.CANDIDATE)
    if status == "approved":
        adapter.approve()
    return adapter
