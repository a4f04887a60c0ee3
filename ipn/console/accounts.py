"""Operator accounts and the console's sign-in check: Argon2 hashes, the operator token compared
in constant time, one refusal that never says which part was wrong."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ipn.services import Services
from models import Operator, utcnow

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_PASSWORD = 10
REFUSED = "Sign-in refused: check what you typed and try again."

_hasher = PasswordHasher()
# Verified against when the name is unknown, so an unknown name costs as long as a wrong password.
_UNKNOWN = _hasher.hash("an account that does not exist")


class AccountError(ValueError):
    """A bad name or password for a new account, an existing name, an unknown one."""


@dataclass(frozen=True)
class Who:
    """Who is signed in: an account's name, or None for the operator token."""

    name: str | None

    @property
    def actor(self) -> str:
        """How the actions of this session are recorded (`console:alice`, `console:token`)."""
        return f"console:{self.name or 'token'}"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise AccountError(
            "name: 1 to 64 letters, digits, dots, dashes or underscores, starting with a"
            " letter or digit"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"password: at least {MIN_PASSWORD} characters")
    return password


def add_operator(services: Services, name: str, password: str) -> Operator:
    check_name(name)
    check_password(password)
    try:
        with services.db.transaction() as session:
            operator = Operator(
                name=name, password_hash=_hasher.hash(password), created_at=utcnow()
            )
            session.add(operator)
            session.flush()
            session.expunge(operator)
            return operator
    except IntegrityError:
        raise AccountError(f"an operator named {name!r} exists already") from None


def list_operators(services: Services) -> list[Operator]:
    with services.db.sessions() as session:
        return list(session.scalars(select(Operator).order_by(Operator.name)))


def disable_operator(services: Services, name: str) -> Operator:
    with services.db.transaction() as session:
        operator = session.scalar(select(Operator).where(Operator.name == name))
        if operator is None:
            raise AccountError(f"no operator named {name!r}")
        if operator.disabled_at is None:
            operator.disabled_at = utcnow()
        session.flush()
        session.expunge(operator)
        return operator


def active(services: Services, name: str) -> bool:
    with services.db.sessions() as session:
        operator = session.scalar(select(Operator).where(Operator.name == name))
        return operator is not None and operator.disabled_at is None


def sign_in(services: Services, *, token: str, username: str, password: str) -> Who | None:
    """Who these credentials name, or None. A token is tried when one is given, else the
    account; the answer is the same None whichever part was wrong."""
    if token:
        expected = services.settings.api_token
        # Constant time whatever is given; without IPN_API_TOKEN no token signs in.
        matched = hmac.compare_digest(token.encode(), (expected or "\x00" + token).encode())
        return Who(None) if matched and expected else None
    if not username or not password:
        return None
    with services.db.sessions() as session:
        operator = session.scalar(select(Operator).where(Operator.name == username))
    stored = operator.password_hash if operator is not None else _UNKNOWN
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if operator is None or operator.disabled_at is not None:
        return None
    return Who(operator.name)
