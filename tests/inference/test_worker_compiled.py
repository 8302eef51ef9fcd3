"""The inference worker with R3MES_COMPILE on (the serving default; other tests switch it off to
start faster): it compiles the decode step before it reports the model loaded, says so in its
health reply and streams answers through it. Real worker process on a tiny random checkpoint (the
default model's compile takes a minute or two here), channel layer on Redis db 3."""

import asyncio
import tempfile
from pathlib import Path

import pytest

from inference import protocol
from tests.inference.engine.conftest import make_tiny_llama
from tests.inference.live import worker_on_own_channel


@pytest.fixture
def compiled_worker(settings, fresh_channel_layers):
    data_dir = tempfile.mkdtemp(prefix="r3mes-compiled-worker-")
    backbone = make_tiny_llama(Path(data_dir) / "tiny")
    with worker_on_own_channel(settings, 3, data_dir, R3MES_COMPILE=1, R3MES_BACKBONE=backbone, R3MES_MAX_BATCH=2,
                               R3MES_MAX_SEQ_LEN=128, R3MES_QUANT="none") as worker:
        yield worker


def test_worker_compiles_the_decode_step_and_warms_the_router_before_it_serves(compiled_worker):
    assert compiled_worker.ready["compiled_decode"] is True
    assert compiled_worker.ready["compiled_mixture_rank"] == 24  # expert mixtures take the graph too
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
