"""`/metrics`: each family moves when its event happens, and the counts are right over two
gunicorn workers and a Celery worker whatever process answers the scrape."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.exc import OperationalError

from ipn import metric_files, rate_limit
from ipn.anomalies import open_anomaly
from ipn.dispatch import Dispatcher
from ipn.inbox import settle, store_callback
from ipn.processing import process_notification, run
from ipn.reconcile import reconcile_due
from ipn.services import Services
from ipn.sweeper import sweep_inbox
from models import AnomalyKind, Notification, NotificationStatus, utcnow

from conftest import ROOT, Backend, Worker, clean, wait_for
from faults_support import cp_headers, cp_paid_callback, forget_queue, free_port, unique_queue
from helpers import (
    CUBEPAY_IPN,
    CUBEPAY_QUERY,
    FORM,
    cubepay_query_answer,
    make_payment,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client: FlaskClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    return parse(response.get_data(as_text=True))


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def cubepay_payment(services: Services, **fields: Any) -> Any:
    values = {
        "provider_payment_id": "C1536678153791231775",
        "callback_token": "tok_5f2b9c",
        "pay_amount": Decimal("0.01"),
        "pay_currency": "BTC",
        **fields,
    }
    return make_payment(services.db, **values)


def test_a_stored_callback_counts_with_its_answer_time(client: FlaskClient) -> None:
    before = scrape(client)
    assert client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM).status_code == 200
    after = scrape(client)
    assert moved(before, after, "ipn_callbacks_total", provider="cubepay", kind="ipn") == 1
    assert moved(before, after, "ipn_callback_duration_seconds_count", provider="cubepay") == 1
    assert moved(before, after, "ipn_callbacks_refused_total", provider="cubepay", code="503") == 0


def test_too_large_and_unstored_callbacks_count_by_code(
    client: FlaskClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = scrape(client)
    too_large = b"x" * (services.settings.max_body_bytes + 1)
    assert client.post("/ipn/cubepay", data=too_large, headers=FORM).status_code == 413

    def broken(*args: object, **kwargs: object) -> None:
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(services.db.engine, "begin", broken)
    monkeypatch.setattr(services.db.engine, "raw_connection", broken)
    assert client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM).status_code == 503
    monkeypatch.undo()
    after = scrape(client)
    refused = "ipn_callbacks_refused_total"
    assert moved(before, after, refused, provider="cubepay", code="413") == 1
    assert moved(before, after, refused, provider="cubepay", code="503") == 1
    assert moved(before, after, "ipn_callbacks_total", provider="cubepay", kind="ipn") == 0
    assert moved(before, after, "ipn_callback_duration_seconds_count", provider="cubepay") == 2


def test_a_settled_row_counts_once_with_its_lag(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(2))
    before = scrape(client)
    assert client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM).status_code == 200
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    process_notification(services, notification_id)
    # Settled already: a second run changes nothing and counts nothing.
    process_notification(services, notification_id)
    after = scrape(client)
    settled = "ipn_notifications_settled_total"
    assert moved(before, after, settled, provider="cubepay", status="processed") == 1
    assert moved(before, after, "ipn_processing_lag_seconds_count", provider="cubepay") == 1
    requests_total = "ipn_provider_requests_total"
    assert moved(before, after, requests_total, **status_ok("cubepay")) == 1
    duration = "ipn_provider_request_duration_seconds_count"
    assert moved(before, after, duration, provider="cubepay", operation="status") == 1


def status_ok(provider: str) -> dict[str, str]:
    return {"provider": provider, "operation": "status", "outcome": "ok"}


def test_a_forged_callback_counts_rejected_with_its_reason(
    client: FlaskClient, app: Flask, services: Services
) -> None:
    before = scrape(client)
    forged = CUBEPAY_IPN.replace(b"sign=5E25AF", b"sign=5E25AE")
    assert client.post("/ipn/cubepay", data=forged, headers=FORM).status_code == 200
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    process_notification(services, notification_id)
    after = scrape(client)
    assert (
        moved(
            before, after, "ipn_notifications_settled_total", provider="cubepay", status="rejected"
        )
        == 1
    )
    assert (
        moved(
            before, after, "ipn_notifications_rejected_total", provider="cubepay", reason="forged"
        )
        == 1
    )


def test_a_settlement_rolled_back_is_not_counted(client: FlaskClient, services: Services) -> None:
    notification_id = store_callback(services.db, "cubepay", "ipn", CUBEPAY_IPN, {}, None)
    before = scrape(client)
    with services.db.sessions() as session, session.begin():
        assert settle(session, notification_id, NotificationStatus.PROCESSED, outcome="test")
        session.rollback()
    after = scrape(client)
    assert (
        moved(
            before, after, "ipn_notifications_settled_total", provider="cubepay", status="processed"
        )
        == 0
    )


def test_dead_rows_and_the_oldest_received_row(client: FlaskClient, services: Services) -> None:
    received_at = utcnow() - timedelta(hours=2)
    notification_id = store_callback(
        services.db, "cubepay", "ipn", CUBEPAY_IPN, {}, None, received_at=received_at
    )
    before = scrape(client)
    assert value(before, "ipn_oldest_received_age_seconds") >= 2 * 3600 - 5
    assert value(before, "ipn_last_callback_age_seconds", provider="cubepay") >= 2 * 3600 - 5
    with services.db.transaction() as session:
        session.get_one(Notification, notification_id).attempts = services.settings.max_attempts
    sweep_inbox(services, lambda _: None)
    after = scrape(client)
    assert (
        moved(before, after, "ipn_notifications_settled_total", provider="cubepay", status="dead")
        == 1
    )
    assert value(after, "ipn_oldest_received_age_seconds") == 0


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ({"status": 500, "body": "down"}, "5xx"),
        ({"status": 400, "body": '{"message": "bad"}'}, "4xx"),
        ({"body": requests.exceptions.ConnectTimeout("slow")}, "timeout"),
        ({"body": requests.exceptions.ConnectionError("refused")}, "unreachable"),
        ({"status": 200, "body": "<html>maintenance</html>"}, "garbage"),
    ],
    ids=["5xx", "4xx", "timeout", "unreachable", "garbage"],
)
def test_provider_requests_count_by_outcome(
    client: FlaskClient,
    services: Services,
    provider_api: responses.RequestsMock,
    answer: dict[str, Any],
    outcome: str,
) -> None:
    provider_api.post(CUBEPAY_QUERY, **answer)
    cubepay_payment(services, next_check_at=utcnow() - timedelta(minutes=1))
    before = scrape(client)
    report = reconcile_due(services)
    after = scrape(client)
    assert report.failed == 1, report
    # A transient failure is tried `http.attempts` times, each request counted; a 4xx once.
    attempts = 1 if outcome == "4xx" else services.settings.http.attempts
    counted = moved(
        before,
        after,
        "ipn_provider_requests_total",
        provider="cubepay",
        operation="status",
        outcome=outcome,
    )
    assert counted == attempts
    assert moved(before, after, "ipn_provider_requests_total", **status_ok("cubepay")) == 0
    checks = "ipn_reconcile_checks_total"
    assert moved(before, after, checks, provider="cubepay", outcome="failed") == 1
    assert moved(before, after, "ipn_reconcile_pass_payments_total", result="failed") == 1


def test_a_reconcile_pass_counts_its_checks_and_duration(
    client: FlaskClient, services: Services, provider_api: responses.RequestsMock
) -> None:
    provider_api.post(CUBEPAY_QUERY, body=cubepay_query_answer(2))
    cubepay_payment(services, next_check_at=utcnow() - timedelta(minutes=1))
    before = scrape(client)
    assert value(before, "ipn_payments_check_overdue") == 1
    assert value(before, "ipn_open_payments", provider="cubepay") == 1
    reconcile_due(services)
    after = scrape(client)
    checks = "ipn_reconcile_checks_total"
    assert moved(before, after, checks, provider="cubepay", outcome="changed") == 1
    assert moved(before, after, "ipn_reconcile_pass_duration_seconds_count") == 1
    assert moved(before, after, "ipn_reconcile_pass_payments_total", result="checked") == 1
    assert moved(before, after, "ipn_reconcile_pass_payments_total", result="changed") == 1
    assert value(after, "ipn_payments_check_overdue") == 0
    assert value(after, "ipn_open_payments", provider="cubepay") == 0
    assert value(after, "ipn_payments", provider="cubepay", status="paid") == 1


def test_call_budget_left_follows_the_calls_taken(
    client: FlaskClient, services: Services, provider_api: responses.RequestsMock
) -> None:
    limit, period = services.settings.poll_limits["coinbarpay"]
    before = value(scrape(client), "ipn_provider_calls_left", provider="coinbarpay", period=period)
    assert before == limit
    assert rate_limit.take(services.db, "coinbarpay", limit, period, utcnow())
    after = value(scrape(client), "ipn_provider_calls_left", provider="coinbarpay", period=period)
    assert after == limit - 1


def test_transient_failures_count_retries(
    client: FlaskClient, app: Flask, services: Services, provider_api: responses.RequestsMock
) -> None:
    cubepay_payment(services)
    provider_api.post(CUBEPAY_QUERY, status=503, body="busy")
    assert client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM).status_code == 200
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    before = scrape(client)
    _message, countdown = run(services, notification_id, retries_so_far=0)
    assert countdown is not None
    after = scrape(client)
    assert moved(before, after, "ipn_notification_retries_total") == 1


def test_open_anomalies_by_kind(client: FlaskClient, services: Services) -> None:
    with services.db.transaction() as session:
        open_anomaly(session, AnomalyKind.LATE_PAYMENT, "late-1", {"why": "test"})
    samples = scrape(client)
    assert value(samples, "ipn_open_anomalies", kind="late_payment") == 1


def test_the_dispatcher_counts_its_queue_drops_and_failures(client: FlaskClient) -> None:
    held: list[int] = []

    def refuse(notification_id: int) -> None:
        held.append(notification_id)
        raise ConnectionError("broker down")

    # No pause after a failure and no batches: every id reaches the broker, and fails there.
    dispatcher = Dispatcher(refuse, capacity=1, what="test", pause=0, linger=0)
    before = scrape(client)
    for notification_id in range(50):
        dispatcher.submit(notification_id)
    assert dispatcher.drain()
    after = scrape(client)
    dropped = moved(before, after, "ipn_dispatch_dropped_total", what="test")
    failed = moved(before, after, "ipn_dispatch_failed_total", what="test")
    assert dropped == dispatcher.dropped > 0
    assert failed == len(held) == 50 - dispatcher.dropped
    assert value(after, "ipn_dispatch_queue_depth", what="test") == 0


# Several processes --------------------------------------------------------------------------

CALLBACKS = 30
SCRAPES = 12


def procfile_web_command() -> str:
    [line] = [
        line for line in (ROOT / "Procfile").read_text().splitlines() if line.startswith("web:")
    ]
    return line.removeprefix("web:").strip()


class Web:
    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.port, self.process, self.log = port, process, log

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Any:
        # A connection of its own each time, so that either worker may take it.
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def workers(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(pid) for pid in out.split()]


@pytest.fixture
def shared_metrics(tmp_path: Path) -> Path:
    directory = tmp_path / "metrics"
    directory.mkdir()
    return directory


@pytest.fixture
def web_and_queue(
    backend: Backend, tmp_path: Path, shared_metrics: Path
) -> Iterator[tuple[Web, dict[str, str]]]:
    env = {
        "IPN_QUEUE": unique_queue(backend.env["IPN_QUEUE"]),
        "PROMETHEUS_MULTIPROC_DIR": str(shared_metrics),
    }
    port = free_port()
    log = tmp_path / "web.log"
    process_env = {
        **os.environ,
        **backend.env,
        **env,
        "PORT": str(port),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    process_env.pop("WEB_CONCURRENCY", None)
    with log.open("ab") as out:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {procfile_web_command()}"],
            cwd=ROOT,
            env=process_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    web = Web(port, process, log)

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"web exited: {log.read_text()[-3000:]}")
        try:
            return bool(web.request("GET", "/healthz")[0] == 200 and len(web.workers()) == 2)
        except OSError:
            return False

    try:
        wait_for(answering, timeout=60, message="the web process and its two workers")
        yield web, env
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 15)
            process.wait(timeout=20)
        forget_queue(backend.env.get("REDIS_URL"), env["IPN_QUEUE"])


@pytest.mark.postgres
@pytest.mark.worker
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_counts_are_right_whatever_process_answers_the_scrape(
    backend: Backend,
    web_and_queue: tuple[Web, dict[str, str]],
    start_worker: Callable[..., Worker],
    shared_metrics: Path,
) -> None:
    web, env = web_and_queue
    clean(backend.db)
    make_payment(
        backend.db,
        provider="cryptoprocessing",
        order_id="order_12345",
        amount=Decimal("0.3"),
        currency="ETH",
    )
    start_worker(env=env, concurrency=2)
    body = cp_paid_callback()
    headers = {"Content-Type": "application/json", **cp_headers(body)}
    for _ in range(CALLBACKS):
        status, answer = web.request("POST", "/ipn/cryptoprocessing", body, **headers)
        assert (status, answer) == (200, b"success")

    def settled_everywhere() -> bool:
        samples = parse(web.request("GET", "/metrics")[1].decode())
        return (
            value(samples, "ipn_notifications", provider="cryptoprocessing", status="processed")
            == CALLBACKS
        )

    wait_for(settled_everywhere, timeout=90, message="the worker to settle every callback")
    # Both web workers took callbacks, and the Celery pool wrote its own files: the sums below
    # are over processes, not the count of whichever answered.
    writers = {
        int(name.split("_")[-1].removesuffix(".db")) for name in counter_files(shared_metrics)
    }
    assert set(web.workers()) <= writers, (web.workers(), writers)
    for _ in range(SCRAPES):
        status, text = web.request("GET", "/metrics")
        assert status == 200
        samples = parse(text.decode())
        labels = {"provider": "cryptoprocessing"}
        assert value(samples, "ipn_callbacks_total", kind="callback", **labels) == CALLBACKS
        assert (
            value(samples, "ipn_notifications_settled_total", status="processed", **labels)
            == CALLBACKS
        )
        assert value(samples, "ipn_processing_lag_seconds_count", **labels) == CALLBACKS
        assert value(samples, "ipn_callback_duration_seconds_count", **labels) == CALLBACKS


def counter_files(directory: Path) -> list[str]:
    return [path.name for path in directory.glob("counter_*.db")]


def test_metric_files_of_departed_processes_are_cleared(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (tmp_path / f"counter_{gone}.db").write_bytes(b"")
    (tmp_path / f"counter_{os.getpid()}.db").write_bytes(b"")
    removed = metric_files.clear_departed(tmp_path)
    assert [path.name for path in removed] == [f"counter_{gone}.db"]
    assert (tmp_path / f"counter_{os.getpid()}.db").exists()


def test_the_default_directory_is_under_the_data_dir(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["IPN_DATA_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", "import ipn, os; print(os.environ['PROMETHEUS_MULTIPROC_DIR'])"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert out == str((tmp_path / "prometheus-multiproc").resolve())
    assert Path(out).is_dir()


def test_a_data_dir_that_cannot_be_created_falls_back_to_a_temporary_directory(
    tmp_path: Path,
) -> None:
    # A file where the directory should be: no mkdir succeeds there, even as root.
    occupied = tmp_path / "occupied"
    occupied.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["IPN_DATA_DIR"] = str(occupied)
    out = subprocess.run(
        [sys.executable, "-c", "import ipn, os; print(os.environ['PROMETHEUS_MULTIPROC_DIR'])"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(out).parent == Path(tempfile.gettempdir())
    assert Path(out).is_dir()
