"""Admin (close now, stake audit trail), CLI verbs, ledger hook, demo data and settings."""

import subprocess
import sys
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import call_command
from django.urls import reverse

from governance.actions import do_create_proposal, do_vote
from governance.models import Proposal, StakeChange, User
from inference.models import Adapter

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, db):
    admin = User.objects.create_superuser("root", "root@example.org", "x", stake=Decimal(0))
    client.force_login(admin)
    client.admin_user = admin
    return client


def r3mes(*args):
    out = StringIO()
    call_command("r3mes", *args, stdout=out)
    return out.getvalue()


def test_admin_close_now_tallies_a_running_vote(admin_client, alice, voting_proposal, adapter):
    do_vote(voting_proposal.pk, alice, {"yes": Decimal(1)})
    url = reverse("admin:governance_proposal_changelist")
    assert admin_client.get(url + "?status__exact=voting").status_code == 200
    response = admin_client.post(url, {"action": "close_now", "_selected_action": [voting_proposal.pk]})
    assert response.status_code == 302
    voting_proposal.refresh_from_db()
    assert voting_proposal.status == "passed"
    assert Adapter.servable()["coding"].pk == adapter.pk


def test_admin_close_now_ends_a_deposit_period(admin_client, alice, adapter):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t", deposit="1")
    admin_client.post(reverse("admin:governance_proposal_changelist"),
                      {"action": "close_now", "_selected_action": [proposal.pk]})
    proposal.refresh_from_db()
    assert proposal.status == "cancelled" and proposal.deposits.get().status == "refunded"


def test_staff_stake_edit_leaves_an_audit_row(admin_client, alice):
    url = reverse("admin:governance_user_change", args=[alice.pk])
    form = admin_client.get(url).context["adminform"].form
    data = {k: v for k, v in form.initial.items() if v is not None and k not in ("password", "groups",
                                                                                   "user_permissions")}
    data.update({"stake": "1500", "date_joined_0": alice.date_joined.strftime("%Y-%m-%d"),
                 "date_joined_1": alice.date_joined.strftime("%H:%M:%S"), "last_login_0": "", "last_login_1": "",
                 "stake_changes-TOTAL_FORMS": "0", "stake_changes-INITIAL_FORMS": "0"})
    data["is_active"] = "on"
    response = admin_client.post(url, data)
    assert response.status_code == 302, response.context["adminform"].form.errors
    alice.refresh_from_db()
    change = StakeChange.objects.get(user=alice)
    assert alice.stake == 1500
    assert (change.old_stake, change.new_stake, change.changed_by) == (1000, 1500, admin_client.admin_user)


def test_cli_close_due_closes_ended_proposals(alice, voting_proposal):
    do_vote(voting_proposal.pk, alice, {"yes": Decimal(1)})
    Proposal.objects.filter(pk=voting_proposal.pk).update(voting_end=voting_proposal.voting_start)
    output = r3mes("proposals", "close-due")
    assert f"Proposal #{voting_proposal.pk}: passed" in output and "Closed 1 proposal(s)" in output
    assert "Closed 0 proposal(s)" in r3mes("proposals", "close-due")
    assert "passed" in r3mes("proposals", "list", "--status", "passed")


def test_outcome_is_on_the_real_ledger(alice, voting_proposal):
    from governance.actions import do_close_proposal
    from mining.models import Transaction
    from tests.governance.conftest import after_voting

    do_vote(voting_proposal.pk, alice, {"yes": Decimal(1)})
    do_close_proposal(voting_proposal.pk, after_voting(voting_proposal))
    tx = Transaction.objects.get(tx_type="governance_outcome")
    assert tx.payload["proposal"] == voting_proposal.pk and tx.payload["status"] == "passed"


def test_demo_seeds_one_open_proposal_once_targets_exist(alice, bob, adapter):
    r3mes("demo")
    proposal = Proposal.objects.get()
    assert proposal.status == "voting" and proposal.votes.get().voter == bob
    r3mes("demo")
    assert Proposal.objects.count() == 1


def test_bad_governance_setting_fails_with_one_line(tmp_path):
    import os

    env = dict(os.environ, R3MES_GOV_QUORUM="1.5", R3MES_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", "import r3mes_site.settings"], env=env, capture_output=True,
                          text=True)
    assert done.returncode != 0
    assert "R3MES_GOV_QUORUM must be between 0 and 1" in done.stderr


def test_short_periods_come_from_the_environment(tmp_path):
    import os

    env = dict(os.environ, R3MES_GOV_VOTING_PERIOD="20", R3MES_GOV_EXPEDITED_VOTING_PERIOD="5",
               R3MES_DATA_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", "import r3mes_site.settings as s; "
                           "print(s.R3MES_GOV_VOTING_PERIOD, s.R3MES_GOV_EXPEDITED_VOTING_PERIOD, s.R3MES_GOV_QUORUM)"],
                          env=env, capture_output=True, text=True)
    assert done.stdout.split() == ["20", "5", "0.334"], done.stderr
