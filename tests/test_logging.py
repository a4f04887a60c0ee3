"""Log lines: JSON objects a line when asked, text by default, carrying the context they were
logged in, and the request id of a callback from the view's line to the worker's."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import responses
from flask import Flask

from ipn import create_app
from ipn.config import Settings
from ipn.logs import bound, configure_logging
from ipn.processing import run
from models import Notification

from conftest import ROOT, RecordingDispatcher
from helpers import CUBEPAY_IPN, FORM, PROVIDER_URL, cubepay_query_answer, make_payment


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def json_app(settings: Settings) -> tuple[Flask, io.StringIO]:
    app = create_app(settings.with_changes(log_format="json"))
    app.config["TESTING"] = True
    app.extensions["ipn.dispatcher"] = RecordingDispatcher()
    stream = io.StringIO()
    configure_logging(app.extensions["ipn"].settings, stream=stream)
    return app, stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_request_id_follows_a_callback_from_the_view_into_the_worker(
    settings: Settings, provider_api: responses.RequestsMock
) -> None:
    app, stream = json_app(settings)
    services = app.extensions["ipn"]
    payment = make_payment(
        services.db, provider_payment_id="C1536678153791231775", callback_token="tok_5f2b9c"
    )
    provider_api.post(f"{PROVIDER_URL}/cubepay/payment/query", body=cubepay_query_answer(2))
    answer = app.test_client().post(
        "/ipn/cubepay", data=CUBEPAY_IPN, headers={**FORM, "X-Request-Id": "req-abc-12345"}
    )
    assert answer.status_code == 200
    assert answer.headers["X-Request-Id"] == "req-abc-12345"
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    with services.db.sessions() as session:
        assert session.get(Notification, notification_id).request_id == "req-abc-12345"

    view_lines = lines(stream)
    stored = [line for line in view_lines if "stored as notification" in line["message"]]
    assert len(stored) == 1
    assert stored[0]["request_id"] == "req-abc-12345"
    assert stored[0]["provider"] == "cubepay"
    assert stored[0]["notification_id"] == notification_id
    assert stored[0]["level"] == "INFO"
    assert stored[0]["logger"] == "ipn.callbacks"
    assert "time" in stored[0]

    stream.truncate(0)
    stream.seek(0)
    with app.app_context():
        run(services, notification_id, 0)
    worker_lines = lines(stream)
    assert worker_lines, "the worker logged nothing"
    for line in worker_lines:
        assert line["request_id"] == "req-abc-12345", line
        assert line["notification_id"] == notification_id, line
    settled = worker_lines[-1]
    assert settled["provider"] == "cubepay"
    assert settled["payment_id"] == payment.id
    assert settled["order_id"] == "M12345678"
    # Nothing of the processing's context outlives it.
    logging.getLogger("ipn.test").info("after")
    assert "request_id" not in lines(stream)[-1]


@pytest.mark.usefixtures("restore_logging")
def test_an_unfit_request_id_is_replaced_by_one_of_ours(settings: Settings) -> None:
    app, stream = json_app(settings)
    answer = app.test_client().post(
        "/ipn/cubepay", data=CUBEPAY_IPN, headers={**FORM, "X-Request-Id": "x' OR 1=1 --"}
    )
    ours = answer.headers["X-Request-Id"]
    assert ours != "x' OR 1=1 --" and len(ours) == 32
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    with app.extensions["ipn"].db.sessions() as session:
        assert session.get(Notification, notification_id).request_id == ours
    [stored] = [line for line in lines(stream) if "stored as notification" in line["message"]]
    assert stored["request_id"] == ours


@pytest.mark.usefixtures("restore_logging")
def test_the_celery_task_id_is_on_the_lines_of_a_task(settings: Settings) -> None:
    app, stream = json_app(settings)
    celery = app.extensions["celery"]

    # A name of its own for each app: Celery keeps the first callable registered under a name.
    @celery.task(name=f"ipn.test_logging_task.{uuid.uuid4().hex}", bind=True)
    def logs_a_line(self: Any) -> None:
        with bound(notification_id=7):
            logging.getLogger("ipn.test").info("inside")

    # `apply` runs the task here with a request of its own, as a worker would.
    logs_a_line.apply(task_id="task-1234")
    [line] = [line for line in lines(stream) if line["message"] == "inside"]
    assert line["task_id"] == "task-1234"
    assert line["notification_id"] == 7


@pytest.mark.usefixtures("restore_logging")
def test_text_is_the_default_and_shows_the_context(settings: Settings) -> None:
    assert Settings.from_env({}).log_format == "text"
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    with bound(request_id="req-abc-12345", provider="cubepay"):
        logging.getLogger("ipn.test").warning("a line")
    text = stream.getvalue()
    assert text.rstrip().endswith("a line [request_id=req-abc-12345 provider=cubepay]")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_a_bad_log_format_is_refused_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from ipn.config import settings_or_exit; settings_or_exit()"],
        cwd=ROOT,
        env={"IPN_LOG_FORMAT": "xml", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "ipn: configuration error: IPN_LOG_FORMAT must be one of text, json, not 'xml'"
    ]
