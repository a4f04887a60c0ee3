"""A durable webhook/IPN receiver and reconciliation worker for crypto payment providers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from ipn.config import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the web application; settings come from the environment unless given."""
    from ipn.app import create_app as build

    return build(settings)
