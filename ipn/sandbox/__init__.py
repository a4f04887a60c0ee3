"""A local fake of the four providers' APIs that sends their real, signed callbacks to the receiver.

Payments live in memory; the control API under `/sandbox/` moves them through each provider's own
statuses (`pay`, `underpay`, `overpay`, `confirm`, `pay-late`, `expire`, `refund`, `cancel`) and
posts the callback the provider would post, and `/sandbox/faults` makes the next API calls of a
provider time out or fail. Run it with `ipn sandbox`, or `create_app()` in tests.
"""

from __future__ import annotations

from ipn.sandbox.app import create_app, serve
from ipn.sandbox.credentials import SANDBOX_CREDENTIALS, sandbox_environment

__all__ = ["SANDBOX_CREDENTIALS", "create_app", "sandbox_environment", "serve"]
