"""`make run`'s process supervisor: every process starts on the requested port, and Ctrl-C stops
them all (the real script, real Redis, Daphne, Celery and the inference worker)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port_pair():
    """A web port whose Redis port (port + 10000, as run.sh derives it) is free too."""
    import socket

    for port in range(20000 + os.getpid() % 20000, 55000, 7):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def descendants(root):
    """{pid: args} of every process below `root` (honcho puts each child in its own session)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children, args = {}, {}
    for line in out.splitlines():
        pid, ppid, *rest = line.split(None, 2)
        children.setdefault(int(ppid), []).append(int(pid))
        args[int(pid)] = rest[0] if rest else ""
    found, stack = {}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found[child] = args[child]
            stack.append(child)
    return found


def policy(pid):
    """The process's scheduling policy, None once it has exited."""
    try:
        return os.sched_getscheduler(pid)
    except ProcessLookupError:
        return None


def autogroup(pid):
    """'/autogroup-N nice K' of the process (None: exited, or a kernel without autogroups)."""
    try:
        return Path(f"/proc/{pid}/autogroup").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid):
    """Running (a zombie has exited; it only waits for whoever inherited it to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_run_script_serves_on_port_and_ctrl_c_leaves_no_process_behind(tmp_path):
    port = free_port_pair()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DJANGO_SETTINGS_MODULE")}
    env.update({"PORT": str(port), "R3MES_DATA_DIR": str(tmp_path / "data")})
    subprocess.run([str(REPO / ".venv/bin/python"), "manage.py", "migrate", "-v", "0"], cwd=REPO, env=env, check=True)
    proc = subprocess.Popen(["scripts/run.sh"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        health = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert health is not None and health.status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
        assert ready["checks"]["database"]["ok"] and ready["checks"]["redis"]["ok"]
        # The inference worker answers pings through this instance's own Redis (port + 10000).
        assert "worker" in ready, ready
        # Each process waits for Redis, then execs its program: give the slowest a moment.
        expected = ("redis-server", "daphne", "r3mes worker", "celery -A r3mes_site worker", "celery -A r3mes_site beat")
        deadline = time.monotonic() + 60
        while True:
            started = descendants(proc.pid)
            names = " ".join(started.values())
            missing = [name for name in expected if name not in names]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert missing == [], names
        started = descendants(proc.pid)
        # Background work (training, ingestion) yields the cores to chats: SCHED_IDLE, inherited
        # by Celery's prefork children.
        policies = {pid: policy(pid) for pid in started}
        celery = [policies[pid] for pid, args in started.items() if "celery -A r3mes_site worker" in args]
        assert celery and set(celery) - {None} == {os.SCHED_IDLE}, celery
        inference = [policies[pid] for pid, args in started.items() if "r3mes worker" in args]
        assert inference == [os.SCHED_OTHER]  # chats keep the normal policy
        # With the kernel's autogroups, CPU time is shared between sessions first, and honcho gives
        # each process its own: the policy alone leaves Celery an equal share (chats at 2-50 tok/s
        # beside a training, benchmarks/RESULTS.md), so its session's group runs at nice 19.
        # (Skipped only on a kernel without autogroups, where the policy alone does the job.)
        if os.access(f"/proc/{os.getpid()}/autogroup", os.W_OK):
            celery_groups = {autogroup(pid) for pid, args in started.items() if "r3mes_site worker" in args} - {None}
            inference_group = [autogroup(pid) for pid, args in started.items() if "r3mes worker" in args][0]
            assert celery_groups and all(g.endswith(" nice 19") for g in celery_groups), celery_groups
            assert inference_group.endswith(" nice 0") and inference_group not in celery_groups
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    # A Celery prefork child can outlive its parent by a moment on a busy machine: allow it 15 s.
    deadline = time.monotonic() + 15
    while [pid for pid in started if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.25)
    assert [args for pid, args in started.items() if alive(pid)] == []
