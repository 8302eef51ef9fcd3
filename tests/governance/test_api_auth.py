import pytest

from governance.models import ApiToken

pytestmark = pytest.mark.django_db


def assert_401_json(response, fragment):
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert fragment in response.json()["error"]["message"]
    assert response.json()["error"]["type"] == "authentication_error"


def test_valid_bearer_token_authenticates_and_records_last_use(client, alice):
    token, raw = ApiToken.issue(alice, "cli")
    response = client.get("/api/me", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert response.status_code == 200
    assert response.json()["username"] == "alice"
    assert response.json()["wallet_address"] == alice.wallet_address
    token.refresh_from_db()
    assert token.last_used is not None


def test_missing_token_gets_401_json_not_a_login_page(client):
    assert_401_json(client.get("/api/me"), "Missing Authorization header")


@pytest.mark.parametrize("header", ["Token abc", "Bearer", "Basic dXNlcjpwYXNz", "Bearer   "])
def test_malformed_authorization_header_gets_401_json(client, header):
    assert_401_json(client.get("/api/me", HTTP_AUTHORIZATION=header), "Malformed Authorization header")


def test_unknown_token_gets_401_json(client, alice):
    assert_401_json(client.get("/api/me", HTTP_AUTHORIZATION="Bearer r3m_nope"), "Invalid or revoked")


def test_revoked_token_gets_401_json(client, alice):
    token, raw = ApiToken.issue(alice, "cli")
    token.revoke()
    assert_401_json(client.get("/api/me", HTTP_AUTHORIZATION=f"Bearer {raw}"), "Invalid or revoked")


def test_token_of_a_deactivated_user_gets_401(client, alice):
    _, raw = ApiToken.issue(alice, "cli")
    alice.is_active = False
    alice.save()
    assert_401_json(client.get("/api/me", HTTP_AUTHORIZATION=f"Bearer {raw}"), "Invalid or revoked")


def test_wrong_method_gets_405_json(api_client):
    response = api_client.post("/api/me")
    assert response.status_code == 405
    assert "use GET" in response.json()["error"]["message"]
