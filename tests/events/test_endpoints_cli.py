"""`ipn endpoints`: add prints the secret once, list never does, and bad input is one line and
a non-zero exit."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest
from click.testing import Result
from flask import Flask
from sqlalchemy import func, select

from ipn.services import Services
from models.event import Endpoint, EndpointOrigin, EndpointStatus

PUBLIC = "93.184.215.14"
REAL_GETADDRINFO = socket.getaddrinfo


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "shop.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port))]
        return REAL_GETADDRINFO(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def ipn(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=list(args))


def added(app: Flask, *args: str) -> tuple[str, str]:
    result = ipn(app, "endpoints", "add", *args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("endpoint ep_") and lines[1].startswith("secret whsec_")
    assert "will not be shown again" in lines[2]
    return lines[0].split()[1], lines[1].split()[1]


def stored(services: Services, endpoint_id: str) -> Endpoint:
    with services.db.sessions() as session:
        endpoint = session.get(Endpoint, endpoint_id)
        assert endpoint is not None
        return endpoint


def test_add_prints_the_secret_once_and_list_never(
    app: Flask, services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    endpoint_id, secret = added(
        app,
        "https://shop.example/hook",
        "--event",
        "payment.paid",
        "--event",
        "anomaly.opened",
        "--description",
        "the shop",
    )
    endpoint = stored(services, endpoint_id)
    assert endpoint.secret == secret
    assert endpoint.events == ["payment.paid", "anomaly.opened"]
    assert endpoint.description == "the shop"

    as_json = ipn(app, "endpoints", "list", "--json")
    table = ipn(app, "endpoints", "list")
    assert as_json.exit_code == table.exit_code == 0
    items = [json.loads(line) for line in as_json.output.splitlines()]
    assert [item["id"] for item in items] == [endpoint_id]
    assert items[0]["events"] == ["payment.paid", "anomaly.opened"]
    assert "secret" not in items[0]
    assert endpoint_id in table.output and "(1 shown)" in table.output
    for text in (as_json.output, table.output, caplog.text):
        assert secret not in text


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["https://127.0.0.1/hook"], "private address"),
        (["http://shop.example/hook"], "https://"),
        (["not a url"], "malformed"),
        (["https://shop.example/", "--event", "payment.bogus"], "payment.bogus"),
    ],
)
def test_add_refuses_bad_input_on_one_line_and_stores_nothing(
    app: Flask, services: Services, args: list[str], problem: str
) -> None:
    result = ipn(app, "endpoints", "add", *args)
    assert result.exit_code != 0
    assert problem in result.output
    assert "Traceback" not in result.output
    if "--event" not in args:
        assert len(result.output.strip().splitlines()) == 1
    with services.db.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Endpoint)) == 0


def test_disable_enable_rotate_and_delete(app: Flask, services: Services) -> None:
    endpoint_id, secret = added(app, "https://shop.example/hook")

    assert ipn(app, "endpoints", "disable", endpoint_id).exit_code == 0
    endpoint = stored(services, endpoint_id)
    assert endpoint.status is EndpointStatus.DISABLED
    assert endpoint.disabled_reason == "disabled by the operator"

    assert ipn(app, "endpoints", "enable", endpoint_id).exit_code == 0
    endpoint = stored(services, endpoint_id)
    assert (endpoint.status, endpoint.disabled_reason) == (EndpointStatus.ENABLED, None)

    rotated = ipn(app, "endpoints", "rotate-secret", endpoint_id)
    assert rotated.exit_code == 0
    new_secret = rotated.output.splitlines()[0].removeprefix("secret ")
    endpoint = stored(services, endpoint_id)
    assert (endpoint.secret, endpoint.previous_secret) == (new_secret, secret)
    assert secret not in rotated.output
    assert "will not be shown again" in rotated.output

    assert ipn(app, "endpoints", "delete", endpoint_id).exit_code == 0
    assert stored(services, endpoint_id).deleted_at is not None
    assert ipn(app, "endpoints", "list", "--json").output == ""
    again = ipn(app, "endpoints", "disable", endpoint_id)
    assert again.exit_code != 0
    assert again.output.strip() == f"Error: no endpoint {endpoint_id}"


@pytest.mark.parametrize("command", ["disable", "enable", "delete", "rotate-secret"])
def test_an_unknown_id_is_one_line_and_non_zero(app: Flask, command: str) -> None:
    result = ipn(app, "endpoints", command, "ep_nope")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: no endpoint ep_nope"


def test_a_configured_endpoint_is_switched_off_and_on_but_not_changed(
    app: Flask, services: Services
) -> None:
    with services.db.transaction() as session:
        endpoint = Endpoint(url="https://shop.example/", origin=EndpointOrigin.ENVIRONMENT)
        session.add(endpoint)
        session.flush()
        endpoint_id = endpoint.id
    rotated = ipn(app, "endpoints", "rotate-secret", endpoint_id)
    assert rotated.exit_code == 1
    assert "IPN_MERCHANT_WEBHOOK_URL" in rotated.output
    assert ipn(app, "endpoints", "disable", endpoint_id).exit_code == 0
    assert stored(services, endpoint_id).status is EndpointStatus.DISABLED
    assert ipn(app, "endpoints", "enable", endpoint_id).exit_code == 0
    assert stored(services, endpoint_id).status is EndpointStatus.ENABLED
