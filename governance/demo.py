"""Demo accounts for a fresh node: an admin and two staked members, alice and bob."""

import secrets
from decimal import Decimal

from django.conf import settings
from django.db import transaction

from .models import User

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
