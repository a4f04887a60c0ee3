"""The `ipn` command line: run the service, migrate, and the operator's lists, shows and replays."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, MutableMapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, FlaskGroup, with_appcontext
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from ipn import replay as replays
from ipn import serialize
from ipn.anomalies import resolve_anomaly
from ipn.config import PROVIDERS, settings_or_exit
from ipn.dispatch import enqueue
from ipn.logs import configure_logging
from ipn.services import Services
from models import (
    Anomaly,
    AnomalyStatus,
    Notification,
    NotificationStatus,
    Payment,
    ReplayMode,
    utcnow,
)

PAGE = 500


def main() -> None:
    """Entry point of the `ipn` console script."""
    # Command output goes to stdout; the library's INFO lines would only be in its way there.
    configure_logging(level=logging.WARNING, stream=sys.stderr)

    def load() -> Flask:
        from ipn import create_app

        # Read here, not before: `-e FILE` has been loaded into the environment by now.
        return create_app(settings_or_exit(_with_sandbox_profile(os.environ)))

    group = FlaskGroup(
        name="ipn",
        create_app=load,
        add_default_commands=False,
        add_version_option=False,
        load_dotenv=False,
        help="Webhook/IPN receiver and reconciliation worker for crypto payment providers.",
    )
    group = click.version_option(package_name="ipn-receiver", prog_name="ipn")(group)
    try:
        group.main(prog_name="ipn")
    except DBAPIError as exc:
        if not _no_schema(exc):
            raise
        click.echo("Error: the database has no tables yet: run `ipn db upgrade`", err=True)
        sys.exit(1)


def _no_schema(exc: DBAPIError) -> bool:
    """A command run on a database that was never migrated (a fresh directory, before `ipn run`)."""
    text = str(exc.orig)
    return "no such table" in text or ('relation "' in text and "does not exist" in text)


def _with_sandbox_profile(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """The environment, with the settings of an `ipn run --sandbox` running on the same data
    directory over it: the commands typed beside it reach its sandbox, token and database."""
    from ipn.sandbox import profile

    values = profile.read(Path(env.get("IPN_DATA_DIR", "").strip() or "."))
    if values:
        env.update(values)
    return env


def register(app: Flask) -> None:
    for command in (
        db,
        notifications,
        payments,
        anomalies,
        replay,
        sweep,
        reconcile,
        prune,
        run,
        sandbox,
    ):
        app.cli.add_command(command)
    app.cli.add_command(_endpoints_group())
    app.cli.add_command(_events_group())
    app.cli.add_command(_operators_group())


def _operators_group() -> click.Command:
    from ipn.console.cli import operators

    return operators


def _events_group() -> click.Command:
    from ipn.events.cli import events

    return events


def _endpoints_group() -> click.Command:
    # Imported here: ipn.events.cli builds on this module's helpers.
    from ipn.events.cli import endpoints

    return endpoints


def services() -> Services:
    value: Services = current_app.extensions["ipn"]
    return value


def send(notification_id: int) -> None:
    enqueue(current_app.extensions["celery"], notification_id)


def parse_time_option(
    _ctx: click.Context, param: click.Parameter, value: str | None
) -> datetime | None:
    if value is None:
        return None
    try:
        return serialize.parse_time(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param=param) from None


provider_option = click.option("--provider", type=click.Choice(PROVIDERS), help="Only this one.")
account_option = click.option("--account", help="Only this merchant account (IPN_ACCOUNTS_FILE).")
since_option = click.option(
    "--since",
    callback=parse_time_option,
    help="Received at or after (ISO 8601, or an age: 30m, 6h, 2d).",
)
until_option = click.option(
    "--until", callback=parse_time_option, help="Received before (ISO 8601, or an age)."
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the API's JSON objects, one a line."
)
notification_status = click.Choice([s.value for s in NotificationStatus])


# --- database -------------------------------------------------------------------------------

db = AppGroup("db", help="Database schema.")


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply pending migrations."""
    from ipn import migrate

    migrate.upgrade(services().db)
    click.echo("database is up to date")


# --- notifications --------------------------------------------------------------------------

notifications = AppGroup("notifications", help="The inbox of received callbacks.")


@notifications.command("list")
@provider_option
@account_option
@click.option("--status", type=notification_status)
@since_option
@until_option
@json_option
def notifications_list(
    provider: str | None,
    account: str | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    as_json: bool,
) -> None:
    """Every matching notification, oldest first."""
    which = replays.ReplayFilter(
        provider,
        NotificationStatus(status) if status else None,
        since,
        until,
        _account(account, provider),
    )
    rows = _keyset(which.apply(select(Notification)), Notification.id)
    # The account column only where there is more than one account to tell apart.
    account_column = [("account", 12)] if services().settings.accounts else []
    _print(
        rows,
        serialize.notification,
        as_json,
        [
            ("id", 6),
            ("provider", 16),
            *account_column,
            ("kind", 12),
            ("status", 9),
            ("received_at", 27),
            ("attempts", 8),
            ("payment_id", 31),
            ("outcome", 0),
        ],
        extra=lambda item: {
            "outcome": item["last_error"]
            if item["status"] in ("rejected", "failed", "dead")
            else item["outcome"]
        },
    )


@notifications.command("show")
@click.argument("notification_id", type=int)
@json_option
def notifications_show(notification_id: int, as_json: bool) -> None:
    """One notification with its headers (secrets masked), body and replays."""
    with services().db.sessions() as session:
        row = session.get(Notification, notification_id)
        if row is None:
            raise click.ClickException(f"no notification {notification_id}")
        detail = serialize.notification_detail(session, row)
        pruned_at = row.pruned_at
    if as_json:
        click.echo(serialize.dumps(detail))
        return
    for key in (
        "id",
        "provider",
        "account",
        "kind",
        "status",
        "received_at",
        "processed_at",
        "attempts",
        "remote_addr",
        "payment_id",
        "verified_by",
        "outcome",
        "last_error",
        "body_sha256",
    ):
        click.echo(f"{key:>13}: {detail[key] if detail[key] is not None else '-'}")
    click.echo("      headers:")
    for name, value in detail["headers"].items():
        click.echo(f"               {name}: {value}")
    if pruned_at is not None:
        click.echo(f"         body: pruned on {serialize.when(pruned_at)} (retention)")
    else:
        click.echo(f"         body: ({detail['body_encoding']}) {detail['body']}")
    if detail["traceback"]:
        click.echo("    traceback:")
        for line in detail["traceback"].rstrip("\n").splitlines():
            click.echo(f"               {line}")
    for r in detail["replays"]:
        click.echo(
            f"       replay: {r['at']} {r['mode']} by {r['requested_by']} "
            f"(was {r['previous_status']})"
        )


# --- payments -------------------------------------------------------------------------------

payments = AppGroup("payments", help="Payments and their timelines.")


@payments.command("create")
@click.option("--provider", type=click.Choice(PROVIDERS), required=True)
@click.option(
    "--order-id", required=True, help="The merchant's reference, unique per provider account."
)
@click.option("--amount", required=True, help="Exact decimal, e.g. 10.00.")
@click.option("--currency", required=True, help="What the amount is in, e.g. EUR.")
@click.option("--pay-currency", help="The coin the customer pays in, where the provider asks.")
@click.option("--description")
@click.option("--customer-email")
@click.option("--notify-url", help="Where this payment's own events go, beside the endpoints.")
@click.option("--account", default="default", show_default=True, help="The merchant account.")
@json_option
def payments_create(
    provider: str,
    order_id: str,
    amount: str,
    currency: str,
    pay_currency: str | None,
    description: str | None,
    customer_email: str | None,
    notify_url: str | None,
    account: str,
    as_json: bool,
) -> None:
    """Create a payment at a provider and record it."""
    from ipn import payments as creating
    from ipn.errors import InvalidPaymentRequest, ProviderError

    fields = {
        "provider": provider,
        "order_id": order_id,
        "amount": amount,
        "currency": currency,
        "pay_currency": pay_currency,
        "description": description,
        "customer_email": customer_email,
        "notify_url": notify_url,
        "account": account,
    }
    try:
        request = creating.parse_create_request(fields, services().providers)
        payment, _ = creating.create_payment(services(), request)
    except InvalidPaymentRequest as exc:
        raise click.BadParameter(
            exc.message, param_hint=f"--{exc.field.replace('_', '-')}"
        ) from None
    except creating.DuplicateOrder as exc:
        raise click.ClickException(str(exc)) from None
    except ProviderError as exc:
        raise click.ClickException(f"the provider did not create the payment: {exc}") from None
    detail = serialize.payment(payment)
    if as_json:
        click.echo(serialize.dumps(detail))
        return
    where = provider if account == "default" else f"{provider} (account {account})"
    click.echo(
        f"created {payment.id} at {where}: pay {detail['pay_amount'] or '?'} "
        f"{detail['pay_currency'] or ''} to {payment.pay_address or payment.pay_url or '-'}"
        f" before {detail['expires_at'] or '-'}"
    )


@payments.command("show")
@click.argument("reference")
@json_option
def payments_show(reference: str, as_json: bool) -> None:
    """A payment by our id or the merchant's order id, with its timeline and anomalies."""
    with services().db.sessions() as session:
        payment = _payment_by_reference(session, reference)
        detail = serialize.payment_detail(session, payment)
    if as_json:
        click.echo(serialize.dumps(detail))
        return
    for key in (
        "id",
        "provider",
        "account",
        "order_id",
        "provider_payment_id",
        "status",
        "provider_status",
        "amount",
        "currency",
        "pay_amount",
        "pay_currency",
        "paid_amount",
        "pay_address",
        "expires_at",
        "created_at",
        "updated_at",
    ):
        click.echo(f"{key:>19}: {detail[key] if detail[key] is not None else '-'}")
    click.echo("timeline:")
    for e in detail["timeline"]:
        move = f"{e['from_status'] or '-'} -> {e['to_status']}"
        click.echo(f"  {e['at']}  {e['source']:<9} {move:<24} {e['detail']}")
    if detail["anomalies"]:
        click.echo("anomalies:")
        for a in detail["anomalies"]:
            click.echo(f"  #{a['id']} {a['kind']} ({a['status']}): {anomaly_detail(a)}")
    if detail["events"]:
        click.echo("merchant events:")
        for e in detail["events"]:
            where = (
                ", ".join(f"{d['endpoint_id']} {d['status']}" for d in e["deliveries"])
                or "no endpoint hears it"
            )
            click.echo(f"  {e['created_at']}  {e['sequence']:>3} {e['type']:<18} {where}")


# --- anomalies ------------------------------------------------------------------------------

anomalies = AppGroup("anomalies", help="What needs a human.")


@anomalies.command("list")
@click.option(
    "--status", type=click.Choice(["open", "resolved", "all"]), default="open", show_default=True
)
@json_option
def anomalies_list(status: str, as_json: bool) -> None:
    """Every anomaly with that status, oldest first."""
    query = select(Anomaly)
    if status != "all":
        query = query.where(Anomaly.status == AnomalyStatus(status))
    _print(
        _keyset(query, Anomaly.id),
        serialize.anomaly,
        as_json,
        [
            ("id", 6),
            ("kind", 18),
            ("status", 9),
            ("payment_id", 31),
            ("created_at", 27),
            ("detail", 0),
        ],
        extra=lambda item: {"detail": anomaly_detail(item)},
    )


@anomalies.command("resolve")
@click.argument("anomaly_id", type=int)
@click.option("--resolution", required=True, help="What was done about it.")
def anomalies_resolve(anomaly_id: int, resolution: str) -> None:
    """Close an anomaly, saying what was done."""
    if not resolution.strip():
        raise click.BadParameter("say what was done", param_hint="--resolution")
    try:
        with services().db.transaction() as session:
            resolve_anomaly(session, anomaly_id, resolution.strip(), by="cli")
    except (LookupError, ValueError) as exc:
        raise click.ClickException(str(exc).strip("'")) from None
    click.echo(f"anomaly {anomaly_id} resolved")


# --- replay and sweep -----------------------------------------------------------------------


@click.command("replay")
@with_appcontext
@click.argument("ids", nargs=-1, type=int)
@provider_option
@account_option
@click.option("--status", type=notification_status)
@since_option
@until_option
@click.option("--refetch", is_flag=True, help="Ask the provider afresh, whatever was stored.")
@click.option("--dry-run", is_flag=True, help="Only list what would be replayed.")
@json_option
def replay(
    ids: Sequence[int],
    provider: str | None,
    account: str | None,
    status: str | None,
    since: datetime | None,
    until: datetime | None,
    refetch: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Run notifications through the same path again: by ids, or by filters (combined with AND).
    Safe: a notification already applied changes nothing the second time."""
    which = replays.ReplayFilter(
        provider,
        NotificationStatus(status) if status else None,
        since,
        until,
        _account(account, provider),
    )
    if ids and which:
        raise click.UsageError("give ids or filters, not both")
    if not ids and not which:
        raise click.UsageError(
            "give notification ids, or at least one of --provider, --account, --status, "
            "--since, --until"
        )
    if ids:
        missing = sorted(set(ids) - replays.existing(services(), ids))
        if missing:
            raise click.ClickException(f"no notification {', '.join(map(str, missing))}")
        if gone := replays.pruned(services(), ids):
            raise click.ClickException(replays.pruned_message(gone))
        chosen = list(dict.fromkeys(ids))
    else:
        chosen = list(replays.matching_ids(services(), which))
    mode = ReplayMode.REFETCH if refetch else ReplayMode.STORED
    if not dry_run:
        replays.replay(services(), chosen, mode, send, requested_by="cli")
    if as_json:
        click.echo(
            serialize.dumps(
                {"count": len(chosen), "ids": chosen, "mode": mode.value, "dry_run": dry_run}
            )
        )
        return
    verb = "would replay" if dry_run else "replayed"
    for notification_id in chosen:
        click.echo(f"{verb} {notification_id}")
    click.echo(f"{verb} {len(chosen)} notification{'s' if len(chosen) != 1 else ''} ({mode})")


@click.command("sweep")
@with_appcontext
def sweep() -> None:
    """Enqueue again inbox rows stuck in `received`; mark those out of attempts `dead`."""
    from ipn.sweeper import sweep_inbox

    click.echo(f"inbox sweep: {sweep_inbox(services(), send)}")


@click.command("reconcile")
@with_appcontext
@provider_option
@click.option("--payment", "payment_ref", help="Ask about this payment now (id or order id).")
def reconcile(provider: str | None, payment_ref: str | None) -> None:
    """One reconciliation pass now: ask providers about due payments and settle expiries.
    Prints a line for each payment that changed or failed, then the totals; a failure on one
    payment does not stop the pass, and the exit status says only whether the pass could run."""
    from sqlalchemy.exc import SQLAlchemyError

    from ipn import reconcile as passes

    try:
        if payment_ref:
            with services().db.sessions() as session:
                payment = _payment_by_reference(session, payment_ref)
            check = passes.check_payment(services(), payment.id, force=True)
            click.echo(f"{payment.id}: {check.outcome}: {check.message}")
            return
        now = utcnow()
        due = passes.count_due(services(), now, provider)

        def report(check: passes.Check) -> None:
            if check.outcome in ("changed", "expired", "failed"):
                click.echo(f"{check.payment_id}: {check.outcome}: {check.message}")

        if sys.stdout.isatty() and due:
            with click.progressbar(length=due, label="reconciling", file=sys.stderr) as bar:

                def step(check: passes.Check) -> None:
                    bar.update(1)
                    report(check)

                totals = passes.reconcile_due(services(), now=now, provider=provider, on_check=step)
        else:
            totals = passes.reconcile_due(services(), now=now, provider=provider, on_check=report)
    except SQLAlchemyError as exc:
        raise click.ClickException(
            f"the reconciliation pass could not run: {passes.describe_error(exc)}"
        ) from None
    click.echo(f"reconciliation: {totals}")


@click.command("prune")
@with_appcontext
@click.option("--dry-run", is_flag=True, help="Only count what would be removed.")
@click.option(
    "--batch",
    type=click.IntRange(1, 10000),
    default=1000,
    show_default=True,
    help="Rows per transaction.",
)
@json_option
def prune(dry_run: bool, batch: int, as_json: bool) -> None:
    """Remove what retention allows: bodies and headers of notifications settled more than
    IPN_RETENTION_DAYS ago (rejected, failed, dead: IPN_RETENTION_FAILED_DAYS), descriptions of
    payments final that long, old shop answers. Rows stay; nothing an open payment, an open
    anomaly or an undelivered event needs is touched."""
    from sqlalchemy.exc import SQLAlchemyError

    from ipn import retention
    from ipn.reconcile import describe_error

    settings = services().settings
    try:
        report = retention.prune(services(), dry_run=dry_run, batch=batch)
    except SQLAlchemyError as exc:
        raise click.ClickException(f"the prune could not run: {describe_error(exc)}") from None
    if as_json:
        click.echo(
            serialize.dumps(
                {
                    "dry_run": dry_run,
                    "retention_days": settings.retention_days,
                    "retention_failed_days": settings.retention_failed_days,
                    **{
                        part: {"rows": removed.rows, "bytes": removed.bytes}
                        for part, removed in (
                            ("notifications", report.notifications),
                            ("payments", report.payments),
                            ("answers", report.answers),
                        )
                    },
                }
            )
        )
        return
    click.echo(
        f"retention {settings.retention_days} days"
        f" ({settings.retention_failed_days} for rejected, failed and dead): {report}"
    )


@click.group("sandbox", invoke_without_command=True)
@with_appcontext
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.pass_context
def sandbox(ctx: click.Context, host: str, port: int) -> None:
    """A local fake of the four providers' APIs that sends signed callbacks to this service.

    Without a subcommand it serves; `ipn sandbox env` prints the settings of the `ipn run
    --sandbox` running here."""
    if ctx.invoked_subcommand is not None:
        return
    from ipn.sandbox import serve

    # A development server: where it listens and each call it answers are its output.
    for name in ("werkzeug", "ipn.sandbox"):
        logging.getLogger(name).setLevel(logging.INFO)

    serve(host=host, port=port, settings=services().settings)


@sandbox.command("env")
def sandbox_env() -> None:
    """The running sandbox's settings as shell exports: `eval "$(ipn sandbox env)"`."""
    from ipn.sandbox import profile

    data_dir = services().settings.data_dir
    values = profile.read(data_dir)
    if values is None:
        raise click.ClickException(
            f"no `ipn run --sandbox` is running on {data_dir.resolve()}; start one first"
        )
    click.echo(profile.shell_exports(values), nl=False)


@click.command("run")
@with_appcontext
@click.option("--port", type=click.IntRange(1, 65535), help="Default: $PORT or 8000.")
@click.option(
    "--host",
    help="Where to listen. Default: 127.0.0.1 with --sandbox, else every interface (0.0.0.0).",
)
@click.option(
    "--sandbox",
    is_flag=True,
    help="Also start the provider sandbox (on port + 1) and point every provider at it.",
)
def run(port: int | None, host: str | None, sandbox: bool) -> None:
    """Web, worker and scheduler together (the embedded default needs no other server)."""
    from ipn.runner import run_all

    sys.exit(run_all(services().settings, port=port, host=host, sandbox=sandbox))


# --- helpers --------------------------------------------------------------------------------


def anomaly_detail(anomaly: dict[str, Any]) -> str:
    """What the anomaly says in words; its evidence spelled out where it carries no sentence."""
    evidence = anomaly.get("evidence") or {}
    if not isinstance(evidence, dict):
        return str(evidence)
    detail = evidence.get("detail")
    if isinstance(detail, str) and detail.strip():
        return detail.strip()
    facts = [f"{key} {value}" for key, value in evidence.items() if value not in (None, "", [], {})]
    return "; ".join(facts) or str(anomaly.get("kind", "")).replace("_", " ")


def _payment_by_reference(session: Session, reference: str) -> Payment:
    """Our payment id, or the merchant's order id when it names one payment only."""
    payment = session.get(Payment, reference)
    if payment is not None:
        return payment
    found = session.scalars(select(Payment).where(Payment.order_id == reference)).all()
    if len(found) > 1:
        names = ", ".join(
            f"{p.provider}{'' if p.account == 'default' else f' account {p.account}'} ({p.id})"
            for p in found
        )
        raise click.ClickException(
            f"order id {reference!r} is used at {names}: give the payment id"
        )
    if not found:
        raise click.ClickException(f"no payment with id or order id {reference!r}")
    return found[0]


def _account(account: str | None, provider: str | None) -> str | None:
    """A configured account's name (of `provider`, if given), or a usage error listing them."""
    if account is None:
        return None
    names = services().settings.names_of_accounts(provider)
    if account not in names:
        raise click.BadParameter(
            f"{account!r} is not an account{f' of {provider}' if provider else ''}; "
            f"configured: {', '.join(names)}",
            param_hint="--account",
        )
    return account


def _keyset(query: Any, key: Any) -> Iterable[Any]:
    """Every matching row, a page at a time, so a long list never sits in memory at once."""
    return services().db.keyset(query, key, PAGE)


def _print(
    rows: Iterable[Any],
    shape: Any,
    as_json: bool,
    columns: list[tuple[str, int]],
    extra: Any = None,
) -> None:
    count = 0
    if not as_json:
        click.echo("  ".join(name.ljust(width) if width else name for name, width in columns))
    for row in rows:
        item = shape(row)
        count += 1
        if as_json:
            click.echo(serialize.dumps(item))
            continue
        if extra:
            item = {**item, **extra(item)}
        cells = []
        for name, width in columns:
            value = item.get(name)
            text = "-" if value is None or value == "" else str(value)
            cells.append(text.ljust(width) if width else text)
        click.echo("  ".join(cells))
    if not as_json:
        click.echo(f"({count} shown)")


if __name__ == "__main__":
    main()
