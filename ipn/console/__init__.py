"""The operator console under /console: server-rendered pages over the same plain functions as the
API and the CLI, behind a signed session cookie, with a CSRF token on every form."""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path

from flask import Flask, Request
from flask.sessions import SecureCookieSessionInterface
from flask_wtf.csrf import CSRFProtect

from ipn.config import Settings

KEY_FILENAME = "ipn-secret-key"
SESSION_LIFETIME = timedelta(hours=8)

csrf = CSRFProtect()


class ConsoleSessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, marked Secure whenever the request came over HTTPS (directly or,
    with IPN_TRUSTED_PROXIES, through a proxy that says so)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        from flask import request

        secure = super().get_cookie_secure(app)
        return secure or (isinstance(request, Request) and request.is_secure)


def local_secret_key(data_dir: Path) -> str:
    """The session key of the embedded default: made once, kept beside the data, readable by its
    owner only, so every process of `ipn run` signs with the same key and sessions survive a
    restart. Created with O_EXCL via a link, so two processes starting at once agree."""
    target = data_dir / KEY_FILENAME
    try:
        return target.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    temporary = data_dir / f".{KEY_FILENAME}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(secrets.token_urlsafe(48) + "\n")
    try:
        os.link(temporary, target)
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    return target.read_text().strip()


def session_key(settings: Settings) -> str:
    if settings.secret_key:
        return settings.secret_key
    if settings.database_url in ("sqlite://", "sqlite:///:memory:"):
        # An in-memory database lives as long as the process: so may its sessions.
        return secrets.token_urlsafe(48)
    return local_secret_key(settings.data_dir)


def init_app(app: Flask, settings: Settings) -> None:
    """Mount the console; Settings.check has already refused a missing key where one is needed."""
    from ipn.console import views

    app.secret_key = session_key(settings)
    app.session_interface = ConsoleSessionInterface()
    app.config.update(
        SESSION_COOKIE_NAME="ipn_console",
        SESSION_COOKIE_PATH="/console",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=SESSION_LIFETIME,
        # Checked by the console's own before_request only: the callbacks and the JSON API
        # are not browser forms and must take POSTs without a token.
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_TIME_LIMIT=None,
    )
    csrf.init_app(app)
    app.register_blueprint(views.bp)
