"""Concurrent votes and closes, raced by real OS processes with several threads each.

pytest-django's SQLite test database is in memory (shared cache), where concurrent writers get
"table is locked" at once instead of waiting, so it cannot stand for a deployment. These tests run
`concurrency_worker.py` processes against a file-based SQLite database in WAL mode with IMMEDIATE
transactions (the production settings), in a throw-away R3MES_DATA_DIR. On PostgreSQL the same
code relies on SELECT ... FOR UPDATE on the proposal row and the conditional UPDATE."""

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("concurrency_worker.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gov-race")


def make_barrier(data_dir, name):
    path = data_dir / f"barrier-{name}"
    path.mkdir()
    return path


def env_for(data_dir, **extra):
    env = dict(os.environ, R3MES_DATA_DIR=str(data_dir), LOG_LEVEL="ERROR",
               R3MES_GOV_VOTING_PERIOD="3600", R3MES_GOV_EXPEDITED_VOTING_PERIOD="60", **extra)
    env.pop("DATABASE_URL", None)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    return env


def run(data_dir, command, payload):
    done = subprocess.run([sys.executable, str(WORKER), command, json.dumps(payload)], env=env_for(data_dir),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def race(data_dir, command, payloads):
    procs = [subprocess.Popen([sys.executable, str(WORKER), command, json.dumps(p)], env=env_for(data_dir),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in payloads]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.timeout(600)
def test_parallel_votes_and_double_submissions_tally_exactly_and_close_once(data_dir):
    setup = run(data_dir, "setup", {"voters": 24})
    proposal, voters = setup["proposal"], setup["voters"]
    options = ["yes", "no", "abstain", "no_with_veto"]
    plan = [(v["username"], options[i % 4]) for i, v in enumerate(voters)]
    # Two processes each submit every vote (so each voter's vote arrives twice, in parallel).
    sync = {"barrier": str(make_barrier(data_dir, "votes")), "parties": 2}
    results = race(data_dir, "vote", [
        {"proposal": proposal, "votes": plan, "threads": 8, **sync},
        {"proposal": proposal, "votes": list(reversed(plan)), "threads": 8, **sync},
    ])
    assert all(r == "ok" for result in results for r in result["results"])

    report = run(data_dir, "report", {"proposal": proposal})
    assert report["votes"] == len(voters)
    expected = {option: Decimal(0) for option in options}
    for (username, option), voter in zip(plan, voters):
        expected[option] += Decimal(voter["stake"])
    assert {k: Decimal(v) for k, v in report["tally"]["power"].items()} == expected
    assert Decimal(report["tally"]["total_power"]) == sum(Decimal(v["stake"]) for v in voters) + 50

    # Three "beats" close the due proposal at the same instant: exactly one of them closes it.
    sync = {"barrier": str(make_barrier(data_dir, "closes")), "parties": 3}
    closes = race(data_dir, "close", [{"proposal": proposal, **sync}] * 3)
    closed = [c["closed"] for c in closes if c["closed"]]
    assert len(closed) == 1 and list(closed[0]) == [str(proposal)]
    final = run(data_dir, "report", {"proposal": proposal})
    assert final["status"] == closed[0][str(proposal)]
    assert final["deposits"] == ["refunded"] or final["deposits"] == ["burned"]
