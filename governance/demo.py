"""Demo accounts for a fresh node: an admin and two staked members, alice and bob; and, once the
other apps' demo data holds a candidate adapter, pending dataset or available backbone, one open
proposal on it that alice has funded and bob has voted on."""

import secrets
from decimal import Decimal

from django.conf import settings
from django.db import transaction

from .models import Proposal, User

DEMO_USERS = [("alice", Decimal("1000")), ("bob", Decimal("600"))]


def _demo_password():
    # Kept in the data dir so every `make run` prints the same credentials for this instance.
    path = settings.DATA_DIR / "demo_password"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(12))
        path.chmod(0o600)
    return path.read_text().strip()


@transaction.atomic
def seed(out):
    password = _demo_password()
    admin, created = User.objects.get_or_create(
        username="admin", defaults={"is_staff": True, "is_superuser": True, "stake": Decimal("2000")}
    )
    if created:
        admin.set_password(password)
        admin.save()
    for name, stake in DEMO_USERS:
        user, created = User.objects.get_or_create(username=name, defaults={"stake": stake})
        if created:
            user.set_password(password)
            user.save()
    out.write(f"Demo accounts: admin (staff), alice, bob — password: {password}")
    _seed_proposal(out)


def _seed_proposal(out):
    from .actions import do_create_proposal, do_vote
    from .targets import TARGETS

    if Proposal.objects.exists():
        return  # idempotent: the demo proposal, or real ones, already exist
    for kind, entry in TARGETS.items():
        target = entry.candidates().order_by("pk").first()
        if target is not None:
            break
    else:
        return
    alice, bob = User.objects.get(username="alice"), User.objects.get(username="bob")
    proposal = do_create_proposal(
        alice, kind=kind, target=target.pk, title=f"Trust {target}",
        description=f"Demo proposal: approve **{target}** ({entry.label.lower()}).\n\n"
                    "Vote from the detail page; the tally bars update live.",
        deposit=settings.R3MES_GOV_MIN_DEPOSIT,
    )
    if bob.stake > 0 and proposal.status == Proposal.Status.VOTING:
        do_vote(proposal.pk, bob, {"yes": Decimal(1)})
    out.write(f"Demo proposal #{proposal.pk} on {target} ({proposal.status})")
