"""A live R3MES stack for tests: the real inference worker process (`manage.py r3mes worker`) and,
when asked, Daphne serving the real ASGI app with a file SQLite database in a temp data dir. Both
use the session's real redis-server (tests/services.py)."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def channel_ping():
    """The inference worker's health reply over the channel layer configured now, or None when no
    worker answers within 2 s. Channel-layer connections belong to the event loop that made them,
    so they are dropped before and after."""
    import asyncio

    from channels.layers import channel_layers

    from inference.protocol import ping_worker

    async def ping():
        try:
            return await ping_worker(2)
        except TimeoutError:
            return None

    channel_layers.backends.clear()
    try:
        return asyncio.run(ping())
    finally:
        channel_layers.backends.clear()


@contextlib.contextmanager
def worker_on_own_channel(settings, db: int, data_dir: str, **env):
    """A real inference worker process whose channel layer is Redis db `db` (so it never takes
    another test worker's requests), with this test process's settings pointed there too. Yields
    the WorkerProcess once it reports a loaded model; `.ready` holds that health reply, `.ping`
    asks again. Kills it and removes `data_dir` afterwards."""
    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + f"/{db}"
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer",
                                           "CONFIG": {"hosts": [{"address": redis_url, "socket_timeout": 30}]}}}
    worker = WorkerProcess(stack_env(data_dir, redis_url, **env), os.path.join(data_dir, "worker.log")).start()
    try:
        worker.ping = channel_ping
        worker.ready = worker.wait_ready(channel_ping)
        yield worker
    finally:
        worker.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


def stack_env(data_dir, redis_url, **extra):
    env = dict(os.environ)
    # Importing torch._inductor in this process put its default cache directory into the
    # environment; a worker keeps its graphs in its own data directory, as under `make run`.
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.update({
        "R3MES_DATA_DIR": str(data_dir), "REDIS_URL": redis_url, "DJANGO_SETTINGS_MODULE": "r3mes_site.settings",
        "R3MES_TORCH_THREADS": "1", "R3MES_MAX_SEQ_LEN": "512", "R3MES_MAX_BATCH": "8",
        "R3MES_STREAM_IDLE_TIMEOUT": "4", "R3MES_WORKER_ACCEPT_TIMEOUT": "3", "LOG_LEVEL": "INFO",
        "ALLOWED_HOSTS": "127.0.0.1,localhost,testserver",
    })
    env.update({k: str(v) for k, v in extra.items()})
    return env


class WorkerProcess:
    def __init__(self, env, log_path):
        self.env, self.log_path, self.proc = env, log_path, None

    def start(self):
        # The worker reads approved adapters (and users, for retrieval) from the database.
        subprocess.run([PYTHON, "manage.py", "migrate", "-v", "0"], cwd=REPO, env=self.env, check=True)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PYTHON, "manage.py", "r3mes", "worker"], cwd=REPO, env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, ping, timeout=240):
        """`ping()` -> health reply dict or None; waits for a loaded model."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {Path(self.log_path).read_text()[-3000:]}")
            reply = ping()
            if reply and reply.get("model_loaded") and reply.get("pid", self.proc.pid) == self.proc.pid:
                return reply
            if reply and reply.get("load_error"):
                raise RuntimeError(reply["load_error"])
            time.sleep(0.5)
        raise RuntimeError("worker did not load the model in time: " + Path(self.log_path).read_text()[-3000:])

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout=30):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_daphne(env, port, log_path):
    subprocess.run([PYTHON, "manage.py", "migrate", "-v", "0"], cwd=REPO, env=env, check=True)
    log = open(log_path, "ab")
    proc = subprocess.Popen([os.path.join(os.path.dirname(PYTHON), "daphne"), "-b", "127.0.0.1", "-p", str(port),
                             "r3mes_site.asgi:application"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("daphne did not start: " + Path(log_path).read_text()[-3000:])


def http_ping(base_url):
    def ping():
        try:
            reply = requests.get(f"{base_url}/readyz", timeout=5).json()
        except (requests.RequestException, ValueError):
            return None
        worker = reply.get("worker") or {}
        return worker
    return ping
