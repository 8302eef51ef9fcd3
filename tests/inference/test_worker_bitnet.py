"""A BitNet b1.58 checkpoint served by the real worker with only R3MES_BACKBONE set: the default
R3MES_QUANT (auto) runs it on the packed ternary kernel, its health says so, and it answers with
and without an approved expert. Tiny random checkpoint packed the 2B-4T way; channel layer on
Redis db 5."""

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from inference import protocol
from tests.inference.engine.test_bitnet import make_tiny_bitnet
from tests.inference.live import PYTHON, REPO, WorkerProcess, channel_ping, stack_env, worker_on_own_channel

MAKE_EXPERT = """
import os, torch
from django.conf import settings
from inference.engine import Engine
from inference.adapter_cache import file_sha256
from inference.models import Adapter
engine = Engine.load(settings.R3MES_BACKBONE)
engine.new_adapter("coding", r=4, alpha=8, seed=1)
with torch.no_grad():
    for module in engine.model.modules():
        if hasattr(module, "lora_B") and "coding" in module.lora_B:
            module.lora_B["coding"].normal_(0, 0.05)
path = engine.save_adapter("coding", os.path.join(settings.DATA_DIR, "adapters", "coding-v1"))
sha = file_sha256(os.path.join(path, "adapter_model.safetensors"))
Adapter.objects.create(expert="coding", version=1, path=str(path), sha256=sha, rank=4, alpha=8).approve()
"""


@pytest.fixture
def bitnet_worker(settings, fresh_channel_layers):
    data_dir = tempfile.mkdtemp(prefix="r3mes-bitnet-worker-")
    backbone = make_tiny_bitnet(Path(data_dir) / "bitnet")
    with worker_on_own_channel(settings, 5, data_dir, R3MES_BACKBONE=backbone, R3MES_COMPILE=0) as worker:
        yield worker


def ask(options):
    async def frames():
        out = []
        async for frame in protocol.generate([{"role": "user", "content": "Write a Python loop."}],
                                             {"max_tokens": 8, "temperature": 0, **options}):
            out.append(frame)
        return out

    done = asyncio.run(frames())[-1]
    assert done["type"] == "generate.done" and done["finish_reason"] in ("length", "stop")
    return done


def test_a_bitnet_backbone_serves_packed_with_the_defaults_with_and_without_an_expert(bitnet_worker):
    health = bitnet_worker.ready
    assert health["weights"] == "ternary (BitNet b1.58, 2-bit packed)"
    assert health["serving"].startswith("BitNet b1.58, ternary, 2-bit packed, ")
    plain = ask({})
    assert plain["experts"] == {} and plain["metrics"]["serving"] == health["serving"]
    subprocess.run([PYTHON, "manage.py", "shell", "-c", MAKE_EXPERT], cwd=REPO, env=bitnet_worker.env, check=True,
                   capture_output=True, timeout=180)
    expert = ask({"experts": ["coding"]})
    assert expert["experts"] == {"coding": 1.0}
    assert expert["metrics"]["completion_tokens"] >= 1


def test_an_explicit_quant_mode_that_does_not_fit_names_the_variable(settings, fresh_channel_layers):
    data_dir = tempfile.mkdtemp(prefix="r3mes-bitnet-int4-")
    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/5"
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [{"address": redis_url}]}}}
    env = stack_env(data_dir, redis_url, R3MES_BACKBONE=make_tiny_bitnet(Path(data_dir) / "bitnet"),
                    R3MES_COMPILE=0, R3MES_QUANT="int4")
    worker = WorkerProcess(env, os.path.join(data_dir, "worker.log")).start()
    try:
        deadline = time.monotonic() + 120
        while not ((health := channel_ping()) and health.get("load_error")):
            assert time.monotonic() < deadline, "the worker never reported its load error"
            time.sleep(0.5)
        assert health["load_error"].startswith("R3MES_QUANT=int4: quant='int4' applies to dense checkpoints")
        assert not health["model_loaded"]
    finally:
        worker.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
