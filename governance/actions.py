"""Governance work that spans several models: proposals and their targets, deposits and stakes,
closing and executing, the ledger. Views, the API, the CLI and Celery tasks call these functions;
each one is a transaction, so a refused request changes nothing."""

import logging
from datetime import timedelta
from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from mining import ledger
from r3mes_site import metrics

from .models import Proposal, Refused, User
from .targets import TARGETS, get_target

log = logging.getLogger(__name__)

TITLE_MAX = 200
DESCRIPTION_MAX = 20_000


# --- access / check ------------------------------------------------------------------------------


def access_proposal(proposal_id):
    try:
        return Proposal.objects.select_related("proposer").get(pk=int(proposal_id))
    except (Proposal.DoesNotExist, ValueError, TypeError):
        raise Refused(f"No proposal with id {proposal_id}", code="proposal_not_found", status=404) from None


def check_amount(raw):
    """A positive Decimal from user input (string or number), or Refused."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float, Decimal)):
        raise Refused("The amount must be a number", code="invalid_amount", param="amount")
    try:
        amount = Decimal(str(raw).strip())
    except InvalidOperation:
        raise Refused(f"The amount must be a number, got {raw!r}", code="invalid_amount", param="amount") from None
    if not amount.is_finite() or amount <= 0:
        raise Refused("The amount must be a positive number", code="invalid_amount", param="amount")
    return amount


def check_target(kind, target_id):
    """The object a new proposal of `kind` would target, if it may be proposed."""
    if kind not in TARGETS:
        raise Refused(f"Unknown proposal kind {kind!r}; use one of {', '.join(TARGETS)}", code="unknown_kind",
                      param="kind")
    label = TARGETS[kind].label.lower()
    if target_id is None or target_id == "":
        raise Refused(f"Name the {label} to propose: 'target' must be its id", code="missing_target", param="target")
    if isinstance(target_id, bool):
        raise Refused("'target' must be an id (an integer)", code="invalid_target", param="target")
    try:
        target_id = int(target_id)
    except (TypeError, ValueError):
        raise Refused(f"'target' must be an id (an integer), got {target_id!r}", code="invalid_target",
                      param="target") from None
    target = get_target(kind, target_id) if target_id > 0 else None
    if target is None:
        raise Refused(f"No {label} with id {target_id}", code="target_not_found", status=404, param="target")
    if target.status != TARGETS[kind].eligible_status:
        raise Refused(f"{target} is {target.status}: {TARGETS[kind].ineligible_reason}", code="target_not_eligible",
                      status=409, param="target")
    open_proposal = Proposal.objects.filter(kind=kind, target_id=target_id, status__in=Proposal.OPEN).first()
    if open_proposal is not None:
        raise Refused(f"{target} already has an open proposal: #{open_proposal.pk}", code="target_has_open_proposal",
                      status=409, param="target")
    return target


# --- do -------------------------------------------------------------------------------------------


def do_create_proposal(proposer, *, kind, target, title, description="", expedited=False, deposit=None, now=None):
    now = now or timezone.now()
    title = (title or "").strip() if isinstance(title, str) else title
    if not isinstance(title, str) or not title:
        raise Refused("Give the proposal a title", code="missing_title", param="title")
    if len(title) > TITLE_MAX:
        raise Refused(f"The title must be at most {TITLE_MAX} characters", code="title_too_long", param="title")
    if not isinstance(description, str):
        raise Refused("The description must be Markdown text", code="invalid_description", param="description")
    if len(description) > DESCRIPTION_MAX:
        raise Refused(f"The description must be at most {DESCRIPTION_MAX} characters", code="description_too_long",
                      param="description")
    if not isinstance(expedited, bool):
        raise Refused("'expedited' must be true or false", code="invalid_expedited", param="expedited")
    amount = check_amount(deposit) if deposit not in (None, "", 0, "0") else None
    with transaction.atomic():
        target_obj = check_target(kind, target)
        proposal = Proposal(
            kind=kind, target_id=target_obj.pk, target_label=str(target_obj)[:200], title=title,
            description=description, proposer=proposer, expedited=expedited, submit_time=now,
            deposit_end=now + timedelta(seconds=settings.R3MES_GOV_DEPOSIT_PERIOD),
        )
        try:
            with transaction.atomic():
                proposal.save()
        except IntegrityError:
            # Another request opened a proposal on the same target between our check and insert.
            raise Refused(f"{target_obj} already has an open proposal", code="target_has_open_proposal",
                          status=409, param="target") from None
        if amount is not None:
            depositor = User.objects.select_for_update().get(pk=proposer.pk)
            proposal.deposit(depositor, amount, now)
            metrics.governance_deposits.inc()
    return proposal


def do_deposit(proposal_id, user, amount, now=None):
    amount = check_amount(amount)
    with transaction.atomic():
        # Row locks (PostgreSQL; SQLite serialises writers) so two deposits cannot both spend
        # the same available stake or both open the voting period.
        proposal = Proposal.objects.select_for_update().filter(pk=proposal_id).first()
        if proposal is None:
            raise Refused(f"No proposal with id {proposal_id}", code="proposal_not_found", status=404)
        depositor = User.objects.select_for_update().get(pk=user.pk)
        deposit = proposal.deposit(depositor, amount, now)
    metrics.governance_deposits.inc()
    return deposit


def do_vote(proposal_id, user, weights, now=None):
    """Casts or changes `user`'s vote. Holding the proposal row makes concurrent submissions by one
    voter serialise into one vote (and the unique constraint backs that up)."""
    with transaction.atomic():
        proposal = Proposal.objects.select_for_update().filter(pk=proposal_id).first()
        if proposal is None:
            raise Refused(f"No proposal with id {proposal_id}", code="proposal_not_found", status=404)
        vote = proposal.cast_vote(user, weights, now)
    metrics.governance_votes.inc()
    return vote


def do_cancel_proposal(proposal_id, user, now=None):
    with transaction.atomic():
        proposal = access_proposal(proposal_id)
        proposal.cancel(user, now)
    metrics.governance_proposals_closed.labels(outcome="cancelled").inc()
    return proposal


def execute_proposal(proposal):
    """Runs a passed proposal on its target (registry by kind); a target that vanished or changed
    status meanwhile makes the proposal failed, as a failing message does in Cosmos."""
    kind = TARGETS[proposal.kind]
    target = get_target(proposal.kind, proposal.target_id)
    if target is None:
        proposal.mark_failed(f"passed, but the {kind.label.lower()} no longer exists")
        return False
    if target.status != kind.eligible_status:
        proposal.mark_failed(f"passed, but {target} is now {target.status}: {kind.ineligible_reason}")
        return False
    kind.execute(target)
    return True


def do_close_proposal(proposal_id, now=None, *, force=False):
    """Closes one proposal if its voting period is over (or `force`). Exactly once: the claim is a
    conditional UPDATE inside Proposal.close(), and the execution and ledger record commit with it.
    Returns the outcome (a status, "converted", or None if there was nothing to do)."""
    now = now or timezone.now()
    with transaction.atomic():
        proposal = Proposal.objects.filter(pk=proposal_id).first()
        if proposal is None:
            return None
        if proposal.status == Proposal.Status.DEPOSIT and force:
            outcome = Proposal.Status.CANCELLED if proposal.expire(now, force=True) else None
        else:
            outcome, _ = proposal.close(now, force=force)
            if outcome == Proposal.Status.PASSED:
                execute_proposal(proposal)
                outcome = proposal.status
        if outcome in (None, "converted"):
            return outcome
        record_outcome(proposal)
    metrics.governance_proposals_closed.labels(outcome=outcome).inc()
    log.info("proposal #%s closed: %s", proposal.pk, outcome)
    return outcome


def do_expire_proposal(proposal_id, now=None):
    with transaction.atomic():
        proposal = Proposal.objects.filter(pk=proposal_id).first()
        if proposal is None or not proposal.expire(now):
            return None
        record_outcome(proposal)
    metrics.governance_proposals_closed.labels(outcome="cancelled").inc()
    return Proposal.Status.CANCELLED


def do_close_due_proposals(now=None):
    """Closes every voting period and expires every deposit period that has ended.
    Returns {proposal id: outcome} for the proposals this call changed."""
    now = now or timezone.now()
    done = {}
    due_votes = Proposal.objects.filter(status=Proposal.Status.VOTING, voting_end__lte=now).values_list("pk", flat=True)
    for pk in list(due_votes):
        outcome = do_close_proposal(pk, now)
        if outcome is not None:
            done[pk] = outcome
    due_deposits = Proposal.objects.filter(status=Proposal.Status.DEPOSIT, deposit_end__lte=now)
    for pk in list(due_deposits.values_list("pk", flat=True)):
        outcome = do_expire_proposal(pk, now)
        if outcome is not None:
            done[pk] = outcome
    return done


def outcome_payload(proposal):
    return {
        "proposal": proposal.pk,
        "kind": proposal.kind,
        "target": proposal.target_id,
        "target_label": proposal.target_label,
        "title": proposal.title,
        "proposer": proposal.proposer.wallet_address,
        "status": proposal.status,
        "note": proposal.outcome_note,
        "total_deposit": str(proposal.total_deposit),
        "tally": proposal.final_tally,
        "closed_at": proposal.closed_at.isoformat() if proposal.closed_at else None,
    }


def record_outcome(proposal):
    """Records a final outcome on the ledger. Runs inside the closing transaction, so the outcome
    and its record commit together."""
    return ledger.record("governance_outcome", outcome_payload(proposal))
