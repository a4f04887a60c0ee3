"""Alerts to an operator's chat (a Slack-compatible webhook): what happened is counted in the
`alerts` table where it happens, conditions are read from the database once a minute, and the
beat task sends one message per alert and quiet period, never from inside processing."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import requests
from sqlalchemy import case, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ipn.config import PROVIDERS, Settings
from models import OPEN, Alert, AlertKind, Notification, Payment, utcnow

if TYPE_CHECKING:
    from ipn.services import Services

log = logging.getLogger(__name__)

# Status queries failing within this window count towards IPN_ALERT_CHECK_FAILURES.
CHECK_WINDOW = timedelta(minutes=15)
CONNECT_TIMEOUT = 3.05
TOTAL_TIMEOUT = 10.0
# What is read of the endpoint's answer: enough for an error message, never a flood.
ANSWER_LIMIT = 4096

Post = Callable[[str, str], None]


class AlertNotSent(Exception):
    """The alert endpoint was unreachable or refused the message; it is tried again later."""


def record(
    session: Session, kind: AlertKind, key: str, count: int = 1, *, now: datetime | None = None
) -> None:
    """Count `count` occurrences of an alert, in the caller's transaction: a burst adds up on
    one row, and the next send tells it once with its count."""
    _upsert(session, kind, key, count, now or utcnow(), add=True)


def hold(session: Session, kind: AlertKind, key: str, measure: int, now: datetime) -> None:
    """A condition that holds now, with its latest measure (replaced, not added)."""
    _upsert(session, kind, key, measure, now, add=False)


def release(session: Session, kind: AlertKind, key: str) -> None:
    """The condition no longer holds: nothing is waiting to be said about it."""
    session.execute(
        update(Alert)
        .where(Alert.kind == kind, Alert.key == key)
        .values(count=0, first_at=None)
        .execution_options(synchronize_session=False)
    )


def _upsert(
    session: Session, kind: AlertKind, key: str, count: int, now: datetime, *, add: bool
) -> None:
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(Alert).values(
        kind=kind, key=key[:255], count=count, first_at=now, last_at=now
    )
    statement = statement.on_conflict_do_update(
        index_elements=["kind", "key"],
        set_={
            "count": (Alert.count + statement.excluded.count) if add else statement.excluded.count,
            "first_at": case((Alert.count == 0, now), else_=Alert.first_at),
            "last_at": now,
        },
    )
    session.execute(statement)


def evaluate(services: Services, now: datetime) -> None:
    """Read the conditions from the database: providers whose status queries fail, and
    providers silent while they have open payments."""
    settings = services.settings
    with services.db.transaction() as session:
        failing = dict(
            session.execute(
                select(Payment.provider, func.count())
                .where(
                    Payment.last_check_error.is_not(None),
                    Payment.last_checked_at >= now - CHECK_WINDOW,
                )
                .group_by(Payment.provider)
            ).all()
        )
        open_payments = {
            provider: (count, oldest)
            for provider, count, oldest in session.execute(
                select(Payment.provider, func.count(), func.min(Payment.created_at))
                .where(Payment.status.in_(OPEN))
                .group_by(Payment.provider)
            ).all()
        }
        for provider in sorted(set(PROVIDERS) | failing.keys() | open_payments.keys()):
            failures = failing.get(provider, 0)
            if failures > settings.alert_check_failures:
                hold(session, AlertKind.CHECKS_FAILING, provider, failures, now)
            else:
                release(session, AlertKind.CHECKS_FAILING, provider)
            if _silent(session, settings, provider, open_payments.get(provider), now):
                hold(session, AlertKind.PROVIDER_SILENT, provider, open_payments[provider][0], now)
            else:
                release(session, AlertKind.PROVIDER_SILENT, provider)


def _silent(
    session: Session,
    settings: Settings,
    provider: str,
    open_payments: tuple[int, datetime] | None,
    now: datetime,
) -> bool:
    """No callback from the provider for the whole silence window, while payments it should
    call about have been open for all of it."""
    if open_payments is None:
        return False
    since = now - settings.provider_silence
    if open_payments[1] > since:
        return False
    last = session.scalar(
        select(func.max(Notification.received_at)).where(Notification.provider == provider)
    )
    return last is None or last <= since


def text_of(settings: Settings, kind: AlertKind, key: str, count: int) -> str:
    """The message for one alert; with a link to the console page when IPN_PUBLIC_URL is set."""
    plural = "" if count == 1 else "s"
    if kind is AlertKind.DEAD:
        text = (
            f"{count} notification{plural} from {key} went dead: the sweeper gave up after "
            f"{settings.max_attempts} attempts; replay once the cause is fixed"
        )
        page = "/console/notifications?status=dead"
    elif kind is AlertKind.ANOMALY:
        text = f"{count} new anomal{'y' if count == 1 else 'ies'} ({key}) to review"
        page = "/console/anomalies"
    elif kind is AlertKind.CHECKS_FAILING:
        minutes = int(CHECK_WINDOW.total_seconds() // 60)
        text = f"{key}: status queries failed for {count} payments in the last {minutes} min"
        page = "/console/payments"
    else:
        hours = int(settings.provider_silence.total_seconds() // 3600)
        text = (
            f"{key}: no callback for more than {hours} h while {count} payment{plural} "
            f"{'is' if count == 1 else 'are'} open"
        )
        page = "/console/notifications"
    if settings.console and settings.public_url_set:
        text += f"\n{settings.public_url}{page}"
    return text


def post_to_webhook(url: str, text: str) -> None:
    """POST `{"text": ...}` once; raises AlertNotSent. The whole call, however slowly the
    endpoint answers, is bounded: the read is given up once TOTAL_TIMEOUT has passed."""
    deadline = time.monotonic() + TOTAL_TIMEOUT
    try:
        with requests.post(
            url,
            json={"text": text},
            timeout=(CONNECT_TIMEOUT, TOTAL_TIMEOUT),
            allow_redirects=False,
            stream=True,
        ) as response:
            answer = b""
            for chunk in response.iter_content(512):
                answer += chunk
                if len(answer) >= ANSWER_LIMIT or time.monotonic() > deadline:
                    break
            status = response.status_code
    except requests.RequestException as exc:
        raise AlertNotSent(type(exc).__name__) from None
    if not 200 <= status < 300:
        raise AlertNotSent(f"HTTP {status}")


@dataclass
class AlertReport:
    sent: list[str] = field(default_factory=list)
    unsent: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{len(self.sent)} alerts sent, {len(self.unsent)} could not be sent"


def send_alerts(
    services: Services, *, now: datetime | None = None, post: Post | None = None
) -> AlertReport:
    """Evaluate the conditions, then send each alert that has something waiting and is out
    of its quiet period. A failing endpoint is logged and the alert stays due: the next run
    tries it again. Nothing is raised for an alert that could not be sent."""
    now = now or utcnow()
    settings = services.settings
    report = AlertReport()
    if not settings.alert_webhook_url:
        return report
    evaluate(services, now)
    url = settings.alert_webhook_url
    send = post or post_to_webhook
    with services.db.sessions() as session:
        due = session.execute(
            select(Alert.id, Alert.kind, Alert.key, Alert.count, Alert.sent_at)
            .where(
                Alert.count > 0,
                or_(Alert.sent_at.is_(None), Alert.sent_at <= now - settings.alert_quiet),
            )
            .order_by(Alert.id)
        ).all()
    for alert_id, kind, key, count, sent_at in due:
        if not _claim(services, alert_id, sent_at, now):
            continue  # another run took it
        name = f"{kind.value}:{key}"
        try:
            send(url, text_of(settings, kind, key, count))
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("alert %s not sent (%s); trying again next time", name, reason)
            _unclaim(services, alert_id, sent_at, reason)
            report.unsent.append(name)
            continue
        _sent(services, alert_id, count, now)
        report.sent.append(name)
    if report.sent or report.unsent:
        log.info("alerts: %s", report)
    return report


def _claim(services: Services, alert_id: int, sent_at: datetime | None, now: datetime) -> bool:
    """Compare-and-set on `sent_at`: only one run sends a given alert."""
    with services.db.transaction() as session:
        result = session.execute(
            update(Alert)
            .where(
                Alert.id == alert_id,
                Alert.sent_at.is_(None) if sent_at is None else Alert.sent_at == sent_at,
            )
            .values(sent_at=now)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _unclaim(services: Services, alert_id: int, sent_at: datetime | None, reason: str) -> None:
    with services.db.transaction() as session:
        session.execute(
            update(Alert)
            .where(Alert.id == alert_id)
            .values(sent_at=sent_at, last_error=reason[:255])
            .execution_options(synchronize_session=False)
        )


def _sent(services: Services, alert_id: int, count: int, now: datetime) -> None:
    """What was told is taken off the count; what arrived while sending waits for the next."""
    with services.db.transaction() as session:
        session.execute(
            update(Alert)
            .where(Alert.id == alert_id)
            .values(
                count=Alert.count - count,
                first_at=case((Alert.count - count > 0, now), else_=None),
                last_error=None,
            )
            .execution_options(synchronize_session=False)
        )
