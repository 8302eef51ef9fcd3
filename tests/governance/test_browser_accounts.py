import os

import pytest

from governance.models import ApiToken
from tests.browser import chromium_page

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Playwright's sync API runs an event loop in this thread; Django's ORM is used only around it.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


def test_sign_up_log_in_create_an_api_token_and_see_the_navigation(live_server):
    with chromium_page() as page:
        page.goto(live_server.url + "/")
        page.get_by_role("link", name="Sign up").first.click()
        page.fill("#id_username", "erin")
        page.fill("#id_email", "erin@example.org")
        page.fill("#id_password1", "A-long-unusual-passphrase-42")
        page.fill("#id_password2", "A-long-unusual-passphrase-42")
        page.get_by_role("button", name="Create account").click()
        page.wait_for_url("**/accounts/profile/")
        assert "remes1" in page.inner_text(".facts")

        page.get_by_role("button", name="Log out").click()
        page.get_by_role("link", name="Log in").first.click()
        page.fill("#id_username", "erin")
        page.fill("#id_password", "A-long-unusual-passphrase-42")
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(live_server.url + "/")
        page.get_by_role("link", name="erin").click()
        page.wait_for_url("**/accounts/profile/")

        page.fill("#id_name", "my laptop")
        page.get_by_role("button", name="Create token").click()
        raw = page.inner_text("#new-token").strip()
        assert raw.startswith("r3m_")
        assert ApiToken.authenticate(raw).user.username == "erin"
        assert "my laptop" in page.inner_text("table")

        nav = page.inner_text("nav")
        assert "erin" in nav and "Log out" in nav
        assert "Admin" not in nav  # erin is not staff

        page.set_viewport_size({"width": 390, "height": 800})  # phone-sized: the menu folds away
        assert not page.is_visible("nav")
        page.click("label.nav-toggle-label")
        assert page.is_visible("nav")
