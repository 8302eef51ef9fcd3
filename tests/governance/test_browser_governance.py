import os
import time

import pytest
from django.utils import timezone

from governance.models import Proposal
from governance.tasks import close_due_proposals
from inference.models import Adapter
from tests.browser import chromium_page
from tests.conftest import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Playwright's sync API runs an event loop in this thread; Django's ORM is used only around it.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def log_in(page, base, username):
    page.goto(base + "/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(base + "/")


def seg_width(page, selector):
    return page.eval_on_selector(selector, "el => parseFloat(el.style.width)")


def test_create_a_proposal_vote_from_two_users_and_watch_the_tally_and_result(live_server, alice, bob, adapter,
                                                                              settings):
    settings.R3MES_GOV_VOTING_PERIOD = 25
    base = live_server.url
    with chromium_page() as alice_page:
        bob_page = alice_page.context.browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
        bob_page.set_default_timeout(15000)
        log_in(alice_page, base, "alice")
        log_in(bob_page, base, "bob")

        # Alice proposes the candidate adapter with the minimum deposit: voting opens at once.
        alice_page.goto(base + "/governance/")
        alice_page.get_by_role("link", name="New proposal").click()
        alice_page.select_option("#id_target", f"adapter:{adapter.pk}")
        alice_page.fill("#id_title", "Approve coding v1")
        alice_page.fill("#id_description", "Passes **all** evals.")
        alice_page.fill("#id_deposit", "10")
        alice_page.get_by_role("button", name="Submit proposal").click()
        alice_page.wait_for_url("**/governance/*/")
        proposal = Proposal.objects.get()
        assert proposal.status == "voting"
        assert "Passes all evals." in alice_page.inner_text(".markdown")
        assert seg_width(alice_page, "#bar-turnout .seg.no") == 0

        # Bob votes No from his browser; Alice's page moves without a reload.
        bob_page.goto(f"{base}/governance/{proposal.pk}/")
        bob_page.check("input[name=option][value=no]")
        bob_page.get_by_role("button", name="Vote").click()
        bob_page.wait_for_selector("text=Vote recorded.")
        alice_page.wait_for_function(
            "() => parseFloat(document.querySelector('#bar-turnout .seg.no').style.width) > 0")
        assert abs(seg_width(alice_page, "#bar-turnout .seg.no") - 37.5) < 0.01  # 600 / 1600
        assert "bob" in alice_page.inner_text("#vote-history")

        # A split that does not sum to 1 is refused in place, and his No stands.
        bob_page.click("details.split summary")
        bob_page.fill("input[name=weight_yes]", "0.5")
        bob_page.fill("input[name=weight_no]", "0.4")
        bob_page.check("input[name=weighted]")
        bob_page.get_by_role("button", name="Change vote").click()
        bob_page.wait_for_selector("#vote-panel >> text=sum to exactly 1")
        assert "No" == bob_page.inner_text("#my-vote")

        # Alice votes Yes; Bob's page follows.
        alice_page.check("input[name=option][value=yes]")
        alice_page.get_by_role("button", name="Vote").click()
        alice_page.wait_for_selector("#my-vote")
        bob_page.wait_for_function(
            "() => parseFloat(document.querySelector('#bar-turnout .seg.yes').style.width) > 60")
        assert abs(seg_width(bob_page, "#bar-yes .seg.yes") - 62.5) < 0.01  # 1000 / 1600 non-abstaining
        assert bob_page.locator("#bar-yes .line.threshold").get_attribute("style") == "left: 50.000%"
        assert "quorum 33.4% reached" in bob_page.inner_text("#proposal-live")

        # The beat closes it once the period ends; both pages show the result without reloading.
        while timezone.now() < Proposal.objects.get().voting_end:
            time.sleep(0.3)
        assert close_due_proposals() == {str(proposal.pk): "passed"}
        for page in (alice_page, bob_page):
            page.wait_for_selector("#result")
            assert "Passed" in page.inner_text("#result")
            assert "Voting is closed." in page.inner_text("#vote-panel")
        assert Adapter.servable()["coding"].pk == adapter.pk
