"""The inbox sweeper: rows stuck in `received` are sent again once their time is up, each once
however many sweepers run, and rows out of attempts go `dead` and stay there."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from ipn.replay import replay
from ipn.services import Services
from ipn.sweeper import sweep_inbox
from models import Notification, NotificationReplay, NotificationStatus, ReplayMode, utcnow

from helpers import CUBEPAY_IPN, FORM, notification


def stored(client: FlaskClient, app: Flask, count: int = 1) -> list[int]:
    for _ in range(count):
        assert client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM).status_code == 200
    submitted: list[int] = app.extensions["ipn.dispatcher"].submitted
    return submitted[-count:]


def test_rows_are_resent_only_after_sweep_after(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    [row] = stored(client, app)
    sent: list[int] = []
    assert sweep_inbox(services, sent.append).requeued == []  # too young: maybe still queued
    later = utcnow() + services.settings.sweep_after + timedelta(seconds=1)
    assert sweep_inbox(services, sent.append, now=later).requeued == [row]
    # Its next sweep time moved on: an immediate second sweep leaves it alone.
    assert sweep_inbox(services, sent.append, now=later).requeued == []
    assert sent == [row]


def test_rows_out_of_attempts_go_dead_and_stay_dead(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    [row] = stored(client, app)
    with services.db.transaction() as session:
        stuck = session.get(Notification, row)
        assert stuck is not None
        stuck.attempts = services.settings.max_attempts
        stuck.last_error = "worker lost"
    sent: list[int] = []
    later = utcnow() + services.settings.sweep_after * 2
    report = sweep_inbox(services, sent.append, now=later)
    assert (report.dead, report.requeued, sent) == ([row], [], [])
    dead = notification(services.db, row)
    assert dead.status is NotificationStatus.DEAD
    assert dead.last_error == "worker lost" and "dead after" in (dead.outcome or "")
    much_later = later + timedelta(days=1)
    assert sweep_inbox(services, sent.append, now=much_later).requeued == []
    assert notification(services.db, row).status is NotificationStatus.DEAD


def test_a_broker_still_down_leaves_rows_for_the_next_sweep(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    rows = stored(client, app, 3)

    def broker_down(_id: int) -> None:
        raise ConnectionError("refused")

    later = utcnow() + services.settings.sweep_after + timedelta(seconds=1)
    report = sweep_inbox(services, broker_down, now=later)
    assert report.unsent == rows and report.requeued == []
    assert all(notification(services.db, r).status is NotificationStatus.RECEIVED for r in rows)
    sent: list[int] = []
    even_later = later + services.settings.sweep_after + timedelta(seconds=1)
    assert sweep_inbox(services, sent.append, now=even_later).requeued == rows


@pytest.mark.parametrize("sweepers", [3])
def test_concurrent_sweepers_send_each_row_once(
    client: FlaskClient, app: Flask, services: Services, sweepers: int
) -> None:
    rows = stored(client, app, 25)
    sent: list[int] = []
    lock = threading.Lock()

    def send(notification_id: int) -> None:
        with lock:
            sent.append(notification_id)

    later = utcnow() + services.settings.sweep_after + timedelta(seconds=1)
    threads = [
        threading.Thread(target=sweep_inbox, args=(services, send), kwargs={"now": later})
        for _ in range(sweepers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(sent) == sorted(rows)


def test_a_replayed_dead_row_gets_fresh_attempts_while_the_broker_is_down(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    """Replay resets what the sweeper reads: with no worker reachable the row is sent again by
    each sweep, never buried as dead again before any attempt ran."""
    [row] = stored(client, app)
    with services.db.transaction() as session:
        stuck = session.get(Notification, row)
        assert stuck is not None
        stuck.attempts = services.settings.max_attempts
        stuck.last_error = "worker lost"
    later = utcnow() + services.settings.sweep_after * 2
    assert sweep_inbox(services, lambda _id: None, now=later).dead == [row]

    def broker_down(_id: int) -> None:
        raise ConnectionError("refused")

    assert replay(services, [row], ReplayMode.STORED, broker_down) == [row]
    replayed = notification(services.db, row)
    assert replayed.status is NotificationStatus.RECEIVED
    assert (replayed.attempts, replayed.last_error, replayed.processed_at) == (0, None, None)
    moment = utcnow()
    for sweep in range(1, 4):
        moment += services.settings.sweep_after + timedelta(seconds=1)
        report = sweep_inbox(services, broker_down, now=moment)
        assert (report.dead, report.unsent) == ([], [row]), f"sweep {sweep}"
    assert notification(services.db, row).status is NotificationStatus.RECEIVED
    # What the row was before the replay is kept on the replay's record.
    with services.db.sessions() as session:
        [record] = session.scalars(select(NotificationReplay)).all()
    assert record.previous_status is NotificationStatus.DEAD
    assert record.data is not None
    assert record.data["attempts"] == services.settings.max_attempts
    assert record.data["last_error"] == "worker lost"
