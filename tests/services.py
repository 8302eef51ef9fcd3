"""Real services for the test session, started before Django reads its settings.

Loaded with `-p tests.services` (pytest.ini), so it runs before pytest-django imports the
settings: a private redis-server on a free port (never fakeredis), and a throw-away data dir.
The converted default model is kept between sessions in `var/models` (R3MES_MODEL_CACHE_DIR), so
only the first run pays for the conversion.
"""

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory):
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; `make test` installs it (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not start on port {port}")


_tmp = Path(tempfile.mkdtemp(prefix="r3mes-test-"))
_redis, REDIS_PORT = start_redis(_tmp)
os.environ["REDIS_URL"] = f"redis://127.0.0.1:{REDIS_PORT}/0"
os.environ["R3MES_DATA_DIR"] = str(_tmp / "data")
os.environ.setdefault("R3MES_MODEL_CACHE_DIR", str(REPO / "var" / "models"))
os.environ.setdefault("LOG_FORMAT", "text")
# `r3mes demo` would queue the starter training on the session's broker, where a later test's real
# Celery worker would pick it up and spend minutes training; the starter tests switch it on.
os.environ.setdefault("R3MES_STARTER_AUTO_TRAIN", "0")
# Workers started by tests decode eagerly: compiling costs each worker start a minute here. The
# compiled decode step has its own tests (tests/inference/engine/test_compiled_decode.py).
os.environ.setdefault("R3MES_COMPILE", "0")
os.environ.setdefault("LOG_LEVEL", "WARNING")


@atexit.register
def _stop():
    _redis.terminate()
    try:
        _redis.wait(5)
    except subprocess.TimeoutExpired:
        _redis.kill()
    shutil.rmtree(_tmp, ignore_errors=True)
