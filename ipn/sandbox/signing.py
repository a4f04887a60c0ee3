"""The four providers' signing schemes, written from their protocol files, not the receiver."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping


def cubepay_sign(fields: Mapping[str, str] | Iterable[tuple[str, str]], client_secret: str) -> str:
    """CubePay `sign`: SHA-256 of the fields sorted by name as raw `k=v&...`, then the secret.

    `sign` itself is never part of the string; empty fields are, when they are sent.
    """
    pairs = fields.items() if isinstance(fields, Mapping) else fields
    kept = sorted((key, value) for key, value in pairs if key != "sign")
    text = "&".join(f"{key}={value}" for key, value in kept)
    text = f"{text}&client_secret={client_secret}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest().upper()


def bitcoinpaygate_signature(body: bytes, hmac_key: str) -> str:
    """BitcoinPaygate `X-BPG-Signature`: lowercase hex HMAC-SHA1 of the raw body."""
    return hmac.new(hmac_key.encode("utf-8"), body, hashlib.sha1).hexdigest()


def coinbarpay_signature(body: bytes, secret_key: str) -> str:
    """CoinbarPay `SIGNATURE`: lowercase hex HMAC-SHA256 of the raw body (`{}` for a bare GET)."""
    return hmac.new(secret_key.encode("utf-8"), body, hashlib.sha256).hexdigest()


def cryptoprocessing_signature(body: bytes, secret: str) -> str:
    """CryptoProcessing `X-Processing-Signature`: lowercase hex HMAC-SHA512 of the raw body."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha512).hexdigest()


def same(given: str | None, expected: str, *, ignore_case: bool = False) -> bool:
    """Compare a presented secret or signature without leaking where it differs."""
    if given is None:
        return False
    if ignore_case:
        given, expected = given.lower(), expected.lower()
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))
