from decimal import Decimal, InvalidOperation

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError
from django.db import transaction

from .actions import do_close_due_proposals
from .models import ApiToken, Proposal, User
from .wallet import validate_wallet_address


def register(subparsers):
    user = subparsers.add_parser("user", help="Manage users")
    verbs = user.add_subparsers(dest="user_verb", required=True, metavar="ACTION")
    add = verbs.add_parser("add", help="Create a user; with --token, print a new API token as the last word")
    add.add_argument("name")
    add.add_argument("--password", required=True)
    add.add_argument("--stake", default="0")
    add.add_argument("--email", default="")
    add.add_argument("--wallet", default="")
    add.add_argument("--staff", action="store_true")
    add.add_argument("--token", action="store_true", help="Also create an API token and print it last")
    add.set_defaults(handler=add_user)

    proposals = subparsers.add_parser("proposals", help="Governance proposals")
    verbs = proposals.add_subparsers(dest="proposals_verb", required=True, metavar="ACTION")
    close_due = verbs.add_parser("close-due", help="Close ended voting periods and expire ended deposit periods now")
    close_due.set_defaults(handler=close_due_proposals)
    listing = verbs.add_parser("list", help="List proposals")
    listing.add_argument("--status", choices=[s.value for s in Proposal.Status])
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=list_proposals)


def add_user(command, options):
    name = options["name"]
    if User.objects.filter(username=name).exists():
        raise CommandError(f"User {name!r} already exists")
    try:
        stake = Decimal(options["stake"])
    except InvalidOperation:
        raise CommandError(f"--stake must be a decimal number, got {options['stake']!r}") from None
    if stake < 0:
        raise CommandError("--stake must not be negative")
    user = User(username=name, email=options["email"], stake=stake, is_staff=options["staff"])
    try:
        if options["wallet"]:
            validate_wallet_address(options["wallet"])
            user.wallet_address = options["wallet"]
        validate_password(options["password"], user)
        user.full_clean(exclude=["password"])
    except ValidationError as exc:
        raise CommandError("; ".join(exc.messages)) from None
    with transaction.atomic():
        user.set_password(options["password"])
        user.save()
        line = f"Created user {user.username} (wallet {user.wallet_address}, stake {user.stake})"
        if options["token"]:
            _, raw = ApiToken.issue(user, "cli")
            line += f"; API token: {raw}"
    command.stdout.write(line)


def close_due_proposals(command, options):
    done = do_close_due_proposals()
    for pk, outcome in sorted(done.items()):
        command.stdout.write(f"Proposal #{pk}: {outcome}")
    command.stdout.write(f"Closed {len(done)} proposal(s)")


def list_proposals(command, options):
    import json

    from .api import proposal_json

    proposals = Proposal.objects.select_related("proposer")
    if options["status"]:
        proposals = proposals.filter(status=options["status"])
    if options["json"]:
        command.stdout.write(json.dumps([proposal_json(p, with_votes=False) for p in proposals], indent=2))
        return
    for p in proposals:
        ends = p.period_end.isoformat(timespec="seconds") if p.period_end else "-"
        command.stdout.write(f"#{p.pk:<5} {p.status:<10} {p.kind:<9} {p.target_label[:30]:<30} ends {ends}  {p.title}")
