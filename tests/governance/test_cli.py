from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from governance.models import ApiToken, User

pytestmark = pytest.mark.django_db


def r3mes(*args):
    out = StringIO()
    call_command("r3mes", *args, stdout=out)
    return out.getvalue()


def test_user_add_with_token_prints_a_working_token_as_the_last_word(client):
    output = r3mes("user", "add", "carol", "--password", "An-excellent-passphrase-7", "--stake", "12.5", "--token")
    raw = output.split()[-1]
    user = User.objects.get(username="carol")
    assert str(user.stake) == "12.500000"
    assert ApiToken.authenticate(raw).user == user
    assert client.get("/api/me", HTTP_AUTHORIZATION=f"Bearer {raw}").json()["username"] == "carol"


def test_user_add_refuses_a_taken_name(alice):
    with pytest.raises(CommandError, match="already exists"):
        r3mes("user", "add", "alice", "--password", "An-excellent-passphrase-7")


def test_user_add_refuses_a_weak_password_and_creates_nothing():
    with pytest.raises(CommandError, match="too common|too short|entirely numeric"):
        r3mes("user", "add", "dan", "--password", "123")
    assert not User.objects.filter(username="dan").exists()


def test_user_add_refuses_a_malformed_wallet_and_negative_stake():
    with pytest.raises(CommandError, match="remes1"):
        r3mes("user", "add", "dan", "--password", "An-excellent-passphrase-7", "--wallet", "remes1bad")
    with pytest.raises(CommandError, match="negative"):
        r3mes("user", "add", "dan", "--password", "An-excellent-passphrase-7", "--stake", "-1")
    assert not User.objects.filter(username="dan").exists()


def test_demo_is_idempotent_and_prints_the_same_credentials():
    first = r3mes("demo")
    second = r3mes("demo")
    credentials = [line for line in first.splitlines() if line.startswith("Demo accounts:")]
    assert len(credentials) == 1 and credentials[0] in second.splitlines()
    assert User.objects.filter(username__in=["admin", "alice", "bob"]).count() == 3
    assert User.objects.get(username="admin").is_superuser
