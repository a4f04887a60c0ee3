"""The console in a real browser: Debian's Chromium driven by Playwright against the app served
on a free port. Sign in, read the inbox, replay, bulk replay, resolve, reconcile, sign out; and
nothing a callback carries ever runs as script. Takes the README's screenshots on the way."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import responses
from flask import Flask
from playwright.sync_api import Browser, Page
from sqlalchemy import func, select

from console.support import (
    EUR_SHOP,
    IMG,
    SCRIPT,
    Seeded,
    add_rows,
    notification_row,
    seed,
    with_shops,
)
from ipn.config import Settings
from ipn.console import accounts
from ipn.services import Services
from models import (
    Anomaly,
    AnomalyStatus,
    Notification,
    NotificationReplay,
    NotificationStatus,
    PaymentEvent,
)

from conftest import REQUIRE_SERVICES, ROOT
from faults_support import serving
from helpers import CUBEPAY_QUERY, cubepay_query_answer

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "docs" / "screenshots"

pytestmark = [
    pytest.mark.browser,
    # The pages are the same on both backends (test_console.py shows it); one is enough here.
    pytest.mark.parametrize("backend", ["sqlite"], indirect=True),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # An operator with two shops, so that the account filter is on the page.
    return with_shops(settings)


@pytest.fixture
def site(app: Flask, services: Services, provider_api: responses.RequestsMock) -> Iterator[str]:
    # The served app's own requests to the provider are mocked; the browser's are real.
    provider_api.add_passthru("http://127.0.0.1")
    with serving(app) as url:
        yield url


@pytest.fixture
def page(browser: Browser, site: str) -> Iterator[Page]:
    context = browser.new_context(base_url=site, viewport={"width": 1366, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert errors == []


def sign_in(page: Page, name: str = "alice", password: str = "correct horse battery") -> None:
    page.goto("/console/")
    assert page.url.endswith("/console/login")
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", password)
    page.click("button:has-text('Sign in')")


def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def count(services: Services, model: Any, *where: Any) -> int:
    with services.db.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_an_operator_works_through_the_console(
    page: Page, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    accounts.add_operator(services, "alice", "correct horse battery")
    data: Seeded = seed(app, services)
    p = page

    # A wrong password is refused without saying which part was wrong.
    sign_in(p, password="not the password")
    assert p.locator(".flash.error").inner_text() == accounts.REFUSED
    assert "password" not in accounts.REFUSED.lower()

    sign_in(p)
    assert p.url.endswith("/console/")
    assert "console:alice" in p.inner_text("header")
    shot(p, "overview")

    # The forged callback is in the inbox as rejected, with its reason.
    p.goto("/console/notifications")
    row = p.locator(f"tr:has(a:text-is('{data.forged_id}'))")
    assert "rejected" in row.inner_text()
    assert "forged" in row.inner_text()

    # Filtering: only the cryptoprocessing row is left.
    p.select_option("select[name=provider]", "cryptoprocessing")
    p.click("button:has-text('Filter')")
    ids = p.locator("table.list tbody tr td:first-child").all_inner_texts()
    assert ids == [str(data.hostile_id)]

    # The second shop's callback, and only it, under its account.
    [shop_id] = add_rows(services, 1, account=EUR_SHOP)
    p.goto("/console/notifications")
    p.select_option("select[name=account]", EUR_SHOP)
    p.click("button:has-text('Filter')")
    ids = p.locator("table.list tbody tr td:first-child").all_inner_texts()
    assert ids == [str(shop_id)]
    assert EUR_SHOP in p.inner_text("table.list tbody tr")

    # Open the forged notification and replay it.
    p.goto("/console/notifications")
    p.click(f"a:text-is('{data.forged_id}')")
    assert "rejected" in p.inner_text("h1")
    assert "source_amount" in p.inner_text("table.body-fields")
    shot(p, "notification")
    p.click("button:has-text('Replay (stored)')")
    assert "replayed" in p.inner_text(".flash")
    assert "console:alice" in p.inner_text("body")
    assert notification_row(services, data.forged_id).status is NotificationStatus.RECEIVED
    with services.db.sessions() as session:
        by = session.scalars(select(NotificationReplay.requested_by)).all()
    assert by == ["console:alice"]

    # Bulk replay: the preview changes nothing, the confirmation replays what it showed.
    replays_before = count(services, NotificationReplay)
    received_before = count(
        services, Notification, Notification.status == NotificationStatus.RECEIVED
    )
    # The other shop's cubepay callback stays out of it.
    p.goto("/console/notifications?provider=cubepay&account=default")
    p.click("button:has-text('Bulk replay')")
    assert p.inner_text("#preview-count") == "1"
    assert count(services, NotificationReplay) == replays_before
    assert count(services, Notification, Notification.status == NotificationStatus.RECEIVED) == (
        received_before
    )
    p.click("button:has-text('Confirm')")
    assert p.inner_text("#replayed-count") == "1"
    assert str(data.forged_id) in p.inner_text("ul.ids")
    assert count(services, NotificationReplay) == replays_before + 1

    # Resolve an anomaly, which needs a resolution text.
    p.goto("/console/anomalies")
    shot(p, "anomalies")
    p.fill(f"#anomaly-{data.anomaly_id} input[name=resolution]", "refunded the shortfall")
    p.click(f"#anomaly-{data.anomaly_id} button:has-text('Resolve')")
    assert "resolved" in p.inner_text(".flash")
    with services.db.sessions() as session:
        anomaly = session.get(Anomaly, data.anomaly_id)
        assert anomaly is not None
        assert (anomaly.status, anomaly.resolved_by) == (AnomalyStatus.RESOLVED, "console:alice")

    # Reconcile the payment: the provider is asked and the timeline grows.
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(1))
    p.goto(f"/console/payments/{data.payment.id}")
    before = p.locator("table.timeline tbody tr").count()
    p.click("button:has-text('Reconcile now')")
    assert "Reconcile" in p.inner_text(".flash")
    after = p.locator("table.timeline tbody tr").count()
    assert after > before
    assert "console:alice" in p.inner_text("table.timeline")
    assert len(provider_api.calls) == 1
    assert count(services, PaymentEvent) == after
    shot(p, "payment")

    # Sign out: the next page sends us to sign in.
    p.click("button:has-text('Sign out')")
    assert p.url.endswith("/console/login")
    p.goto("/console/anomalies")
    assert p.url.endswith("/console/login")


def test_markup_in_a_callback_is_shown_as_text_and_never_runs(
    page: Page, app: Flask, services: Services
) -> None:
    accounts.add_operator(services, "alice", "correct horse battery")
    data = seed(app, services)
    p = page
    sign_in(p)
    for path in (
        f"/console/notifications/{data.hostile_id}",
        "/console/notifications",
        "/console/anomalies",
        f"/console/payments/{data.payment.id}",
    ):
        p.goto(path)
        assert p.evaluate("typeof window.__x") == "undefined", path
        assert p.evaluate("typeof window.__y") == "undefined", path
        assert p.locator("img").count() == 0, path
    p.goto(f"/console/notifications/{data.hostile_id}")
    text = p.inner_text("main")
    assert SCRIPT in text
    assert IMG in text  # the header, whole
