"""The console's routes: read a filter, call the plain function the API calls too, render."""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from ipn import replay as replays
from ipn import serialize
from ipn.anomalies import resolve_anomaly
from ipn.config import PROVIDERS
from ipn.console import SESSION_LIFETIME, accounts, csrf, queries
from ipn.dispatch import enqueue
from ipn.reconcile import check_payment
from ipn.services import Services
from models import (
    Anomaly,
    AnomalyKind,
    DeliveryStatus,
    Notification,
    NotificationKind,
    NotificationStatus,
    Payment,
    ReplayMode,
    utcnow,
)

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

MAX_ROW_ID = 2**63 - 1
PREVIEW_IDS = 20
# Failed sign-ins from one address within the window before it must wait.
FAILURES_ALLOWED = 10
FAILURE_WINDOW_SECONDS = 300
_failures: defaultdict[str, deque[float]] = defaultdict(deque)

E = TypeVar("E")


# --- access ---------------------------------------------------------------------------------


@bp.before_request
def require_session() -> BaseResponse | None:
    if request.endpoint in ("console.login", "console.static"):
        if request.method == "POST":
            csrf.protect()
        return None
    who = _session_who()
    if who is None:
        return redirect(url_for("console.login"), code=303)
    if who.name is not None and not accounts.active(_services(), who.name):
        session.clear()
        abort(403, "This account is disabled: ask another operator.")
    if request.method == "POST":
        csrf.protect()
    return None


def _session_who() -> accounts.Who | None:
    if "who" not in session:
        return None
    started = session.get("at")
    if not isinstance(started, int | float) or time.time() - started > (
        SESSION_LIFETIME.total_seconds()
    ):
        session.clear()
        flash("Your session has expired: sign in again.")
        return None
    name = session["who"]
    return accounts.Who(name if isinstance(name, str) and name else None)


def _who() -> accounts.Who:
    who = _session_who()
    assert who is not None  # require_session ran
    return who


@bp.app_context_processor
def console_context() -> dict[str, Any]:
    return {"signed_in_as": _session_who() if request.blueprint == "console" else None}


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse | tuple[str, int] | str:
    if request.method == "GET":
        return render_template("console/login.html")
    address = request.remote_addr or "-"
    now = time.monotonic()
    # Forget addresses whose failures are all old, so the table holds only recent ones.
    stale = [a for a, t in _failures.items() if not t or now - t[-1] > FAILURE_WINDOW_SECONDS]
    for seen in stale:
        del _failures[seen]
    recent = _failures[address]
    while recent and now - recent[0] > FAILURE_WINDOW_SECONDS:
        recent.popleft()
    if len(recent) >= FAILURES_ALLOWED:
        return render_template(
            "console/login.html", error="Too many failed sign-ins: wait a few minutes."
        ), 429
    who = accounts.sign_in(
        _services(),
        token=request.form.get("token", "").strip(),
        username=request.form.get("username", "").strip(),
        password=request.form.get("password", ""),
    )
    if who is None:
        recent.append(now)
        return render_template("console/login.html", error=accounts.REFUSED), 401
    _failures.pop(address, None)
    session.clear()
    session.permanent = True
    session["who"] = who.name or ""
    session["at"] = time.time()
    return redirect(url_for("console.overview"), code=303)


@bp.post("/logout")
def logout() -> BaseResponse:
    session.clear()
    flash("Signed out.")
    return redirect(url_for("console.login"), code=303)


# --- pages ----------------------------------------------------------------------------------


@bp.get("/")
def overview() -> str:
    with _services().db.sessions() as db:
        data = queries.overview(db)
        return render_template("console/overview.html", data=data, now=utcnow())


@bp.get("/notifications")
def notifications() -> str:
    which = _inbox_filter(request.args)
    before = _row_id(request.args.get("before"))
    with _services().db.sessions() as db:
        page = queries.notifications(db, which, before)
        return render_template(
            "console/notifications.html",
            page=page,
            which=which,
            args=_filter_args(request.args),
            **_choices(),
        )


@bp.get("/notifications/<notification_ref>")
def notification(notification_ref: str) -> str:
    notification_id = _row_id(notification_ref)
    with _services().db.sessions() as db:
        row = db.get(Notification, notification_id) if notification_id is not None else None
        if row is None:
            abort(404, f"No notification {notification_ref}.")
        detail = serialize.notification_detail(db, row)
        return render_template(
            "console/notification.html",
            n=detail,
            body=queries.readable_body(detail["body"], detail["body_encoding"]),
            received_at=row.received_at,
        )


@bp.post("/notifications/<notification_ref>/replay")
def replay_one(notification_ref: str) -> BaseResponse:
    notification_id = _row_id(notification_ref)
    mode = _mode(request.form.get("mode"))
    services = _services()
    if notification_id is None or not replays.existing(services, [notification_id]):
        abort(404, f"No notification {notification_ref}.")
    if gone := replays.pruned(services, [notification_id]):
        abort(409, replays.pruned_message(gone).capitalize() + ".")
    replays.replay(services, [notification_id], mode, _send, requested_by=_who().actor)
    flash(f"Notification {notification_id} replayed ({mode.value}): it is back in the queue.")
    return redirect(url_for("console.notification", notification_ref=notification_id), code=303)


@bp.get("/notifications/bulk-replay")
def bulk_preview() -> tuple[str, int] | str:
    """The preview: what a bulk replay would take, with nothing changed."""
    which = _inbox_filter(request.args).replay_filter
    mode = _mode(request.args.get("mode"))
    if not which:
        return render_template(
            "console/bulk.html",
            error="Choose at least one of provider, account, status, since or until.",
            args=_filter_args(request.args),
            mode=mode,
            ids=[],
            count=0,
        ), 422
    ids = list(replays.matching_ids(_services(), which))
    return render_template(
        "console/bulk.html",
        ids=ids[:PREVIEW_IDS],
        count=len(ids),
        args=_filter_args(request.args),
        mode=mode,
        error=None,
    )


@bp.post("/notifications/bulk-replay")
def bulk_replay() -> tuple[str, int] | str:
    which = _inbox_filter(request.form).replay_filter
    mode = _mode(request.form.get("mode"))
    if not which:
        abort(422, "Choose at least one of provider, account, status, since or until.")
    services = _services()
    ids = list(replays.matching_ids(services, which))
    done = replays.replay(services, ids, mode, _send, requested_by=_who().actor)
    return render_template("console/bulk_done.html", ids=done, mode=mode)


@bp.get("/payments")
def payments() -> str:
    reference = _text(request.args.get("q"))
    account = _account(request.args.get("account"))
    before = _text(request.args.get("before"))
    with _services().db.sessions() as db:
        page = queries.payments(db, reference, before, account=account)
        return render_template(
            "console/payments.html",
            page=page,
            q=reference or "",
            account=account or "",
            accounts=_account_names(),
        )


@bp.get("/payments/<payment_id>")
def payment(payment_id: str) -> str:
    with _services().db.sessions() as db:
        row = db.get(Payment, payment_id) if len(payment_id) <= 32 else None
        if row is None:
            abort(404, f"No payment {payment_id}.")
        detail = serialize.payment_detail(db, row)
        return render_template("console/payment.html", p=detail, row=row)


@bp.post("/payments/<payment_id>/reconcile")
def reconcile(payment_id: str) -> BaseResponse:
    services = _services()
    with services.db.sessions() as db:
        if len(payment_id) > 32 or db.get(Payment, payment_id) is None:
            abort(404, f"No payment {payment_id}.")
    check = check_payment(services, payment_id, force=True, requested_by=_who().actor)
    flash(f"Reconcile: {check.outcome}: {check.message}")
    return redirect(url_for("console.payment", payment_id=payment_id), code=303)


@bp.get("/anomalies")
def anomalies() -> str:
    kind = _enum(AnomalyKind, request.args.get("kind"))
    with _services().db.sessions() as db:
        rows = queries.open_anomalies(db, kind)
        counts = queries.open_anomaly_counts(db)
        return render_template(
            "console/anomalies.html",
            rows=rows,
            counts=counts,
            kind=kind,
            kinds=[k.value for k in AnomalyKind],
            now=utcnow(),
        )


@bp.post("/anomalies/<anomaly_ref>/resolve")
def resolve(anomaly_ref: str) -> BaseResponse | tuple[str, int]:
    anomaly_id = _row_id(anomaly_ref)
    resolution = request.form.get("resolution", "").strip()
    services = _services()
    with services.db.sessions() as db:
        if anomaly_id is None or db.get(Anomaly, anomaly_id) is None:
            abort(404, f"No anomaly {anomaly_ref}.")
    if not resolution:
        flash(f"Anomaly {anomaly_id} not resolved: say what was done.", "error")
        return redirect(url_for("console.anomalies"), code=303)
    try:
        with services.db.transaction() as db:
            resolve_anomaly(db, anomaly_id, resolution, by=_who().actor)
    except ValueError as exc:
        flash(str(exc), "error")
        return redirect(url_for("console.anomalies"), code=303)
    flash(f"Anomaly {anomaly_id} resolved.")
    return redirect(url_for("console.anomalies"), code=303)


@bp.get("/events")
def events() -> str:
    status = _enum(DeliveryStatus, request.args.get("status"))
    before = _text(request.args.get("before"))
    with _services().db.sessions() as db:
        page = queries.merchant_events(db, status, before)
        return render_template(
            "console/events.html",
            page=page,
            status=status,
            statuses=[s.value for s in DeliveryStatus],
        )


# --- templates' filters ---------------------------------------------------------------------


@bp.app_template_filter("utc")
def utc(value: datetime | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        value = serialize.parse_time(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@bp.app_template_filter("verified_by")
def verified_by(label: str) -> str:
    """Which of the account's secrets verified a callback, in words: a replaced one is known
    by the end of its validity (`PreviousSecret.label`), never by the secret."""
    if label == "current":
        return "verified by the current secret"
    until = label.removeprefix("previous until ")
    if until == label:
        return f"verified by {label}"
    try:
        return f"verified by a previous secret, valid until {utc(until)}"
    except ValueError:
        return f"verified by {label}"


@bp.app_template_filter("pretty")
def pretty(value: Any) -> str:
    """JSON for reading (autoescaped like any other text, never marked safe)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


@bp.app_template_filter("ago")
def ago(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = serialize.parse_time(value)
    seconds = int((utcnow() - value).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            text = f"{seconds // size} {unit}"
            break
    else:
        text = f"{seconds} s"
    return f"in {text}" if future else f"{text} ago"


# --- helpers --------------------------------------------------------------------------------


def _services() -> Services:
    services: Services = current_app.extensions["ipn"]
    return services


def _send(notification_id: int) -> None:
    enqueue(current_app.extensions["celery"], notification_id)


def _text(value: str | None) -> str | None:
    value = (value or "").strip()
    if "\x00" in value or len(value) > 255:
        abort(400, "A filter holds a NUL byte or is longer than 255 characters.")
    return value or None


def _row_id(value: str | None) -> int | None:
    if not value:
        return None
    if not value.isdigit() or not value.isascii() or int(value) > MAX_ROW_ID:
        abort(404, f"No row {value[:40]}.")
    return int(value)


def _enum(enum: Callable[[str], E], value: str | None) -> E | None:
    if not value:
        return None
    try:
        return enum(value)
    except ValueError:
        abort(400, f"Unknown choice {value[:40]!r}.")


def _mode(value: str | None) -> ReplayMode:
    mode = _enum(ReplayMode, value)
    return mode or ReplayMode.STORED


def _time(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return serialize.parse_time(value)
    except ValueError as exc:
        abort(400, f"{name}: {exc}")


def _inbox_filter(args: Any) -> queries.InboxFilter:
    provider = _text(args.get("provider"))
    if provider is not None and provider not in PROVIDERS:
        abort(400, f"Unknown provider {provider!r}.")
    return queries.InboxFilter(
        provider=provider,
        account=_account(args.get("account")),
        kind=_enum(NotificationKind, args.get("kind")),
        status=_enum(NotificationStatus, args.get("status")),
        since=_time(args.get("since"), "since"),
        until=_time(args.get("until"), "until"),
        reference=_text(args.get("q")),
    )


def _filter_args(args: Any) -> dict[str, str]:
    names = ("provider", "account", "kind", "status", "since", "until", "q")
    return {name: args.get(name, "") for name in names if args.get(name)}


def _account(value: str | None) -> str | None:
    account = _text(value)
    if account is not None and account not in _account_names():
        abort(400, f"Unknown account {account!r}.")
    return account


def _account_names() -> list[str]:
    """Every configured account name, across providers: the filter takes a shop's name at
    every provider it has an account with."""
    return _services().settings.names_of_accounts()


def _choices() -> dict[str, list[str]]:
    return {
        "providers": list(PROVIDERS),
        "accounts": _account_names(),
        "kinds": [k.value for k in NotificationKind],
        "statuses": [s.value for s in NotificationStatus],
    }


def error_page(code: int, name: str, description: str) -> Response:
    """A console page for an HTTP error: the same look, a short sentence, never a trace."""
    response = Response(
        render_template("console/error.html", code=code, name=name, description=description),
        status=code,
        mimetype="text/html",
    )
    return response
