from decimal import Decimal, InvalidOperation

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management.base import CommandError
from django.db import transaction

from .models import ApiToken, User
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
