from decimal import Decimal

import pytest

from governance.models import ApiToken, User

PASSWORD = "correct-horse-battery-9"


@pytest.fixture
def alice(db):
    return User.objects.create_user("alice", "alice@example.org", PASSWORD, stake=Decimal("1000"))


@pytest.fixture
def bob(db):
    return User.objects.create_user("bob", "bob@example.org", PASSWORD, stake=Decimal("600"))


@pytest.fixture
def alice_token(alice):
    _, raw = ApiToken.issue(alice, "tests")
    return raw


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def api_client(client, alice_token):
    """A Django test client that sends alice's bearer token with every request."""
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {alice_token}"
    return client


@pytest.fixture
def fresh_channel_layers():
    """Drops cached channel-layer backends so a settings override of CHANNEL_LAYERS takes effect."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
def fresh_rate_limits():
    """Rate-limit buckets live in the session's Redis keyed by user id, and ids repeat between
    tests (each test's rows are rolled back); start every test with full buckets."""
    from r3mes_site.api import redis_client

    client = redis_client()
    keys = list(client.scan_iter("r3mes:rl:*"))
    if keys:
        client.delete(*keys)
