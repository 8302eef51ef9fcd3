"""The inference worker process on its own: a full queue answers "busy, retry" at once, and
SIGTERM drains (no new requests; a running answer that outlives the grace period ends with an
error frame, never silence). Real worker process, real model, channel layer on Redis db 2."""

import asyncio
import os
import shutil
import tempfile

import pytest
from channels.layers import channel_layers

from inference import protocol
from inference.protocol import GenerationError
from tests.inference.live import WorkerProcess, channel_ping, stack_env


@pytest.fixture
def small_worker(settings, fresh_channel_layers):
    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/2"
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [{"address": redis_url, "socket_timeout": 30}]}}}
    data_dir = tempfile.mkdtemp(prefix="r3mes-small-worker-")
    env = stack_env(data_dir, redis_url, R3MES_MAX_BATCH=1, R3MES_MAX_QUEUE=0, R3MES_DRAIN_GRACE_S=1)
    worker = WorkerProcess(env, os.path.join(data_dir, "worker.log")).start()

    worker.wait_ready(channel_ping)
    channel_layers.backends.clear()
    yield worker
    worker.kill()
    shutil.rmtree(data_dir, ignore_errors=True)


def test_full_worker_says_busy_and_sigterm_ends_a_long_answer_with_an_error_frame(small_worker):
    long = [{"role": "user", "content": "Write a very long essay about rivers."}]

    async def scenario():
        first = protocol.generate(long, {"max_tokens": 400})
        frames = [await anext(first)]
        while frames[-1]["type"] != "generate.tokens":
            frames.append(await anext(first))
        # The only batch slot is taken and the queue holds nothing: an immediate, clear refusal.
        with pytest.raises(GenerationError) as busy:
            async for _ in protocol.generate(long, {"max_tokens": 4}):
                pass
        small_worker.proc.send_signal(15)  # SIGTERM: drain with a 1 s grace period
        with pytest.raises(GenerationError) as ended:
            async for frame in first:
                frames.append(frame)
        return busy.value, ended.value, frames

    busy, ended, frames = asyncio.run(scenario())
    assert busy.code == "busy" and "retry" in busy.message and busy.retry_after
    assert ended.code == "shutdown" and "shut down" in ended.message
    assert any(f["type"] == "generate.tokens" for f in frames)
    assert small_worker.proc.wait(30) == 0  # exits cleanly after draining
