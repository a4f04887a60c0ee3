"""`ipn endpoints` and `ipn events`: the merchant's endpoints and the delivery log from the command
line, over the same functions as the API."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import click
from flask.cli import AppGroup
from sqlalchemy import select

from ipn import serialize
from ipn.cli import _keyset, _print, json_option, parse_time_option, services
from ipn.events import endpoints as functions
from ipn.events import history
from ipn.events import serialize as shapes
from models import DeliveryStatus, EventType, MerchantEvent, utcnow

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


# --- the delivery log -----------------------------------------------------------------------

events = AppGroup("events", help="What the merchant's endpoints were told, and redelivery.")
event_type_choice = click.Choice([t.value for t in EventType])
delivery_status_choice = click.Choice([s.value for s in DeliveryStatus])


def _event_filter(
    payment: str | None,
    event_type: str | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
) -> history.EventFilter:
    return history.EventFilter(
        payment_id=payment,
        type=EventType(event_type) if event_type else None,
        status=DeliveryStatus(status) if status else None,
        since=since,
        until=until,
    )


event_filters = [
    click.option("--payment", help="Only this payment's events (payment id)."),
    click.option("--type", "event_type", type=event_type_choice),
    click.option("--status", type=delivery_status_choice),
    click.option("--since", callback=parse_time_option, help="Created at or after."),
    click.option("--until", callback=parse_time_option, help="Created before."),
]


def _with_event_filters(command: Any) -> Any:
    for option in reversed(event_filters):
        command = option(command)
    return command


@events.command("list")
@_with_event_filters
@json_option
def events_list(
    payment: str | None,
    event_type: str | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    as_json: bool,
) -> None:
    """Every matching event, oldest first."""
    which = _event_filter(payment, event_type, status, since, until)
    _print(
        _keyset(which.apply(select(MerchantEvent)), MerchantEvent.id),
        history.item,
        as_json,
        [
            ("id", 30),
            ("type", 18),
            ("payment_id", 30),
            ("sequence", 8),
            ("status", 9),
            ("created_at", 0),
        ],
    )


@events.command("show")
@click.argument("event_id")
@json_option
def events_show(event_id: str, as_json: bool) -> None:
    """One event as it was sent, where it went, and every attempt."""
    with services().db.sessions() as session:
        event = session.get(MerchantEvent, event_id)
        if event is None:
            raise click.ClickException(f"no event {event_id}")
        detail = history.detail(session, event)
    if as_json:
        click.echo(serialize.dumps(detail))
        return
    click.echo(f"{detail['id']}  {detail['type']}  {detail['status']}")
    click.echo(f"  payment: {detail['payment_id'] or '-'}  sequence: {detail['sequence'] or '-'}")
    click.echo(f"  created: {detail['created_at']}")
    for d in detail["deliveries"]:
        due = f", next attempt {d['next_attempt_at']}" if d["next_attempt_at"] else ""
        click.echo(
            f"  to {d['endpoint_id']}: {d['status']} after {_attempts(d['attempts'])}{due}"
            + (f" ({d['last_error']})" if d["last_error"] and d["status"] != "delivered" else "")
        )
    for a in detail["attempts"]:
        click.echo(
            f"    {a['at']} {a['endpoint_id']} "
            f"{a['status_code'] or '-'} {a['duration_ms']} ms {a['error'] or ''}".rstrip()
        )
    click.echo(serialize.dumps(detail["body"]))


@events.command("redeliver")
@click.argument("event_ids", nargs=-1)
@_with_event_filters
@click.option("--dry-run", is_flag=True, help="Only list what would be sent again.")
@json_option
def events_redeliver(
    event_ids: tuple[str, ...],
    payment: str | None,
    event_type: str | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Send events again, with their own webhook-ids: by ids, or by filters (AND)."""
    which = _event_filter(payment, event_type, status, since, until)
    if event_ids and which:
        raise click.UsageError("give event ids or filters, not both")
    if not event_ids and not which:
        raise click.UsageError(
            "give event ids, or at least one of --payment, --type, --status, --since, --until"
        )
    if event_ids:
        chosen = list(dict.fromkeys(event_ids))
        with services().db.sessions() as session:
            found = set(
                session.scalars(select(MerchantEvent.id).where(MerchantEvent.id.in_(chosen)))
            )
        if missing := [e for e in chosen if e not in found]:
            raise click.ClickException(f"no event {', '.join(missing)}")
    else:
        chosen = list(history.matching_ids(services(), which))
    if not dry_run:
        chosen = history.redeliver(services(), chosen, utcnow())
    if as_json:
        click.echo(serialize.dumps({"count": len(chosen), "ids": chosen, "dry_run": dry_run}))
        return
    verb = "would redeliver" if dry_run else "redelivered"
    for event_id in chosen:
        click.echo(f"{verb} {event_id}")
    click.echo(f"{verb} {len(chosen)} event{'s' if len(chosen) != 1 else ''}")


def _attempts(count: int) -> str:
    return f"{count} attempt{'' if count == 1 else 's'}"
