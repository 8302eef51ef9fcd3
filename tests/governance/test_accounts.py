import pytest

from governance.models import ApiToken, User
from governance.wallet import WALLET_RE

pytestmark = pytest.mark.django_db

GOOD = "A-long-unusual-passphrase-42"


def signup(client, **fields):
    data = {"username": "dora", "email": "dora@example.org", "password1": GOOD, "password2": GOOD, "wallet_address": ""}
    data.update(fields)
    return client.post("/accounts/signup/", data)


def test_signup_creates_a_user_with_a_generated_wallet_and_logs_in(client):
    response = signup(client)
    assert response.status_code == 302 and response["Location"] == "/accounts/profile/"
    user = User.objects.get(username="dora")
    assert WALLET_RE.match(user.wallet_address)
    assert client.get("/accounts/profile/").status_code == 200


def test_signup_keeps_a_well_formed_wallet_address(client):
    address = "remes1" + "q" * 38
    signup(client, wallet_address=address)
    assert User.objects.get(username="dora").wallet_address == address


def test_signup_with_a_taken_name_gets_a_form_error(client, alice):
    response = signup(client, username="alice")
    assert response.status_code == 200
    assert "username" in response.context["form"].errors
    assert User.objects.filter(username="alice").count() == 1


def test_signup_with_a_weak_password_gets_a_form_error(client):
    response = signup(client, password1="12345678", password2="12345678")
    assert response.status_code == 200
    assert "password2" in response.context["form"].errors
    assert not User.objects.filter(username="dora").exists()


@pytest.mark.parametrize("address", ["remes1short", "cosmos1" + "q" * 37, "remes1" + "Q" * 38, "remes1" + "q" * 39])
def test_signup_with_a_malformed_wallet_address_gets_a_form_error(client, address):
    response = signup(client, wallet_address=address)
    assert response.status_code == 200
    assert "wallet_address" in response.context["form"].errors
    assert not User.objects.filter(username="dora").exists()


def test_signup_with_someone_elses_wallet_is_refused(client, alice):
    response = signup(client, wallet_address=alice.wallet_address)
    assert "wallet_address" in response.context["form"].errors


def test_login_and_logout(client, alice):
    from tests.conftest import PASSWORD

    response = client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert client.get("/accounts/profile/").context["user"] == alice
    client.post("/accounts/logout/")
    assert client.get("/accounts/profile/").status_code == 302


def test_profile_requires_login(client):
    response = client.get("/accounts/profile/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_created_token_is_shown_once_and_only_its_hash_is_stored(alice_client, alice):
    response = alice_client.post("/accounts/profile/", {"name": "laptop"})
    raw = response.context["new_token"]
    assert raw.startswith("r3m_") and raw.encode() in response.content
    token = ApiToken.objects.get(user=alice, name="laptop")
    assert token.key_hash == ApiToken.hash_key(raw) and raw not in token.key_hash
    assert raw.encode() not in alice_client.get("/accounts/profile/").content


def test_duplicate_active_token_name_is_a_form_error(alice_client, alice):
    ApiToken.issue(alice, "laptop")
    response = alice_client.post("/accounts/profile/", {"name": "laptop"})
    assert "name" in response.context["form"].errors
    assert ApiToken.objects.filter(user=alice).count() == 1


def test_revoking_a_token_stops_it_authenticating(alice_client, alice):
    token, raw = ApiToken.issue(alice, "laptop")
    alice_client.post(f"/accounts/tokens/{token.pk}/revoke/")
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert ApiToken.authenticate(raw) is None


def test_nobody_can_revoke_another_users_token(client, alice, bob):
    token, _ = ApiToken.issue(alice, "laptop")
    client.force_login(bob)
    assert client.post(f"/accounts/tokens/{token.pk}/revoke/").status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None


def test_revoke_needs_post(alice_client, alice):
    token, _ = ApiToken.issue(alice, "laptop")
    assert alice_client.get(f"/accounts/tokens/{token.pk}/revoke/").status_code == 405
