"""The `ipn` command and the process entry points as a new user meets them: one line for bad
configuration, `-e FILE`, `--version`, command output free of log lines, and errors that say
what to set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from flask import Flask

from ipn import create_app
from ipn.cli import anomaly_detail
from ipn.config import Settings

ROOT = Path(__file__).resolve().parent.parent
IPN = str(Path(sys.executable).with_name("ipn"))


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any of this project's variables, plus `extra`."""
    prefixes = ("IPN_", "CUBEPAY_", "BITCOINPAYGATE_", "COINBARPAY_", "CRYPTOPROCESSING_")
    kept = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(prefixes) and name not in ("DATABASE_URL", "REDIS_URL", "PORT")
    }
    return {**kept, **extra}


@pytest.mark.parametrize(
    ("argv", "variable", "value"),
    [
        pytest.param(
            [sys.executable, "-m", "gunicorn", "wsgi:app", "--bind", "127.0.0.1:0"],
            "IPN_MAX_BODY_BYTES",
            "abc",
            id="web",
        ),
        pytest.param(
            [sys.executable, "-m", "celery", "-A", "workers.main", "worker"],
            "REDIS_URL",
            "http://nope",
            id="worker",
        ),
        pytest.param(
            [sys.executable, "-m", "celery", "-A", "workers.main", "beat"],
            "CUBEPAY_API_URL",
            "ftp://x",
            id="beat",
        ),
        pytest.param([IPN, "notifications", "list"], "IPN_MAX_BODY_BYTES", "abc", id="ipn"),
        pytest.param([IPN, "run"], "IPN_HTTP_READ_TIMEOUT", "soon", id="ipn-run"),
    ],
)
def test_bad_configuration_stops_every_process_with_one_line_naming_it(
    argv: list[str], variable: str, value: str, tmp_path: Path
) -> None:
    env = clean_env(IPN_DATA_DIR=str(tmp_path), **{variable: value})
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert variable in lines[0]
    assert done.stdout == ""


def test_version() -> None:
    done = subprocess.run([IPN, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    assert done.stdout.startswith("ipn, version ")


def test_env_file_is_loaded_and_commands_print_no_log_lines(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env_file = tmp_path / "ipn.env"
    env_file.write_text(f"IPN_DATA_DIR={data}\n")
    done = subprocess.run(
        [IPN, "-e", str(env_file), "db", "upgrade"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert (data / "ipn.sqlite").is_file()
    # Alembic's INFO lines stay out of the output, and out of the terminal by default.
    assert done.stdout == "database is up to date\n"
    assert "INFO" not in done.stderr

    bad = tmp_path / "bad.env"
    bad.write_text("IPN_MAX_BODY_BYTES=abc\n")
    refused = subprocess.run(
        [IPN, "-e", str(bad), "notifications", "list"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0
    assert refused.stderr.splitlines() == [
        "ipn: configuration error: IPN_MAX_BODY_BYTES must be a whole number, not 'abc'"
    ]


def test_creating_at_an_unconfigured_provider_names_what_to_set(settings: Settings) -> None:
    bare = settings.with_changes(cubepay=type(settings.cubepay)(api_url="http://provider.test"))
    app: Flask = create_app(bare)
    try:
        result = app.test_cli_runner().invoke(
            args=[
                "payments",
                "create",
                "--provider",
                "cubepay",
                "--order-id",
                "A2",
                "--amount",
                "10.00",
                "--currency",
                "USD",
                "--pay-currency",
                "BTC",
            ]
        )
    finally:
        app.extensions["ipn"].db.engine.dispose()
    assert result.exit_code != 0
    assert "CUBEPAY_CLIENT_ID and CUBEPAY_CLIENT_SECRET" in result.output


def test_anomaly_detail_is_its_sentence_or_its_evidence() -> None:
    said = {"kind": "amount_mismatch", "evidence": {"detail": "paid 0.1 of 0.2 BTC", "x": 1}}
    assert anomaly_detail(said) == "paid 0.1 of 0.2 BTC"
    bare = {"kind": "unknown_status", "evidence": {"provider_status": "7", "note": None}}
    assert anomaly_detail(bare) == "provider_status 7"
    assert anomaly_detail({"kind": "late_payment", "evidence": {}}) == "late payment"


def test_a_command_before_any_migration_says_what_to_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [IPN, "payments", "show", "A1"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "Error: the database has no tables yet: run `ipn db upgrade`"
    ]
