"""The bearer-token governance API: /api/governance/proposals[...], errors in the OpenAI shape."""

import json
from datetime import timedelta
from decimal import Decimal

import pytest

from governance.actions import do_close_due_proposals, do_create_proposal
from governance.models import ApiToken, Proposal, Vote
from inference.models import Adapter

pytestmark = pytest.mark.django_db


def post(client, url, body, **extra):
    return client.post(url, json.dumps(body), content_type="application/json", **extra)


def error(response, status):
    assert response.status_code == status, response.content
    body = response.json()["error"]
    assert body["message"] and body["type"]
    return body


@pytest.fixture
def bob_client(client, bob):
    from django.test import Client

    _, raw = ApiToken.issue(bob, "tests")
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def test_create_deposit_vote_and_read_a_proposal(api_client, bob_client, alice, bob, adapter):
    created = post(api_client, "/api/governance/proposals", {
        "kind": "adapter", "target": adapter.pk, "title": "Approve coding v1", "description": "# Why\nIt helps."})
    assert created.status_code == 201, created.content
    body = created.json()
    pid = body["id"]
    assert body["status"] == "deposit" and body["target"]["facts"]["Expert"] == "coding"

    deposited = post(api_client, f"/api/governance/proposals/{pid}/deposit", {"amount": "10"})
    assert deposited.status_code == 200 and deposited.json()["status"] == "voting"
    assert deposited.json()["total_power"] == "1600.000000"

    assert post(api_client, f"/api/governance/proposals/{pid}/vote", {"option": "yes"}).status_code == 200
    voted = post(bob_client, f"/api/governance/proposals/{pid}/vote", {"weighted": {"no": "0.25", "abstain": 0.75}})
    assert voted.status_code == 200, voted.content
    tally = voted.json()["tally"]
    assert tally["power"] == {"yes": "1000", "no": "150", "abstain": "450", "no_with_veto": "0"}
    assert tally["quorum_reached"] is True and tally["threshold_reached"] is True

    shown = api_client.get(f"/api/governance/proposals/{pid}").json()
    assert shown["voting_end"] and shown["tally"]["status"] == "passed"
    assert {v["voter"] for v in shown["votes"]} == {"alice", "bob"}

    listed = api_client.get("/api/governance/proposals?status=voting").json()
    assert [p["id"] for p in listed["data"]] == [pid]
    assert api_client.get("/api/governance/proposals?status=passed").json()["data"] == []

    proposal = Proposal.objects.get(pk=pid)
    do_close_due_proposals(proposal.voting_end + timedelta(seconds=1))
    assert api_client.get("/api/governance/proposals?status=passed").json()["total"] == 1
    assert Adapter.servable()["coding"].pk == adapter.pk


def test_api_requires_a_bearer_token(client, adapter):
    error(client.get("/api/governance/proposals"), 401)
    error(post(client, "/api/governance/proposals", {"kind": "adapter", "target": adapter.pk, "title": "x"}), 401)


@pytest.mark.parametrize("body, status, code", [
    ({"kind": "adapter", "title": "x"}, 400, "missing_target"),
    ({"kind": "adapter", "target": 999, "title": "x"}, 404, "target_not_found"),
    ({"kind": "adapter", "target": "abc", "title": "x"}, 400, "invalid_target"),
    ({"kind": "spaceship", "target": 1, "title": "x"}, 400, "unknown_kind"),
    ({"kind": "adapter", "target": "ADAPTER", "title": ""}, 400, "missing_title"),
    ({"kind": "adapter", "target": "ADAPTER", "title": "x" * 201}, 400, "title_too_long"),
    ({"kind": "adapter", "target": "ADAPTER", "title": "x", "expedited": "yes"}, 400, "invalid_expedited"),
    ({"kind": "adapter", "target": "ADAPTER", "title": "x", "colour": "red"}, 400, "unknown_field"),
    ({"kind": "adapter", "target": "ADAPTER", "title": "x", "deposit": "5000"}, 400, "insufficient_stake"),
])
def test_bad_proposals_are_refused_and_nothing_is_created(api_client, adapter, body, status, code):
    body = {k: (adapter.pk if v == "ADAPTER" else v) for k, v in body.items()}
    assert error(post(api_client, "/api/governance/proposals", body), status)["code"] == code
    assert not Proposal.objects.exists()


def test_retired_adapter_cannot_be_proposed(api_client, adapter):
    adapter.retire()
    body = error(post(api_client, "/api/governance/proposals", {"kind": "adapter", "target": adapter.pk,
                                                                 "title": "x"}), 409)
    assert body["code"] == "target_not_eligible" and "retired" in body["message"]
    assert not Proposal.objects.exists()


def test_target_of_another_open_proposal_cannot_be_proposed(api_client, alice, adapter):
    first = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="first")
    body = error(post(api_client, "/api/governance/proposals", {"kind": "adapter", "target": adapter.pk,
                                                                 "title": "again"}), 409)
    assert body["code"] == "target_has_open_proposal" and f"#{first.pk}" in body["message"]
    assert Proposal.objects.count() == 1


def test_malformed_json_is_refused(api_client):
    response = api_client.post("/api/governance/proposals", "{nope", content_type="application/json")
    assert "Malformed JSON" in error(response, 400)["message"]


@pytest.mark.parametrize("body, code", [
    ({"option": "maybe"}, "unknown_option"),
    ({"weighted": {"yes": "0.5", "no": "0.4"}}, "weights_sum"),
    ({"weighted": {"yes": "0.5", "perhaps": "0.5"}}, "unknown_option"),
    ({"weighted": {"yes": "1.5", "no": "-0.5"}}, "invalid_weights"),
    ({"weighted": {"yes": "abc"}}, "invalid_weights"),
    ({"weighted": {}}, "invalid_weights"),
    ({"option": "yes", "weighted": {"yes": "1"}}, "invalid_vote"),
    ({}, "invalid_vote"),
])
def test_bad_votes_are_refused_and_nothing_is_recorded(api_client, voting_proposal, body, code):
    response = post(api_client, f"/api/governance/proposals/{voting_proposal.pk}/vote", body)
    assert error(response, 400)["code"] == code
    assert not Vote.objects.exists()


def test_vote_in_deposit_period_is_a_conflict(api_client, alice, adapter):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t")
    body = error(post(api_client, f"/api/governance/proposals/{proposal.pk}/vote", {"option": "yes"}), 409)
    assert body["code"] == "not_in_voting_period" and body["type"] == "conflict_error"


def test_vote_without_stake_is_forbidden(client, voting_proposal):
    from governance.models import User

    poor = User.objects.create_user("poor", password="x", stake=Decimal(0))
    _, raw = ApiToken.issue(poor, "t")
    response = post(client, f"/api/governance/proposals/{voting_proposal.pk}/vote", {"option": "yes"},
                    HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert error(response, 403)["code"] == "no_voting_power"


def test_deposit_more_than_stake_is_refused(api_client, voting_proposal):
    response = post(api_client, f"/api/governance/proposals/{voting_proposal.pk}/deposit", {"amount": "991"})
    assert error(response, 400)["code"] == "insufficient_stake"
    voting_proposal.refresh_from_db()
    assert voting_proposal.total_deposit == 10


def test_unknown_proposal_is_404(api_client):
    assert error(api_client.get("/api/governance/proposals/999"), 404)["code"] == "proposal_not_found"
    assert error(post(api_client, "/api/governance/proposals/999/vote", {"option": "yes"}), 404)
    assert error(post(api_client, "/api/governance/proposals/999/deposit", {"amount": "1"}), 404)


def test_bad_list_filters_are_refused(api_client):
    assert error(api_client.get("/api/governance/proposals?status=sleeping"), 400)["code"] == "unknown_status"
    assert error(api_client.get("/api/governance/proposals?limit=0"), 400)["code"] == "invalid_paging"


def test_wrong_method_is_405(api_client, voting_proposal):
    error(api_client.get(f"/api/governance/proposals/{voting_proposal.pk}/vote"), 405)
