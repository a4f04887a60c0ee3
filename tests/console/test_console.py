"""The console through Flask's test client, on both backends: every page with data and empty,
filters and pagination, access (sessions, expiry, CSRF, refusals), error pages in the console's
style, the key settings, and `ipn operators`."""

from __future__ import annotations

import os
import stat
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import time_machine
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from console.support import CSRF, add_rows, csrf_token, ids_on, seed, sign_in
from ipn import create_app
from ipn.config import Settings
from ipn.console import KEY_FILENAME, accounts, local_secret_key, queries
from ipn.errors import ConfigurationError
from ipn.services import Services
from models import (
    Anomaly,
    AnomalyStatus,
    Notification,
    NotificationReplay,
    NotificationStatus,
    Operator,
    utcnow,
)

from helpers import make_payment

PAGES = [
    "/console/",
    "/console/notifications",
    "/console/payments",
    "/console/anomalies",
    "/console/events",
]
PASSWORD = "correct horse battery"


def ipn(app: Flask, *args: str, stdin: str | None = None) -> Any:
    return app.test_cli_runner().invoke(args=list(args), input=stdin)


# --- pages ----------------------------------------------------------------------------------


def test_every_page_renders_empty(client: FlaskClient) -> None:
    sign_in(client)
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, path
        assert 'class="empty"' in response.get_data(as_text=True), path


def test_every_page_renders_with_data(app: Flask, client: FlaskClient, services: Services) -> None:
    data = seed(app, services)
    sign_in(client)
    for path in [
        *PAGES,
        f"/console/notifications/{data.forged_id}",
        f"/console/notifications/{data.hostile_id}",
        f"/console/payments/{data.payment.id}",
        "/console/anomalies?kind=amount_mismatch",
        "/console/events?status=delivered",
        "/console/notifications/bulk-replay?status=rejected",
    ]:
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.mimetype == "text/html"
    overview = client.get("/console/").get_data(as_text=True)
    assert "rejected" in overview and "amount_mismatch" in overview
    detail = client.get(f"/console/notifications/{data.forged_id}").get_data(as_text=True)
    assert "forged" in detail and "source_amount" in detail
    payment = client.get(f"/console/payments/{data.payment.id}").get_data(as_text=True)
    assert "amount_mismatch" in payment and "Reconcile now" in payment


def test_markup_is_escaped_and_secret_headers_masked(
    app: Flask, client: FlaskClient, services: Services
) -> None:
    data = seed(app, services)
    sign_in(client)
    with services.db.transaction() as session:
        row = session.get(Notification, data.hostile_id)
        assert row is not None
        row.headers = {**row.headers, "X-Signature": "very-secret-signature"}
    page = client.get(f"/console/notifications/{data.hostile_id}").get_data(as_text=True)
    assert "<script>window" not in page and "<img src=x" not in page
    assert "&lt;script&gt;window.__x=1&lt;/script&gt;" in page
    assert "very-secret-signature" not in page and "***" in page


def test_inbox_filters_and_keyset_pagination(
    app: Flask, client: FlaskClient, services: Services
) -> None:
    payment = make_payment(services.db, order_id="order-77", provider_payment_id="P-77")
    older = add_rows(services, 55)
    failed = add_rows(services, 3, status=NotificationStatus.FAILED, provider="coinbarpay")
    mine = add_rows(services, 2, payment_id=payment.id)
    sign_in(client)

    first = client.get("/console/notifications").get_data(as_text=True)
    assert len(ids_on(first)) == queries.PAGE_SIZE
    assert ids_on(first)[0] == mine[-1]  # newest first
    assert 'rel="next"' in first
    cursor = ids_on(first)[-1]
    second = client.get(f"/console/notifications?before={cursor}").get_data(as_text=True)
    assert ids_on(second) == sorted([i for i in older + failed + mine if i < cursor], reverse=True)
    assert 'rel="next"' not in second

    assert (
        ids_on(client.get("/console/notifications?status=failed").get_data(as_text=True))
        == (failed[::-1])
    )
    assert (
        ids_on(
            client.get("/console/notifications?provider=coinbarpay&kind=ipn").get_data(as_text=True)
        )
        == (failed[::-1])
    )
    for reference in ("order-77", "P-77", payment.id):
        page = client.get(f"/console/notifications?q={reference}").get_data(as_text=True)
        assert ids_on(page) == mine[::-1], reference
    assert ids_on(client.get("/console/notifications?since=1m").get_data(as_text=True)) == []
    assert client.get("/console/notifications?status=nonsense").status_code == 400
    assert client.get("/console/notifications?since=yesterday").status_code == 400
    assert client.get("/console/notifications?before=abc").status_code == 404


def test_one_account_needs_no_account_filter_or_column(
    client: FlaskClient, services: Services
) -> None:
    add_rows(services, 2)
    make_payment(services.db)
    sign_in(client)
    for path in ("/console/notifications", "/console/payments"):
        page = client.get(path).get_data(as_text=True)
        assert 'name="account"' not in page and "<th>account</th>" not in page, path
    assert client.get("/console/notifications?account=eur-shop").status_code == 400
    # A row of an account since removed from the accounts file still says whose it was.
    [gone] = add_rows(services, 1, account="old-shop")
    page = client.get("/console/notifications").get_data(as_text=True)
    assert "<th>account</th>" in page and "<td>old-shop</td>" in page
    assert ids_on(page)[0] == gone


def test_payment_search_by_any_reference(client: FlaskClient, services: Services) -> None:
    payment = make_payment(services.db, order_id="order-9", provider_payment_id="PP-9")
    make_payment(services.db, order_id="order-10")
    sign_in(client)
    for reference in ("order-9", "PP-9", payment.id):
        page = client.get(f"/console/payments?q={reference}").get_data(as_text=True)
        assert payment.id in page and "order-10" not in page, reference
    assert "No payment has" in client.get("/console/payments?q=nothing").get_data(as_text=True)


def test_bulk_preview_changes_nothing_and_confirm_replays(
    app: Flask, client: FlaskClient, services: Services
) -> None:
    failed = add_rows(services, 3, status=NotificationStatus.FAILED)
    add_rows(services, 2)
    sign_in(client)
    preview = client.get("/console/notifications/bulk-replay?status=failed&mode=refetch")
    assert preview.status_code == 200
    assert 'id="preview-count">3<' in preview.get_data(as_text=True)
    with services.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(NotificationReplay)) == 0
    assert client.get("/console/notifications/bulk-replay").status_code == 422
    token = csrf_token(client, "/console/notifications")
    done = client.post(
        "/console/notifications/bulk-replay",
        data={"csrf_token": token, "status": "failed", "mode": "refetch"},
    )
    assert done.status_code == 200
    assert ids_on(done.get_data(as_text=True)) == failed
    with services.db.sessions() as session:
        replays = session.scalars(select(NotificationReplay)).all()
    assert {(r.notification_id, r.requested_by, r.mode.value) for r in replays} == {
        (i, "console:token", "refetch") for i in failed
    }


def test_resolve_needs_a_resolution(app: Flask, client: FlaskClient, services: Services) -> None:
    data = seed(app, services)
    sign_in(client)
    token = csrf_token(client, "/console/anomalies")
    path = f"/console/anomalies/{data.anomaly_id}/resolve"
    response = client.post(path, data={"csrf_token": token, "resolution": "  "})
    assert response.status_code == 303
    assert "say what was done" in client.get("/console/anomalies").get_data(as_text=True)
    client.post(path, data={"csrf_token": token, "resolution": "talked to the shop"})
    with services.db.sessions() as session:
        anomaly = session.get(Anomaly, data.anomaly_id)
        assert anomaly is not None
        assert (anomaly.status, anomaly.resolved_by) == (AnomalyStatus.RESOLVED, "console:token")
    again = client.post(
        path, data={"csrf_token": token, "resolution": "twice"}, follow_redirects=True
    )
    assert "already resolved" in again.get_data(as_text=True)
    assert (
        client.post("/console/anomalies/999/resolve", data={"csrf_token": token}).status_code == 404
    )


# --- access ---------------------------------------------------------------------------------


def test_pages_without_a_session_redirect_to_sign_in(client: FlaskClient) -> None:
    for path in [*PAGES, "/console/notifications/1", "/console/payments/pay_x"]:
        response = client.get(path)
        assert response.status_code == 303, path
        assert response.headers["Location"].endswith("/console/login")
    assert client.post("/console/notifications/1/replay").status_code == 303
    assert client.get("/console/login").status_code == 200


def test_a_post_without_the_csrf_token_is_refused(
    app: Flask, client: FlaskClient, services: Services, api_headers: dict[str, str]
) -> None:
    data = seed(app, services)
    sign_in(client)
    response = client.post(f"/console/notifications/{data.forged_id}/replay", data={})
    assert response.status_code == 400
    assert "CSRF" in response.get_data(as_text=True)
    wrong = client.post(
        f"/console/notifications/{data.forged_id}/replay", data={"csrf_token": "forged"}
    )
    assert wrong.status_code == 400
    assert client.post("/console/login", data={"token": "test-token"}).status_code == 400
    with services.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(NotificationReplay)) == 0
    # The JSON API and the callbacks take POSTs without one.
    api = client.post(f"/api/notifications/{data.forged_id}/replay", headers=api_headers)
    assert api.status_code == 202


def test_wrong_credentials_are_refused_with_one_message(
    client: FlaskClient, services: Services
) -> None:
    accounts.add_operator(services, "alice", PASSWORD)
    token = csrf_token(client)
    for form in (
        {"token": "wrong"},
        {"username": "alice", "password": "wrong password"},
        {"username": "bob", "password": PASSWORD},
        {"username": "alice", "password": ""},
        {},
    ):
        response = client.post("/console/login", data={"csrf_token": token, **form})
        assert response.status_code == 401, form
        page = response.get_data(as_text=True)
        assert accounts.REFUSED in page
        assert "unknown" not in page.lower() and "wrong password" not in page.lower()
    ok = client.post(
        "/console/login", data={"csrf_token": token, "username": "alice", "password": PASSWORD}
    )
    assert ok.status_code == 303
    assert "console:alice" in client.get("/console/").get_data(as_text=True)


def test_repeated_failures_are_throttled(client: FlaskClient) -> None:
    token = csrf_token(client)
    codes = [
        client.post("/console/login", data={"csrf_token": token, "token": "x"}).status_code
        for _ in range(12)
    ]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    right = client.post("/console/login", data={"csrf_token": token, "token": "test-token"})
    assert right.status_code == 429


@pytest.fixture(autouse=True)
def _forget_failures() -> None:
    from ipn.console import views

    views._failures.clear()


def test_without_the_api_token_no_token_signs_in(settings: Settings) -> None:
    client = create_app(settings.with_changes(api_token=None)).test_client()
    response = client.post("/console/login", data={"csrf_token": csrf_token(client), "token": ""})
    assert response.status_code == 401


def test_sessions_expire(client: FlaskClient) -> None:
    with time_machine.travel(utcnow(), tick=False) as traveller:
        sign_in(client)
        assert client.get("/console/").status_code == 200
        traveller.shift(timedelta(hours=7, minutes=59))
        assert client.get("/console/").status_code == 200
        traveller.shift(timedelta(minutes=2))
        response = client.get("/console/")
        assert response.status_code == 303
        assert "expired" in client.get("/console/login").get_data(as_text=True)


def test_session_cookie_flags(client: FlaskClient) -> None:
    token = csrf_token(client)
    response = client.post("/console/login", data={"csrf_token": token, "token": "test-token"})
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    secure_client = client.application.test_client()
    page = secure_client.get("/console/login", base_url="https://localhost")
    token = CSRF.search(page.get_data(as_text=True)).group(1)  # type: ignore[union-attr]
    response = secure_client.post(
        "/console/login",
        data={"csrf_token": token, "token": "test-token"},
        base_url="https://localhost",
        # Over HTTPS, Flask-WTF also wants the form to come from this site.
        headers={"Referer": "https://localhost/console/login"},
    )
    assert "Secure" in response.headers["Set-Cookie"]


def test_sign_out(client: FlaskClient) -> None:
    sign_in(client)
    token = csrf_token(client, "/console/")
    response = client.post("/console/logout", data={"csrf_token": token})
    assert (response.status_code, response.headers["Location"]) == (303, "/console/login")
    assert client.get("/console/").status_code == 303


def test_a_disabled_account_is_refused_and_its_session_ends(
    app: Flask, client: FlaskClient, services: Services
) -> None:
    accounts.add_operator(services, "alice", PASSWORD)
    token = csrf_token(client)
    client.post(
        "/console/login", data={"csrf_token": token, "username": "alice", "password": PASSWORD}
    )
    assert client.get("/console/").status_code == 200
    assert ipn(app, "operators", "disable", "alice").exit_code == 0
    response = client.get("/console/")
    assert response.status_code == 403
    assert "disabled" in response.get_data(as_text=True)
    again = client.post(
        "/console/login",
        data={"csrf_token": csrf_token(client), "username": "alice", "password": PASSWORD},
    )
    assert again.status_code == 401


# --- error pages ----------------------------------------------------------------------------


def test_unknown_rows_get_a_404_in_the_console_style(client: FlaskClient) -> None:
    sign_in(client)
    for path in (
        "/console/notifications/12345",
        "/console/notifications/abc",
        "/console/notifications/99999999999999999999999",
        "/console/payments/pay_nothing",
        "/console/nowhere",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        page = response.get_data(as_text=True)
        assert 'class="error-page"' in page and "console.css" in page, path


def test_a_failure_shows_a_500_page_without_a_trace(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.config["PROPAGATE_EXCEPTIONS"] = False
    sign_in(client)

    def broken(_session: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(queries, "overview", broken)
    response = client.get("/console/")
    assert response.status_code == 500
    page = response.get_data(as_text=True)
    assert 'class="error-page"' in page
    assert "secret internals" not in page and "Traceback" not in page


# --- settings -------------------------------------------------------------------------------


def test_a_missing_secret_key_stops_start_up_outside_the_embedded_default(tmp_path: Path) -> None:
    env = {"IPN_DATA_DIR": str(tmp_path), "DATABASE_URL": "postgresql://db/ipn"}
    with pytest.raises(ConfigurationError, match="IPN_SECRET_KEY"):
        Settings.from_env(env)
    with pytest.raises(ConfigurationError, match="IPN_SECRET_KEY"):
        Settings.from_env({"IPN_DATA_DIR": str(tmp_path), "REDIS_URL": "redis://localhost"})
    assert not Settings.from_env({**env, "IPN_CONSOLE": "0"}).console
    with pytest.raises(ConfigurationError, match="IPN_SECRET_KEY"):
        Settings.from_env({**env, "IPN_SECRET_KEY": "short"})
    assert repr(Settings.from_env({**env, "IPN_SECRET_KEY": "k" * 32})).count("kkkk") == 0


def test_the_embedded_default_keeps_a_generated_key_for_its_owner(tmp_path: Path) -> None:
    settings = Settings.from_env({"IPN_DATA_DIR": str(tmp_path)})
    assert settings.local_default and settings.secret_key is None
    key = local_secret_key(tmp_path)
    assert len(key) >= 32 and local_secret_key(tmp_path) == key
    mode = stat.S_IMODE(os.stat(tmp_path / KEY_FILENAME).st_mode)
    assert mode == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILENAME]


def test_with_the_console_off_there_is_no_console(settings: Settings) -> None:
    client = create_app(settings.with_changes(console=False)).test_client()
    assert client.get("/console/login").status_code == 404
    assert client.get("/healthz").status_code == 200


# --- ipn operators --------------------------------------------------------------------------


def test_operators_add_list_disable(app: Flask, services: Services) -> None:
    added = ipn(app, "operators", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert (added.exit_code, added.output.strip()) == (0, "operator alice added")
    prompted = ipn(app, "operators", "add", "bob", stdin=f"{PASSWORD}\n{PASSWORD}\n")
    assert prompted.exit_code == 0, prompted.output
    with services.db.sessions() as session:
        stored = session.scalars(select(Operator.password_hash)).all()
    assert all(h.startswith("$argon2id$") and PASSWORD not in h for h in stored)
    listed = ipn(app, "operators", "list")
    assert listed.exit_code == 0
    assert [line.split()[:2] for line in listed.output.splitlines()] == [
        ["alice", "enabled"],
        ["bob", "enabled"],
    ]
    assert ipn(app, "operators", "disable", "bob").exit_code == 0
    assert '"disabled_at":"' in ipn(app, "operators", "list", "--json").output.splitlines()[1]


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["add", "bad name!"], PASSWORD, "Invalid value for NAME"),
        (["add", "x" * 65, "--password-stdin"], PASSWORD, "Invalid value for NAME"),
        (["add", "carol", "--password-stdin"], "short", "at least 10 characters"),
        (["add", "carol"], f"{PASSWORD}\nsomething else\n", "do not match"),
        (["add", "alice", "--password-stdin"], PASSWORD, "exists already"),
        (["disable", "nobody"], None, "no operator named 'nobody'"),
        (["add"], None, "Missing argument 'NAME'"),
    ],
)
def test_operators_refuse_bad_arguments(
    app: Flask, services: Services, args: list[str], stdin: str | None, message: str
) -> None:
    accounts.add_operator(services, "alice", PASSWORD)
    result = ipn(app, "operators", *args, stdin=None if stdin is None else stdin + "\n")
    assert result.exit_code != 0
    assert message in result.output
