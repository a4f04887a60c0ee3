"""`ipn endpoints`: the merchant's endpoints from the command line, the API's functions below."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from flask.cli import AppGroup

from ipn.cli import _print, json_option, services
from ipn.events import endpoints as functions
from ipn.events import serialize as shapes
from models import EventType, utcnow

endpoints = AppGroup("endpoints", help="Where the merchant's events are sent.")


def _carry_out(change: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one change in its own transaction; a refusal is a one-line error."""
    try:
        with services().db.transaction() as session:
            return change(session, *args, **kwargs)
    except functions.EndpointError as exc:
        raise click.ClickException(str(exc)) from None


@endpoints.command("add")
@click.argument("url")
@click.option(
    "--event",
    "events",
    multiple=True,
    type=click.Choice([member.value for member in EventType]),
    help="An event type it hears (repeat for more); none: all of them.",
)
@click.option("--description", default="", help="What it is, for the operator.")
def endpoints_add(url: str, events: tuple[str, ...], description: str) -> None:
    """Register an endpoint and print its secret, this once."""

    def add(session: Any) -> tuple[str, str]:
        endpoint, secret = functions.register(
            session, url, list(events), description, settings=services().settings, now=utcnow()
        )
        return endpoint.id, secret

    endpoint_id, secret = _carry_out(add)
    click.echo(f"endpoint {endpoint_id}")
    click.echo(f"secret {secret}")
    click.echo("The secret will not be shown again: keep it with the shop now.")


@endpoints.command("list")
@json_option
def endpoints_list(as_json: bool) -> None:
    """Every endpoint not deleted, oldest first (never their secrets)."""
    with services().db.sessions() as session:
        rows = functions.listing(session)
    _print(
        rows,
        shapes.endpoint,
        as_json,
        [("id", 29), ("status", 9), ("origin", 12), ("events", 24), ("url", 0)],
        extra=lambda item: {"events": ",".join(item["events"]) or "all"},
    )


@endpoints.command("disable")
@click.argument("endpoint_id")
@click.option("--reason", default=functions.OPERATOR_DISABLED, help="Why, for the record.")
def endpoints_disable(endpoint_id: str, reason: str) -> None:
    """Stop delivering to an endpoint; its events wait until it is enabled."""
    _carry_out(functions.disable, endpoint_id, reason, utcnow())
    click.echo(f"endpoint {endpoint_id} disabled")


@endpoints.command("enable")
@click.argument("endpoint_id")
def endpoints_enable(endpoint_id: str) -> None:
    """Deliver to an endpoint again, forgetting its failures."""
    _carry_out(functions.enable, endpoint_id, utcnow())
    click.echo(f"endpoint {endpoint_id} enabled")


@endpoints.command("delete")
@click.argument("endpoint_id")
def endpoints_delete(endpoint_id: str) -> None:
    """Delete an endpoint for good; its pending deliveries fail."""
    _carry_out(functions.delete, endpoint_id, utcnow())
    click.echo(f"endpoint {endpoint_id} deleted")


@endpoints.command("rotate-secret")
@click.argument("endpoint_id")
def endpoints_rotate_secret(endpoint_id: str) -> None:
    """Give an endpoint a new secret, printed this once; the old one signs a while longer."""
    settings = services().settings
    secret = _carry_out(functions.rotate_secret, endpoint_id, settings=settings, now=utcnow())
    hours = settings.events.secret_overlap.total_seconds() / 3600
    click.echo(f"secret {secret}")
    click.echo(f"The previous secret still signs for {hours:g} h.")
    click.echo("The secret will not be shown again: keep it with the shop now.")
