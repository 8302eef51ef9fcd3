import os

import pytest

from governance.models import User
from mining import ledger
from mining.models import Transaction
from tests.browser import chromium_page

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def test_explorer_verify_button_shows_ok_then_the_tampered_block(live_server):
    User.objects.create_user("vera", "vera@example.org", "A-long-unusual-passphrase-42")
    ledger.record("dataset_approved", {"name": "recipes", "blob_cid": "b"})
    tx = ledger.record("aggregation", {"merkle_root": "ab" * 32, "included": [1, 2, 3]})
    with chromium_page() as page:
        page.goto(live_server.url + "/accounts/login/")
        page.fill("#id_username", "vera")
        page.fill("#id_password", "A-long-unusual-passphrase-42")
        page.get_by_role("button", name="Log in").click()
        page.goto(live_server.url + "/mining/ledger/")
        assert "aggregation" in page.inner_text("table")

        page.get_by_role("button", name="Verify chain").click()
        page.wait_for_selector("#verify-result .badge.ok")
        assert "2 blocks" in page.inner_text("#verify-result")

        Transaction.objects.filter(pk=tx.pk).update(payload={"merkle_root": "00" * 32, "included": [1]})
        page.get_by_role("button", name="Verify chain").click()
        page.wait_for_selector("#verify-result .badge.bad")
        assert "Block 2 fails verification" in page.inner_text("#verify-result")

        page.get_by_role("link", name="2", exact=True).click()
        page.wait_for_url("**/mining/ledger/blocks/2/")
        assert tx.hash in page.inner_text("main")
