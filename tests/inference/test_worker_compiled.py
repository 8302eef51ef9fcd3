"""The inference worker with R3MES_COMPILE on (the serving default; other tests switch it off to
start faster): it serves as soon as the model is loaded, compiles the decode step in the background
(answers decode eagerly meanwhile), says so in its health reply and then streams answers through
the graphs. Real worker process on a tiny random checkpoint (the default model's compile takes
minutes here), channel layer on Redis db 3."""

import asyncio
import tempfile
import time
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


def ask():
    async def frames():
        out = []
        async for frame in protocol.generate([{"role": "user", "content": "Say something."}],
                                             {"max_tokens": 12, "temperature": 0}):
            out.append(frame)
        return out

    done = asyncio.run(frames())[-1]
    assert done["type"] == "generate.done" and done["finish_reason"] in ("length", "stop")
    assert done["text"] or done["finish_reason"] == "stop"  # a random tiny model may stop at once
    return done


def test_worker_serves_while_it_compiles_the_decode_step_then_through_the_graphs(compiled_worker):
    ready = compiled_worker.ready
    # Loaded means serving: the router is warm, the compile runs on behind the scheduler.
    assert "router ready" in Path(compiled_worker.log_path).read_text()
    assert ready["compiling"] is True and ready["compiled_decode"] is False
    eager = ask()  # answered while Inductor compiles (a cold cache: this worker's own data directory)
    deadline = time.monotonic() + 240
    while (health := compiled_worker.ping())["compiling"]:
        assert time.monotonic() < deadline, "the decode step did not compile in time"
        time.sleep(0.5)
    assert health["compiled_decode"] is True
    assert health["compiled_mixture_rank"] == 64  # expert mixtures take the graph too
    assert "decode graph compiled" in Path(compiled_worker.log_path).read_text()
    # In the worker's data directory, where a restart finds them (not torch's default under /tmp).
    assert any((Path(compiled_worker.env["R3MES_DATA_DIR"]) / "cache" / "inductor" / "fxgraph").iterdir())
    compiled = ask()
    assert compiled["text"] == eager["text"]  # greedy: the graphs give the eager answer
    assert compiled_worker.ping()["compiled_decode"] is True  # still compiled after serving
