"""The inference worker process on its own: a full queue answers "busy, retry" at once, and
SIGTERM drains (no new requests; a running answer that outlives the grace period ends with an
error frame, never silence). Real worker process, real model, channel layer on Redis db 2."""

import asyncio
import tempfile

import pytest

from inference import protocol
from inference.protocol import GenerationError
from tests.inference.live import worker_on_own_channel


@pytest.fixture
def small_worker(settings, fresh_channel_layers):
    with worker_on_own_channel(settings, 2, tempfile.mkdtemp(prefix="r3mes-small-worker-"), R3MES_MAX_BATCH=1,
                               R3MES_MAX_QUEUE=0, R3MES_DRAIN_GRACE_S=1) as worker:
        yield worker


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
