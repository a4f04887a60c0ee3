"""`ipn operators add|list|disable`: the console's accounts, from the command line only."""

from __future__ import annotations

import sys

import click
from flask.cli import AppGroup

from ipn import serialize
from ipn.cli import services
from ipn.console import accounts

operators = AppGroup("operators", help="Accounts that may sign in to the console.")


@operators.command("add")
@click.argument("name")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of stdin instead of prompting twice.",
)
def operators_add(name: str, password_stdin: bool) -> None:
    """Create an account; the password is hashed with Argon2id and never stored as typed."""
    try:
        accounts.check_name(name)
    except accounts.AccountError as exc:
        raise click.BadParameter(str(exc).removeprefix("name: "), param_hint="NAME") from None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        accounts.add_operator(services(), name, password)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"operator {name} added")


@operators.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
def operators_list(as_json: bool) -> None:
    """Every account, enabled or not."""
    for operator in accounts.list_operators(services()):
        item = {
            "name": operator.name,
            "created_at": serialize.when(operator.created_at),
            "disabled_at": serialize.when(operator.disabled_at),
        }
        if as_json:
            click.echo(serialize.dumps(item))
        else:
            state = f"disabled {item['disabled_at']}" if operator.disabled_at else "enabled"
            click.echo(f"{operator.name:<24} {state:<36} created {item['created_at']}")


@operators.command("disable")
@click.argument("name")
def operators_disable(name: str) -> None:
    """Stop an account signing in; its sessions end at their next page."""
    try:
        accounts.disable_operator(services(), name)
    except accounts.AccountError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"operator {name} disabled")
