"""Governance pages: list, detail, live partial, vote/deposit forms (htmx and plain), create, my votes."""

from decimal import Decimal

import pytest
from django.urls import reverse

from governance.actions import do_create_proposal, do_vote
from governance.markdown import render_markdown
from governance.models import Proposal, Vote

pytestmark = pytest.mark.django_db
HTMX = {"HTTP_HX_REQUEST": "true"}


def test_everyone_can_read_the_list_and_the_detail(client, voting_proposal):
    listing = client.get(reverse("governance"))
    assert listing.status_code == 200 and "Approve coding v1" in listing.content.decode()
    detail = client.get(reverse("proposal", args=[voting_proposal.pk]))
    html = detail.content.decode()
    assert detail.status_code == 200
    assert "Log in to vote." in html and "eval_loss" in html and "quorum" in html


def test_list_filters_and_search(alice_client, alice, bob, adapter, dataset, settings):
    mine = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="Coding adapter",
                              deposit=settings.R3MES_GOV_MIN_DEPOSIT)
    other = do_create_proposal(bob, kind="dataset", target=dataset.pk, title="Python dataset")
    Proposal.objects.filter(pk=other.pk).update(status="passed")

    def titles(query):
        return alice_client.get(reverse("governance") + query, **HTMX).content.decode()

    assert "Coding adapter" in titles("?filter=open") and "Python dataset" not in titles("?filter=open")
    assert "Python dataset" in titles("?filter=passed") and "Coding adapter" not in titles("?filter=passed")
    assert "Coding adapter" in titles("?filter=mine") and "Python dataset" not in titles("?filter=mine")
    assert "Python dataset" in titles("?q=python") and "Coding adapter" not in titles("?q=python")
    assert "Coding adapter" in titles(f"?q=%23{mine.pk}")
    partial = alice_client.get(reverse("governance") + "?filter=open", **HTMX).content.decode()
    assert "<html" not in partial  # htmx gets only the rows


def test_markdown_is_sanitised(client, alice, adapter):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t",
                                  description="**bold** <script>alert(1)</script> [x](javascript:alert(1))")
    html = client.get(reverse("proposal", args=[proposal.pk])).content.decode()
    assert "<strong>bold</strong>" in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)" in html  # shown as text, never run
    assert 'href="javascript' not in html
    assert 'href="https://e.org"' in render_markdown("[e](https://e.org)")


def test_vote_through_htmx_records_the_vote_and_triggers_a_tally_refresh(alice_client, voting_proposal):
    url = reverse("proposal-vote", args=[voting_proposal.pk])
    response = alice_client.post(url, {"option": "yes"}, **HTMX)
    assert response.status_code == 200 and response["HX-Trigger"] == "tally-changed"
    assert "Vote recorded." in response.content.decode()
    assert Vote.objects.get().options == {"yes": "1"}
    live = alice_client.get(reverse("proposal-live", args=[voting_proposal.pk])).content.decode()
    assert "alice" in live and "every 3s" in live
    alice_client.post(url, {"option": "no"}, **HTMX)
    page = alice_client.get(reverse("proposal", args=[voting_proposal.pk])).content.decode()
    assert "Vote history (2 submissions)" in page and "changed their vote to No" in page


def test_weighted_vote_from_the_form(alice_client, voting_proposal):
    url = reverse("proposal-vote", args=[voting_proposal.pk])
    bad = alice_client.post(url, {"weighted": "on", "weight_yes": "0.5", "weight_no": "0.4"}, **HTMX)
    assert bad.status_code == 400 and "sum to exactly 1" in bad.content.decode()
    assert not Vote.objects.exists()
    good = alice_client.post(url, {"weighted": "on", "weight_yes": "0.6", "weight_no": "0.4"}, **HTMX)
    assert good.status_code == 200
    assert Vote.objects.get().options == {"yes": "0.6", "no": "0.4"}


def test_user_without_stake_sees_why_and_cannot_vote(client, voting_proposal):
    from governance.models import User

    poor = User.objects.create_user("poor", password="x", stake=Decimal(0))
    client.force_login(poor)
    html = client.get(reverse("proposal", args=[voting_proposal.pk])).content.decode()
    assert "no voting power" in html
    response = client.post(reverse("proposal-vote", args=[voting_proposal.pk]), {"option": "yes"}, **HTMX)
    assert response.status_code == 403 and "no voting power" in response.content.decode()
    assert not Vote.objects.exists()


def test_anonymous_vote_is_refused(client, voting_proposal):
    response = client.post(reverse("proposal-vote", args=[voting_proposal.pk]), {"option": "yes"}, **HTMX)
    assert response.status_code == 403
    assert not Vote.objects.exists()


def test_plain_form_vote_without_javascript_redirects_back(alice_client, voting_proposal):
    response = alice_client.post(reverse("proposal-vote", args=[voting_proposal.pk]), {"option": "no"})
    assert response.status_code == 302
    assert Vote.objects.get().options == {"no": "1"}


def test_deposit_form_opens_voting_and_refuses_more_than_the_stake(alice_client, alice, adapter):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t")
    url = reverse("proposal-deposit", args=[proposal.pk])
    too_much = alice_client.post(url, {"amount": "1000.5"}, **HTMX)
    assert too_much.status_code == 400 and "exceeds your available stake" in too_much.content.decode()
    ok = alice_client.post(url, {"amount": "10"}, **HTMX)
    assert ok.status_code == 200 and ok["HX-Refresh"] == "true"
    proposal.refresh_from_db()
    assert proposal.status == "voting"


def test_create_form_lists_candidates_and_creates_a_proposal(alice_client, adapter, dataset, backbones):
    page = alice_client.get(reverse("proposal-create")).content.decode()
    assert f"adapter:{adapter.pk}" in page and f"dataset:{dataset.pk}" in page
    assert f"backbone:{backbones[1].pk}" in page and f"backbone:{backbones[0].pk}" not in page  # active one
    response = alice_client.post(reverse("proposal-create"), {
        "target": f"dataset:{dataset.pk}", "title": "Trust python-qa", "description": "Good data", "deposit": "10"})
    proposal = Proposal.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("proposal", args=[proposal.pk])
    assert proposal.kind == "dataset" and proposal.status == "voting"


def test_create_form_shows_errors(alice_client, alice, adapter):
    do_create_proposal(alice, kind="adapter", target=adapter.pk, title="first")
    response = alice_client.post(reverse("proposal-create"), {"target": f"adapter:{adapter.pk}", "title": "x"})
    assert response.status_code == 200
    assert Proposal.objects.count() == 1
    response = alice_client.post(reverse("proposal-create"), {"target": "", "title": "x"})
    assert "This field is required" in response.content.decode()


def test_create_requires_login(client):
    response = client.get(reverse("proposal-create"))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_my_votes_lists_my_votes(alice_client, alice, voting_proposal):
    do_vote(voting_proposal.pk, alice, {"abstain": Decimal(1)})
    html = alice_client.get(reverse("my-votes")).content.decode()
    assert "Approve coding v1" in html and "Abstain" in html


def test_proposer_cancels_from_the_page(alice_client, alice, adapter):
    proposal = do_create_proposal(alice, kind="adapter", target=adapter.pk, title="t")
    assert "Cancel proposal" in alice_client.get(reverse("proposal", args=[proposal.pk])).content.decode()
    alice_client.post(reverse("proposal-cancel", args=[proposal.pk]))
    proposal.refresh_from_db()
    assert proposal.status == "cancelled"


def test_closed_proposal_live_partial_stops_polling_and_shows_the_result(client, alice, voting_proposal):
    from governance.actions import do_close_proposal
    from tests.governance.conftest import after_voting

    do_vote(voting_proposal.pk, alice, {"yes": Decimal(1)})
    do_close_proposal(voting_proposal.pk, after_voting(voting_proposal))
    live = client.get(reverse("proposal-live", args=[voting_proposal.pk])).content.decode()
    assert "every 3s" not in live and "Result: <strong>Passed</strong>" in live
    assert 'hx-swap-oob="true"' in live


def test_unknown_proposal_page_is_404(client):
    assert client.get("/governance/999/").status_code == 404


def test_dataset_proposal_shows_a_verified_preview_of_the_first_lines(client, alice):
    from mining import blobstore
    from mining.models import Dataset

    body = "".join(f'{{"instruction": "q{i}", "response": "a{i}"}}\n' for i in range(20)).encode()
    cid, size = blobstore.put_bytes(body)
    dataset = Dataset.objects.create(name="qa", expert="coding", format="jsonl", blob_cid=cid,
                                     sha256=blobstore.sha256_hex_from_cid(cid), size_bytes=size, examples=20)
    proposal = do_create_proposal(alice, kind="dataset", target=dataset.pk, title="qa")
    html = client.get(reverse("proposal", args=[proposal.pk])).content.decode()
    assert "q0" in html and "q4" in html and "q5" not in html

    blobstore.path_for(cid).write_bytes(body.replace(b"q0", b"TAMPERED-LINE"))  # corrupted on disk
    html = client.get(reverse("proposal", args=[proposal.pk])).content.decode()
    assert "TAMPERED-LINE" not in html and "corrupt" in html


def test_dataset_missing_from_the_blob_store_says_so(client, alice, dataset):
    proposal = do_create_proposal(alice, kind="dataset", target=dataset.pk, title="qa")
    html = client.get(reverse("proposal", args=[proposal.pk])).content.decode()
    assert "No preview" in html
