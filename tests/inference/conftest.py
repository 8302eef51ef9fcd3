import asyncio
import os
import shutil
import tempfile

import pytest

from tests.inference.live import WorkerProcess, stack_env


def _channel_ping():
    from channels.layers import channel_layers

    from inference.protocol import ping_worker

    async def ping():
        try:
            return await ping_worker(2)
        except TimeoutError:
            return None
        finally:
            channel_layers.backends.clear()  # the layer's connections belong to this loop

    return asyncio.run(ping())


@pytest.fixture(scope="session")
def inference_worker():
    """The real inference worker process on the session's Redis (channel layer db 0, like the
    test process), holding the real model. Tests that kill it call `.restart()`."""
    data_dir = tempfile.mkdtemp(prefix="r3mes-worker-")
    env = stack_env(data_dir, os.environ["REDIS_URL"])
    worker = WorkerProcess(env, os.path.join(data_dir, "worker.log")).start()

    def ping():
        reply = _channel_ping()
        return reply

    def restart():
        worker.kill()
        worker.start()
        return worker.wait_ready(ping)

    worker.ping = ping
    worker.restart = restart
    worker.wait_ready(ping)
    yield worker
    worker.terminate()
    if not os.environ.get("R3MES_KEEP_TEST_LOGS"):
        shutil.rmtree(data_dir, ignore_errors=True)
