"""A durable webhook/IPN receiver and reconciliation worker for crypto payment providers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipn import metric_files

# Before anything imports prometheus-client, which reads the directory's variable only then.
metric_files.configure()

if TYPE_CHECKING:
    from flask import Flask

    from ipn.config import Settings


def create_app(settings: Settings | None = None) -> Flask:
    """Build the web application; settings come from the environment unless given."""
    from ipn.app import create_app as build

    return build(settings)
