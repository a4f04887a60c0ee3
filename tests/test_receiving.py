"""The callback endpoints: every request within the cap is committed before `success`, anything
else gets a clear non-2xx, and nothing is parsed or trusted at this stage."""

from __future__ import annotations

import hashlib
import io
import threading

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy.exc import OperationalError
from werkzeug.test import EnvironBuilder, run_wsgi_app

from ipn import create_app
from ipn.callbacks import ENDPOINTS, route
from ipn.config import Settings
from ipn.dispatch import Dispatcher
from ipn.services import Services
from models import NotificationKind, NotificationStatus

from conftest import count_notifications
from helpers import CUBEPAY_IPN, FORM, JSON, notification


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_each_endpoint_stores_raw_request_and_answers_success(
    client: FlaskClient, services: Services, app: Flask, path: str
) -> None:
    body = b'{"any": "thing", "amount": 1.10}'
    response = client.post(
        f"/ipn{path}",
        data=body,
        headers={**JSON, "X-Extra": "kept"},
        environ_base={"REMOTE_ADDR": "203.0.113.9"},
    )
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data() == b"success"
    provider, kind = ENDPOINTS[path]
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    row = notification(services.db, notification_id)
    assert (row.provider, row.kind) == (provider, NotificationKind(kind))
    assert row.body == body
    assert row.body_sha256 == hashlib.sha256(body).hexdigest()
    assert row.headers["X-Extra"] == "kept"
    assert row.remote_addr == "203.0.113.9"
    assert row.status is NotificationStatus.RECEIVED


def test_form_body_is_kept_byte_for_byte(client: FlaskClient, services: Services) -> None:
    assert client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM).status_code == 200
    with services.db.sessions() as session:
        from models import Notification

        [row] = session.query(Notification).all()
    assert row.body == CUBEPAY_IPN


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe\x00invalid utf-8",
        b"[" * 50_000 + b"]" * 50_000,
        b"",
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    ],
)
def test_malformed_bodies_are_stored_and_answered_success(
    client: FlaskClient, services: Services, body: bytes
) -> None:
    body = body[: services.settings.max_body_bytes]
    response = client.post(
        "/ipn/bitcoinpaygate/notification", data=body, headers={"Content-Type": "text/weird"}
    )
    assert response.status_code == 200
    assert count_notifications(services.db) == 1


def test_oversized_body_is_refused_with_413_and_not_stored(
    client: FlaskClient, services: Services
) -> None:
    cap = services.settings.max_body_bytes
    assert client.post("/ipn/coinbarpay", data=b"x" * cap, headers=JSON).status_code == 200
    response = client.post("/ipn/coinbarpay", data=b"x" * (cap + 1), headers=JSON)
    assert response.status_code == 413
    assert b"Traceback" not in response.get_data()
    assert count_notifications(services.db) == 1


def test_oversized_chunked_body_without_length_is_refused(
    client: FlaskClient, services: Services
) -> None:
    cap = services.settings.max_body_bytes
    builder = EnvironBuilder(
        path="/ipn/coinbarpay",
        method="POST",
        headers=JSON,
        input_stream=io.BytesIO(b"y" * (cap + 4096)),
    )
    environ = builder.get_environ()
    # A chunked request: no length announced, the server says where the body ends.
    del environ["CONTENT_LENGTH"]
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    environ["wsgi.input_terminated"] = True
    _, status, _ = run_wsgi_app(client.application, environ)
    assert status.startswith("413")
    assert count_notifications(services.db) == 0


def test_chunked_body_within_the_cap_is_stored_whole(
    client: FlaskClient, services: Services
) -> None:
    body = b"z" * services.settings.max_body_bytes
    builder = EnvironBuilder(
        path="/ipn/coinbarpay", method="POST", headers=JSON, input_stream=io.BytesIO(body)
    )
    environ = builder.get_environ()
    del environ["CONTENT_LENGTH"]
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    environ["wsgi.input_terminated"] = True
    answer, status, _ = run_wsgi_app(client.application, environ)
    assert status.startswith("200") and b"".join(answer) == b"success"
    with services.db.sessions() as session:
        from models import Notification

        [row] = session.query(Notification).all()
    assert row.body == body


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_other_methods_are_405(client: FlaskClient, services: Services, method: str) -> None:
    response = getattr(client, method)("/ipn/cubepay")
    assert response.status_code == 405
    assert count_notifications(services.db) == 0


def test_database_failure_is_503_never_success(
    client: FlaskClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(services.db.engine, "begin", broken)
    # PostgreSQL stores with the driver's own statement, on a connection of the same pool.
    monkeypatch.setattr(services.db.engine, "raw_connection", broken)
    response = client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM)
    assert response.status_code == 503
    assert response.get_data() != b"success"
    monkeypatch.undo()
    assert count_notifications(services.db) == 0


def test_answer_does_not_wait_for_the_broker(
    app: Flask, client: FlaskClient, services: Services
) -> None:
    """A broker that hangs: every callback is committed and answered `success` while the
    publish is still stuck; the ids go out once the broker answers."""
    released = threading.Event()
    published: list[int] = []

    def hanging_publish(notification_id: int) -> None:
        released.wait(timeout=60)
        published.append(notification_id)

    dispatcher = Dispatcher(hanging_publish)
    app.extensions["ipn.dispatcher"] = dispatcher
    for _ in range(5):
        assert client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM).get_data() == b"success"
    assert count_notifications(services.db) == 5
    assert published == []
    released.set()
    assert dispatcher.drain(timeout=30)
    assert len(published) == 5


def test_a_broker_that_refuses_loses_nothing(settings: Settings) -> None:
    """Redis unreachable: rows are stored, publishing fails in the background, and the failures
    are counted for the sweeper rather than raised into the request."""
    app = create_app(settings.with_changes(redis_url="redis://127.0.0.1:9/0"))
    client = app.test_client()
    for _ in range(5):
        assert client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM).status_code == 200
    dispatcher = app.extensions["ipn.dispatcher"]
    assert dispatcher.drain(timeout=60)
    assert (dispatcher.sent, dispatcher.failed) == (0, 5)
    assert count_notifications(app.extensions["ipn"].db, NotificationStatus.RECEIVED) == 5
    app.extensions["ipn"].db.engine.dispose()


def test_a_body_shorter_than_its_declared_length_is_not_stored(
    client: FlaskClient, services: Services
) -> None:
    """A server that hands over what arrived before the client hung up (gunicorn does):
    10 bytes of a declared 1000 are refused, not stored."""
    builder = EnvironBuilder(
        path="/ipn/cubepay", method="POST", headers=FORM, input_stream=io.BytesIO(CUBEPAY_IPN[:10])
    )
    environ = builder.get_environ()
    environ["CONTENT_LENGTH"] = "1000"
    environ["wsgi.input_terminated"] = True
    answer, status, _ = run_wsgi_app(client.application, environ)
    assert status.startswith("400")
    assert b"success" not in b"".join(answer)
    assert count_notifications(services.db) == 0


@pytest.mark.parametrize("path", sorted(ENDPOINTS))
def test_options_on_a_callback_endpoint_is_405(
    client: FlaskClient, services: Services, path: str
) -> None:
    response = client.options(f"/ipn{path}")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert count_notifications(services.db) == 0


HOSTILE_BODIES = {
    "nul-in-json": b'{"order_id": "M1\\u0000x", "status": 2}',
    "raw-nul": b"order_id=M1\x00x&status=2",
    "lone-surrogate-escape": b'{"merchantTransactionId": "\\ud800", "status": "CONFIRMED"}',
    "lone-surrogate-bytes": b'{"merchantTransactionId": "\xed\xa0\x80"}',
    "huge-exponent": b'{"received_amount": 1e999, "amount": "1e999"}',
    "huge-integer": b'{"received_amount": ' + b"9" * 40 + b"}",
    "many-decimals": b'{"received_amount": "0.' + b"1" * 25 + b'"}',
    "form-nul-escape": b"merchant_transaction_id=M1%00x&sign=00",
    "form-surrogate-escape": b"merchant_transaction_id=%ED%A0%80&sign=00",
}


# Every endpoint is the same view: each body goes to one of them, in turn.
HOSTILE_CASES = [
    pytest.param(path, body, id=f"{name}-{path.strip('/').replace('/', '-')}")
    for (name, body), path in zip(
        HOSTILE_BODIES.items(), sorted(ENDPOINTS) * len(HOSTILE_BODIES), strict=False
    )
]


@pytest.mark.parametrize(("path", "body"), HOSTILE_CASES)
def test_hostile_bodies_are_stored_byte_for_byte_and_answered_success(
    client: FlaskClient, services: Services, app: Flask, path: str, body: bytes
) -> None:
    response = client.post(f"/ipn{path}", data=body, headers=JSON)
    assert (response.status_code, response.get_data()) == (200, b"success")
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    assert notification(services.db, notification_id).body == body


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Order": "M1\x00x"},
        {"X-Signature": "\x00"},
        {"X-Latin": "caf\xe9 \xff"},
        {"X-Control": "a\x01\x1f\x7fb"},
    ],
    ids=["nul", "nul-only", "latin-1", "controls"],
)
def test_hostile_headers_are_stored_and_answered_success(
    client: FlaskClient, services: Services, app: Flask, headers: dict[str, str]
) -> None:
    response = client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers={**FORM, **headers})
    assert (response.status_code, response.get_data()) == (200, b"success")
    [notification_id] = app.extensions["ipn.dispatcher"].submitted
    assert notification(services.db, notification_id).body == CUBEPAY_IPN


def test_hostile_query_string_is_stored_and_answered_success(
    client: FlaskClient, services: Services
) -> None:
    response = client.post(
        "/ipn/cubepay?order_id=%00%ED%A0%80&x=1e999", data=CUBEPAY_IPN, headers=FORM
    )
    assert (response.status_code, response.get_data()) == (200, b"success")
    assert count_notifications(services.db) == 1


# path -> (provider, kind, account) the callback layer answers for, or None: Flask's then.
ROUTES = {
    "/ipn/cubepay": ("cubepay", "ipn", "default"),
    "/ipn/bitcoinpaygate/notification": ("bitcoinpaygate", "notification", "default"),
    "/ipn/bitcoinpaygate/anomaly": ("bitcoinpaygate", "anomaly", "default"),
    "/ipn/coinbarpay": ("coinbarpay", "callback", "default"),
    "/ipn/cryptoprocessing": ("cryptoprocessing", "callback", "default"),
    "/ipn/cubepay/eur-shop": ("cubepay", "ipn", "eur-shop"),
    "/ipn/bitcoinpaygate/eur-shop/notification": ("bitcoinpaygate", "notification", "eur-shop"),
    "/ipn/bitcoinpaygate/anomaly/notification": ("bitcoinpaygate", "notification", "anomaly"),
    "/ipn/bitcoinpaygate/eur-shop/anomaly": ("bitcoinpaygate", "anomaly", "eur-shop"),
    "/ipn/coinbarpay/eur-shop": ("coinbarpay", "callback", "eur-shop"),
    "/ipn/cryptoprocessing/eur-shop": ("cryptoprocessing", "callback", "eur-shop"),
    # WSGI's latin-1 path of UTF-8 bytes, decoded as Flask would.
    "/ipn/cubepay/caf\xc3\xa9": ("cubepay", "ipn", "café"),
    "/ipn/cubepay/": None,
    "/ipn/cubepay//": None,
    "/ipn/cubepay/eur-shop/": None,
    "/ipn/cubepay/eur-shop/ipn": None,
    "/ipn/bitcoinpaygate": None,
    "/ipn/bitcoinpaygate/eur-shop": None,
    "/ipn/bitcoinpaygate//notification": None,
    "/ipn/bitcoinpaygate/eur-shop/refund": None,
    "/ipn/coinbarpay/eur-shop/callback": None,
    "/ipn/unknown": None,
    "/ipn/unknown/eur-shop": None,
    "/ipn": None,
    "/api/cubepay": None,
    "/other/cubepay/eur-shop": None,
    "/cubepay": None,
    "": None,
}


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_the_callback_paths_are_exactly_the_contracts(path: str) -> None:
    assert route(path) == ROUTES[path]


def test_a_post_to_any_other_path_under_ipn_is_flasks_404(
    client: FlaskClient, services: Services
) -> None:
    response = client.post("/ipn/unknown", data=b"x=1", headers=FORM)
    assert response.status_code == 404
    assert response.mimetype == "text/plain"
    assert b"Not Found" in response.get_data()
    assert count_notifications(services.db) == 0


def test_an_unexpected_error_answers_500_without_a_trace_and_stores_nothing(
    client: FlaskClient, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> int:
        raise RuntimeError("the secret sauce")

    monkeypatch.setattr("ipn.callbacks.store_callback", broken)
    response = client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers={"X-Request-Id": "req-500-a"})
    assert response.status_code == 500
    assert response.get_data() == (
        b"500 Internal Server Error: The server encountered an internal error and was unable"
        b" to complete your request. Either the server is overloaded or there is an error in"
        b" the application.\n"
    )
    assert response.headers["X-Request-Id"] == "req-500-a"
    assert count_notifications(services.db) == 0


def test_an_answer_states_its_type_and_length(client: FlaskClient) -> None:
    response = client.post("/ipn/cubepay", data=CUBEPAY_IPN, headers=FORM)
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.headers["Content-Length"] == str(len(b"success"))
    refused = client.get("/ipn/cubepay")
    assert refused.headers["Content-Length"] == str(len(refused.get_data()))
    assert refused.get_data() == (
        b"405 Method Not Allowed: The method is not allowed for the requested URL.\n"
    )
