"""The inference worker with R3MES_COMPILE on (the serving default; other tests switch it off to
start faster): it compiles the decode step before it reports the model loaded, says so in its
health reply and streams answers through it. Real worker process on a tiny random checkpoint (the
default model's compile takes a minute or two here), channel layer on Redis db 3."""

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from channels.layers import channel_layers

from inference import protocol
from tests.inference.engine.conftest import make_tiny_llama
from tests.inference.live import WorkerProcess, channel_ping, stack_env


@pytest.fixture
def compiled_worker(settings, fresh_channel_layers):
    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/3"
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [{"address": redis_url, "socket_timeout": 30}]}}}
    data_dir = tempfile.mkdtemp(prefix="r3mes-compiled-worker-")
    backbone = make_tiny_llama(Path(data_dir) / "tiny")
    env = stack_env(data_dir, redis_url, R3MES_COMPILE=1, R3MES_BACKBONE=backbone, R3MES_MAX_BATCH=2,
                    R3MES_MAX_SEQ_LEN=128, R3MES_QUANT="none")
    worker = WorkerProcess(env, os.path.join(data_dir, "worker.log")).start()

    worker.ping = channel_ping
    worker.ready = worker.wait_ready(channel_ping)
    channel_layers.backends.clear()
    yield worker
    worker.kill()
    shutil.rmtree(data_dir, ignore_errors=True)


def test_worker_compiles_the_decode_step_before_serving_and_streams_through_it(compiled_worker):
    assert compiled_worker.ready["compiled_decode"] is True
    log = Path(compiled_worker.log_path).read_text()
    assert "decode graph compiled" in log and "router ready" in log  # both before the model counts as loaded

    async def ask():
        frames = []
        async for frame in protocol.generate([{"role": "user", "content": "Say something."}],
                                             {"max_tokens": 12, "temperature": 0}):
            frames.append(frame)
        return frames

    frames = asyncio.run(ask())
    done = frames[-1]
    assert done["type"] == "generate.done" and done["finish_reason"] in ("length", "stop")
    assert done["text"] or done["finish_reason"] == "stop"  # a random tiny model may stop at once
    assert compiled_worker.ping()["compiled_decode"] is True  # still compiled after serving
