"""Runs governance actions in a separate process against a file-based SQLite database, so the
concurrency tests race real processes (and threads with their own connections) on one database,
as web workers, Celery workers and two beats would. Usage: python concurrency_worker.py CMD JSON.
Prints one JSON line."""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r3mes_site.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from governance.actions import do_close_due_proposals, do_create_proposal, do_vote  # noqa: E402
from governance.models import Proposal, Refused, User  # noqa: E402
from inference.models import Adapter  # noqa: E402


def barrier(args):
    """Waits until every racing process has imported Django and arrived, so they really race."""
    directory = Path(args["barrier"])
    (directory / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(directory.glob("ready-*"))) < args["parties"]:
        if time.monotonic() > deadline:
            raise SystemExit("barrier timed out")
        time.sleep(0.005)


def setup(args):
    call_command("migrate", verbosity=0)
    voters = []
    for i in range(args["voters"]):
        user = User.objects.create(username=f"voter{i}", stake=Decimal(100 + i))
        voters.append({"username": user.username, "stake": str(user.stake)})
    proposer = User.objects.create(username="proposer", stake=Decimal(50))
    adapter = Adapter.objects.create(expert="coding", version=1, sha256="a" * 64)
    proposal = do_create_proposal(proposer, kind="adapter", target=adapter.pk, title="race", deposit="10")
    return {"proposal": proposal.pk, "voters": voters}


def vote(args):
    proposal = args["proposal"]
    users = {u.username: u for u in User.objects.filter(username__in=[name for name, _ in args["votes"]])}
    connection.close()
    barrier(args)

    def one(item):
        username, option = item
        try:
            do_vote(proposal, users[username], {option: Decimal(1)})
            return "ok"
        except Refused as exc:
            return exc.code
        finally:
            connection.close()  # each thread has its own connection

    with ThreadPoolExecutor(args["threads"]) as pool:
        results = list(pool.map(one, args["votes"]))
    return {"results": results}


def close(args):
    proposal = Proposal.objects.get(pk=args["proposal"])
    now = proposal.voting_end
    connection.close()
    barrier(args)
    return {"closed": {str(k): v for k, v in do_close_due_proposals(now).items()}}


def report(args):
    proposal = Proposal.objects.get(pk=args["proposal"])
    return {
        "status": proposal.status,
        "votes": proposal.votes.count(),
        "tally": proposal.final_tally or proposal.tally().as_dict(),
        "adapter": Adapter.objects.get().status,
        "deposits": list(proposal.deposits.values_list("status", flat=True)),
    }


if __name__ == "__main__":
    command, payload = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"setup": setup, "vote": vote, "close": close, "report": report}[command](payload)))
