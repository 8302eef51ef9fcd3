"""Proposal life cycle under Cosmos x/gov rules: deposits, snapshots, votes, closing, execution."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from governance.actions import (
    do_cancel_proposal, do_close_due_proposals, do_close_proposal, do_create_proposal, do_deposit, do_vote,
)
from governance.models import Deposit, Proposal, Refused, StakeChange, User, Vote
from inference.models import Adapter
from tests.governance.conftest import after_voting

pytestmark = pytest.mark.django_db
D = Decimal
YES, NO, ABSTAIN, VETO = ({"yes": D(1)}, {"no": D(1)}, {"abstain": D(1)}, {"no_with_veto": D(1)})


def test_minimum_deposit_opens_voting_and_snapshots_every_stake(alice, bob, carol, adapter, settings):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t", deposit="4")
    assert proposal.status == "deposit" and proposal.voting_start is None
    do_deposit(proposal.pk, bob, "5.5")
    proposal.refresh_from_db()
    assert proposal.status == "deposit" and proposal.total_deposit == D("9.5")
    do_deposit(proposal.pk, carol, "0.5")
    proposal.refresh_from_db()
    assert proposal.status == "voting"
    assert proposal.total_power == D(2000)
    assert proposal.voting_end - proposal.voting_start == timedelta(seconds=settings.R3MES_GOV_VOTING_PERIOD)
    assert {s.user.username: s.power for s in proposal.snapshots.all()} == {
        "alice": D(1000), "bob": D(600), "carol": D(400)}


def test_deposit_cannot_exceed_stake_counting_deposits_locked_elsewhere(alice, adapter, dataset):
    first = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="a")
    second = do_create_proposal(alice, kind="dataset", target=dataset.pk, title="d")
    settings_min = first.min_deposit
    assert settings_min <= 900
    do_deposit(first.pk, alice, "900")
    with pytest.raises(Refused, match="exceeds your available stake of 100") as exc:
        do_deposit(second.pk, alice, "100.5")
    assert exc.value.code == "insufficient_stake"
    assert not second.deposits.exists()
    do_deposit(second.pk, alice, "100")  # exactly what is left is fine


@pytest.mark.parametrize("amount", ["0", "-5", "abc", "NaN", "Infinity", True, None, "1.0000001"])
def test_bad_deposit_amounts_are_refused(alice, voting_proposal, amount):
    before = voting_proposal.deposits.count()
    with pytest.raises(Refused):
        do_deposit(voting_proposal.pk, alice, amount)
    assert voting_proposal.deposits.count() == before


def test_expired_deposit_period_cancels_and_refunds_by_default(alice, adapter):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t", deposit="3")
    assert do_close_due_proposals(timezone.now()) == {}
    done = do_close_due_proposals(proposal.deposit_end + timedelta(seconds=1))
    assert done == {proposal.pk: "cancelled"}
    proposal.refresh_from_db()
    assert proposal.status == "cancelled" and "without the minimum deposit" in proposal.outcome_note
    assert proposal.deposits.get().status == "refunded"
    alice.refresh_from_db()
    assert alice.stake == 1000 and alice.available_stake() == 1000


def test_expired_deposit_is_burned_when_configured(alice, adapter, settings):
    settings.R3MES_GOV_BURN_PROPOSAL_DEPOSIT_PREVOTE = True
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t", deposit="3")
    do_close_due_proposals(proposal.deposit_end + timedelta(seconds=1))
    alice.refresh_from_db()
    assert alice.stake == 997
    change = StakeChange.objects.get(user=alice)
    assert (change.old_stake, change.new_stake) == (1000, 997) and "burned" in change.reason


def test_proposer_cancels_in_deposit_period_and_half_the_deposits_burn(alice, bob, adapter):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t", deposit="4")
    do_deposit(proposal.pk, bob, "2")
    with pytest.raises(Refused, match="Only the proposer"):
        do_cancel_proposal(proposal.pk, bob)
    do_cancel_proposal(proposal.pk, alice)
    proposal.refresh_from_db()
    alice.refresh_from_db()
    bob.refresh_from_db()
    assert proposal.status == "cancelled"
    assert (alice.stake, bob.stake) == (D(998), D(599))
    # The target is free for a new proposal.
    do_create_proposal(bob, kind="adapter", target=adapter.pk, title="again")


def test_cancel_is_refused_once_voting_opened(alice, voting_proposal):
    with pytest.raises(Refused, match="deposit period") as exc:
        do_cancel_proposal(voting_proposal.pk, alice)
    assert exc.value.status == 409
    voting_proposal.refresh_from_db()
    assert voting_proposal.status == "voting"


def test_vote_change_replaces_the_earlier_vote(alice, voting_proposal):
    first = do_vote(voting_proposal.pk, alice, YES)
    second = do_vote(voting_proposal.pk, alice, NO)
    assert Vote.objects.filter(proposal=voting_proposal).count() == 1
    assert second.pk == first.pk and second.changed_at >= first.changed_at
    tally = voting_proposal.tally()
    assert tally.power["yes"] == 0 and tally.power["no"] == 1000
    history = list(voting_proposal.vote_history.order_by("at", "id").values_list("options", "first"))
    assert history == [({"yes": "1"}, True), ({"no": "1"}, False)]


def test_stake_moved_after_the_snapshot_changes_no_voting_power(alice, bob, voting_proposal):
    StakeChange.apply(alice, D(0), reason="moved away")
    StakeChange.apply(bob, D(5000), reason="topped up")
    late = User.objects.create_user("dave", password="x", stake=D(10_000))
    do_vote(voting_proposal.pk, alice, YES)
    do_vote(voting_proposal.pk, bob, NO)
    with pytest.raises(Refused, match="no voting power") as exc:
        do_vote(voting_proposal.pk, late, YES)
    assert exc.value.status == 403
    tally = voting_proposal.tally()
    assert tally.power["yes"] == 1000 and tally.power["no"] == 600
    assert tally.total_power == 2000


def test_user_without_stake_cannot_vote(voting_proposal):
    nobody = User.objects.create_user("nobody", password="x", stake=D(0))
    with pytest.raises(Refused, match="no voting power"):
        do_vote(voting_proposal.pk, nobody, YES)
    assert not voting_proposal.votes.exists()


def test_vote_outside_the_voting_period_is_refused(alice, adapter):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t")
    with pytest.raises(Refused, match="not in its voting period"):
        do_vote(proposal.pk, alice, YES)
    do_deposit(proposal.pk, alice, "10")
    proposal.refresh_from_db()
    with pytest.raises(Refused, match="not in its voting period"):
        do_vote(proposal.pk, alice, YES, now=after_voting(proposal))
    assert not proposal.votes.exists()


def test_weighted_vote_splits_the_power(alice, bob, voting_proposal):
    do_vote(voting_proposal.pk, alice, {"yes": D("0.7"), "no_with_veto": D("0.3")})
    do_vote(voting_proposal.pk, bob, {"abstain": D("0.5"), "no": D("0.5")})
    power = voting_proposal.tally().power
    assert power == {"yes": D(700), "no": D(300), "abstain": D(300), "no_with_veto": D(300)}


def test_quorum_miss_fails_and_refunds_deposits(alice, bob, voting_proposal, adapter):
    do_vote(voting_proposal.pk, bob, YES)  # 600 of 2000 = 0.3 < 0.334
    outcome = do_close_proposal(voting_proposal.pk, after_voting(voting_proposal))
    voting_proposal.refresh_from_db()
    adapter.refresh_from_db()
    assert outcome == "failed" and voting_proposal.final_tally["quorum_reached"] is False
    assert adapter.status == "candidate"
    assert voting_proposal.deposits.get().status == "refunded"


def test_all_abstain_fails(alice, bob, voting_proposal):
    do_vote(voting_proposal.pk, alice, ABSTAIN)
    do_vote(voting_proposal.pk, bob, ABSTAIN)
    assert do_close_proposal(voting_proposal.pk, after_voting(voting_proposal)) == "failed"
    voting_proposal.refresh_from_db()
    assert voting_proposal.outcome_note == "every vote cast was Abstain"


def test_veto_vetoes_and_burns_the_deposit(alice, bob, carol, voting_proposal, adapter):
    do_vote(voting_proposal.pk, alice, YES)
    do_vote(voting_proposal.pk, bob, VETO)  # 600 / 1600 = 0.375 > 0.334
    assert do_close_proposal(voting_proposal.pk, after_voting(voting_proposal)) == "vetoed"
    deposit = Deposit.objects.get(proposal=voting_proposal)
    alice.refresh_from_db()
    adapter.refresh_from_db()
    assert deposit.status == "burned" and deposit.burned == 10
    assert alice.stake == 990
    assert adapter.status == "candidate"


def test_threshold_exactly_half_is_rejected_and_the_target_is_left_as_it_was(alice, bob, carol, voting_proposal,
                                                                              adapter):
    do_vote(voting_proposal.pk, alice, {"yes": D("0.5"), "no": D("0.5")})
    do_vote(voting_proposal.pk, bob, {"yes": D("0.5"), "no": D("0.5")})
    do_vote(voting_proposal.pk, carol, ABSTAIN)
    assert do_close_proposal(voting_proposal.pk, after_voting(voting_proposal)) == "rejected"
    voting_proposal.refresh_from_db()
    assert voting_proposal.final_tally["yes_ratio"] == "0.500000"
    adapter.refresh_from_db()
    assert adapter.status == "candidate"
    assert voting_proposal.deposits.get().status == "refunded"


def test_passing_makes_the_adapter_servable(alice, bob, voting_proposal, adapter):
    assert "coding" not in Adapter.servable()
    do_vote(voting_proposal.pk, alice, YES)
    do_vote(voting_proposal.pk, bob, NO)
    assert do_close_proposal(voting_proposal.pk, after_voting(voting_proposal)) == "passed"
    assert Adapter.servable()["coding"].pk == adapter.pk
    voting_proposal.refresh_from_db()
    assert voting_proposal.status == "passed" and voting_proposal.closed_at is not None


def test_passing_a_dataset_makes_it_minable(alice, dataset, settings):
    proposal = do_create_proposal(alice, kind="dataset", target=dataset.pk, title="d",
                                  deposit=settings.R3MES_GOV_MIN_DEPOSIT)
    do_vote(proposal.pk, alice, YES)
    assert do_close_proposal(proposal.pk, after_voting(proposal)) == "passed"
    dataset.refresh_from_db()
    assert dataset.status == "approved" and dataset.approved_at is not None


def test_passing_a_backbone_activates_it_and_remembers_the_previous_one(alice, backbones, settings):
    old, new = backbones
    proposal = do_create_proposal(alice, kind="backbone", target=new.pk, title="b",
                                  deposit=settings.R3MES_GOV_MIN_DEPOSIT)
    do_vote(proposal.pk, alice, YES)
    assert do_close_proposal(proposal.pk, after_voting(proposal)) == "passed"
    old.refresh_from_db()
    new.refresh_from_db()
    assert (old.status, new.status) == ("available", "active")
    assert new.previous == old and new.activated_at is not None


def test_target_retired_during_voting_makes_the_passed_proposal_failed(alice, voting_proposal, adapter):
    do_vote(voting_proposal.pk, alice, YES)
    adapter.retire()
    assert do_close_proposal(voting_proposal.pk, after_voting(voting_proposal)) == "failed"
    voting_proposal.refresh_from_db()
    assert "retired" in voting_proposal.outcome_note
    assert "coding" not in Adapter.servable()


def test_expedited_failure_falls_back_to_a_regular_vote_then_passes(alice, bob, carol, adapter, settings):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="fast", expedited=True,
                                  deposit=settings.R3MES_GOV_EXPEDITED_MIN_DEPOSIT)
    assert proposal.status == "voting"
    assert proposal.voting_end - proposal.voting_start == timedelta(seconds=settings.R3MES_GOV_EXPEDITED_VOTING_PERIOD)
    do_vote(proposal.pk, alice, YES)
    do_vote(proposal.pk, bob, NO)  # yes 1000 / 1600 = 0.625: not above 0.667, above 0.5
    assert do_close_proposal(proposal.pk, after_voting(proposal)) == "converted"
    proposal.refresh_from_db()
    assert proposal.status == "voting" and proposal.expedited is False
    assert proposal.expedited_tally["status"] == "rejected"
    assert proposal.voting_end == proposal.voting_start + timedelta(seconds=settings.R3MES_GOV_VOTING_PERIOD)
    assert proposal.votes.count() == 2  # votes carry over; voters may still change them
    do_vote(proposal.pk, carol, YES, now=proposal.voting_end - timedelta(seconds=5))
    assert do_close_proposal(proposal.pk, after_voting(proposal)) == "passed"
    assert Adapter.servable()["coding"].pk == adapter.pk


def test_expedited_deposit_needs_the_expedited_minimum(alice, adapter, settings):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="fast", expedited=True,
                                  deposit=settings.R3MES_GOV_MIN_DEPOSIT)
    assert proposal.status == "deposit"


def test_closing_twice_closes_once(alice, voting_proposal):
    do_vote(voting_proposal.pk, alice, YES)
    when = after_voting(voting_proposal)
    assert do_close_proposal(voting_proposal.pk, when) == "passed"
    assert do_close_proposal(voting_proposal.pk, when) is None
    assert do_close_due_proposals(when) == {}


def test_not_due_proposal_is_not_closed(alice, voting_proposal):
    do_vote(voting_proposal.pk, alice, YES)
    assert do_close_proposal(voting_proposal.pk, timezone.now()) is None
    voting_proposal.refresh_from_db()
    assert voting_proposal.status == "voting"


def test_beat_task_closes_due_proposals(alice, voting_proposal):
    from governance.tasks import close_due_proposals

    do_vote(voting_proposal.pk, alice, YES)
    Proposal.objects.filter(pk=voting_proposal.pk).update(voting_end=timezone.now() - timedelta(seconds=1))
    assert close_due_proposals() == {str(voting_proposal.pk): "passed"}
    assert close_due_proposals() == {}


def test_beat_schedule_has_the_close_task(settings):
    entry = settings.CELERY_BEAT_SCHEDULE["governance-close-due"]
    assert entry["task"] == "governance.tasks.close_due_proposals"
    from r3mes_site.celery import app

    app.loader.import_default_modules()
    assert "governance.tasks.close_due_proposals" in app.tasks


def test_veto_burns_every_deposit_of_a_depositor_who_deposited_twice(alice, bob, adapter):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t", deposit="4")
    do_deposit(proposal.pk, alice, "6")
    do_vote(proposal.pk, bob, VETO)
    proposal.refresh_from_db()
    assert do_close_proposal(proposal.pk, after_voting(proposal)) == "vetoed"
    alice.refresh_from_db()
    assert alice.stake == 990
    assert list(StakeChange.objects.filter(user=alice).order_by("id").values_list("new_stake", flat=True)) == [
        D(996), D(990)]
