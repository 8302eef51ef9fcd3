import os
import shutil
import tempfile

import pytest

from tests.inference.live import WorkerProcess, channel_ping, stack_env


@pytest.fixture(scope="session")
def inference_worker():
    """The real inference worker process on the session's Redis (channel layer db 0, like the
    test process), holding the real model. Tests that kill it call `.restart()`."""
    data_dir = tempfile.mkdtemp(prefix="r3mes-worker-")
    env = stack_env(data_dir, os.environ["REDIS_URL"])
    worker = WorkerProcess(env, os.path.join(data_dir, "worker.log")).start()

    def restart():
        worker.kill()
        worker.start()
        return worker.wait_ready(channel_ping)

    worker.ping = channel_ping
    worker.restart = restart
    worker.wait_ready(channel_ping)
    yield worker
    worker.terminate()
    if not os.environ.get("R3MES_KEEP_TEST_LOGS"):
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def live_stack():
    """Daphne serving the real ASGI app (file SQLite in a temp data dir) plus its own inference
    worker process, on channel-layer Redis db 1 so it never shares a queue with `inference_worker`.
    Yields an object with url, token (alice's API token), password, db path, env and worker."""
    import subprocess
    import types

    from tests.inference.live import PYTHON, REPO, http_ping, start_daphne
    from tests.services import free_port

    data_dir = tempfile.mkdtemp(prefix="r3mes-live-")
    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/1"
    port = free_port()
    env = stack_env(data_dir, redis_url, R3MES_STREAM_IDLE_TIMEOUT=6)
    daphne = start_daphne(env, port, os.path.join(data_dir, "daphne.log"))
    worker = WorkerProcess(env, os.path.join(data_dir, "worker.log")).start()
    url = f"http://127.0.0.1:{port}"
    try:
        created = subprocess.run([PYTHON, "manage.py", "r3mes", "user", "add", "alice", "--password",
                                  "correct-horse-battery-9", "--stake", "1000", "--token"],
                                 cwd=REPO, env=env, check=True, capture_output=True, text=True)
        worker.wait_ready(http_ping(url))
        yield types.SimpleNamespace(url=url, token=created.stdout.split()[-1], username="alice",
                                    password="correct-horse-battery-9", db=os.path.join(data_dir, "r3mes.sqlite3"),
                                    env=env, worker=worker, data_dir=data_dir)
    finally:
        worker.terminate()
        daphne.terminate()
        daphne.wait(10)
        if not os.environ.get("R3MES_KEEP_TEST_LOGS"):
            shutil.rmtree(data_dir, ignore_errors=True)
