"""Posting a provider's callback to the receiver, once, and keeping what it answered."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

import requests

from ipn.sandbox.state import BODY_LIMIT, Delivery, FakePayment, Ledger, OutgoingCallback

log = logging.getLogger(__name__)


class Courier:
    """Sends callbacks with requests and records each attempt on its payment."""

    def __init__(
        self,
        ledger: Ledger,
        clock: Callable[[], datetime],
        timeout: float = 5.0,
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.timeout = timeout

    def send(
        self, payment: FakePayment, callback: OutgoingCallback, *, resend: bool = False
    ) -> Delivery:
        """Post now and wait for the answer; never raises for a receiver that misbehaves.

        Called without the ledger's lock held: a receiver that asks the sandbox about the payment
        while it handles the callback must not deadlock.
        """
        delivery = Delivery(
            kind=callback.kind,
            url=callback.url,
            at=self.clock(),
            body=callback.body,
            headers=callback.headers,
            resend=resend,
        )
        try:
            # No shared session: deliveries run on many threads at once.
            response = requests.post(
                callback.url,
                data=callback.body,
                headers=dict(callback.headers),
                timeout=(min(self.timeout, 3.05), self.timeout),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            delivery.error = f"{type(exc).__name__}: {exc}"[:BODY_LIMIT]
        else:
            delivery.status_code = response.status_code
            delivery.answer = response.content[:BODY_LIMIT].decode("utf-8", "replace")
        log.info(
            "%s %s -> %s %s",
            payment.provider,
            callback.kind,
            callback.url,
            delivery.status_code or delivery.error,
        )
        with self.ledger.lock:
            payment.deliveries.append(delivery)
        return delivery

    def send_later(self, payment: FakePayment, callback: OutgoingCallback) -> None:
        """Post from a thread of its own, as a provider does for a resend it has only scheduled."""
        threading.Thread(
            target=self.send,
            args=(payment, callback),
            kwargs={"resend": True},
            name=f"sandbox-{payment.provider}-resend",
            daemon=True,
        ).start()
