"""Test helpers: payments as our API would have recorded them, and providers' answers and
callbacks built the way each provider's file describes."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import responses
from sqlalchemy import func, select

from ipn.db import Database
from models import Anomaly, Notification, Payment, PaymentEvent, PaymentStatus

PROVIDER_URL = "http://provider.test"
# The moment the clock fixture holds, and the provider endpoints the status queries reach.
START = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
# Where provider calls leave the process: mocks stand in for the keep-alive adapter's send.
PROVIDER_SEND = "ipn.providers.transport.KeepAliveAdapter.send"
CUBEPAY_QUERY = f"{PROVIDER_URL}/cubepay/payment/query"
BPG_ID = "95bf1d853cf2e040f0ce219221f9b17206525941"
BPG_STATUS = f"{PROVIDER_URL}/bitcoinpaygate/v2/payments/{BPG_ID}"
COINBAR_STATUS = f"{PROVIDER_URL}/coinbarpay/coinbar/api/v2/pay/gateway/payment/order-1001/status"

# The example IPN of cubepay.md, byte for byte, signed with exampleclientsecret.
CUBEPAY_IPN = (
    b"client_id=exampleclientid&source_coin_id=443&source_amount=500&item_name=Test+item+name"
    b"&merchant_transaction_id=M12345678&other=tok_5f2b9c&send_coin_id=&send_amount="
    b"&receive_address=&sign=5E25AFAFB5C31B384697A601A853D55032692BE33BA541FEDE567DF53E69ACC0"
)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}


def make_payment(db: Database, **fields: Any) -> Payment:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "provider": "cubepay",
        "order_id": "M12345678",
        "status": PaymentStatus.PENDING,
        "amount": Decimal("500"),
        "currency": "TWD",
        "created_at": now,
        "updated_at": now,
    }
    values.update(fields)
    payment = Payment(**values)
    with db.transaction() as session:
        session.add(payment)
    return payment


def bitcoinpaygate_payment(db: Database, **fields: Any) -> Payment:
    """The BitcoinPaygate payment of the provider file's test vectors, as we would hold it."""
    values: dict[str, Any] = {
        "provider": "bitcoinpaygate",
        "order_id": "2015-03-10/123/1",
        "provider_payment_id": BPG_ID,
        "amount": Decimal("10.00"),
        "currency": "USD",
        **fields,
    }
    return make_payment(db, **values)


def load_payment(db: Database, payment_id: str) -> Payment:
    with db.sessions() as session:
        payment = session.get(Payment, payment_id)
        assert payment is not None
        return payment


def events(db: Database, payment_id: str) -> list[PaymentEvent]:
    with db.sessions() as session:
        return list(
            session.scalars(
                select(PaymentEvent)
                .where(PaymentEvent.payment_id == payment_id)
                .order_by(PaymentEvent.id)
            )
        )


def anomalies(db: Database) -> list[Anomaly]:
    with db.sessions() as session:
        return list(session.scalars(select(Anomaly).order_by(Anomaly.id)))


def notification(db: Database, notification_id: int) -> Notification:
    with db.sessions() as session:
        row = session.get(Notification, notification_id)
        assert row is not None
        return row


def count(db: Database, model: Any) -> int:
    with db.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def cubepay_query_answer(
    status: int,
    *,
    paid: str = "0.01",
    amount: str = "0.01",
    order_id: str = "M12345678",
    payment_id: str = "C1536678153791231775",
    source_amount: str = "500",
) -> bytes:
    record = {
        "id": payment_id,
        "status": status,
        "status_message": "whatever",
        "pay_url": f"https://pay.example/{payment_id}",
        "pay_info": {
            "coin": {"id": 2, "symbol": "BTC", "name": "Bitcoin"},
            "address": "bc1qexampleaddress",
            "amount": Decimal(amount),
            "paid_amount": Decimal(paid),
            "merchant_transaction_id": order_id,
            "item_name": "Test item name",
            "source_coin": {"id": 443, "symbol": "TWD"},
            "source_amount": Decimal(source_amount),
        },
    }
    return (
        json.dumps({"status": 200, "data": [record]}, default=str)
        .replace('"' + amount + '"', amount)
        .encode()
    )


def bpg_snapshot(
    status: str,
    *,
    current_time: str = "2018-01-12T15:16:32Z",
    payment_id: str = "95bf1d853cf2e040f0ce219221f9b17206525941",
    order_id: str = "2015-03-10/123/1",
    amount: str = "10.00",
) -> bytes:
    return (
        '{"paymentId":"%s","amount":%s,"amountBtc":1.00,"currency":"USD","status":"%s",'
        '"remainingToPayBtc":0,"remainingToPay":0,"paid":%s,"paidBtc":1.00,'
        '"paymentTime":"2018-01-12T12:06:20Z","expirationTime":"2018-01-12T12:21:20Z",'
        '"currentTime":"%s","merchantTransactionId":"%s",'
        '"notificationUrl":"https://example.com/notify","message":"payment for cookies",'
        '"btcTransactions":[],"notificationType":"REGULAR"}'
        % (payment_id, amount, status, amount, current_time, order_id)
    ).encode()


def bpg_signature(body: bytes, key: str = "examplehmackey") -> str:
    return hmac.new(key.encode(), body, hashlib.sha1).hexdigest()


def coinbarpay_status(
    status: str,
    *,
    order_id: str = "order-1001",
    total: str = "8.99",
    descr: str = "",
    update_time: str = "2022-05-11T12:30:35.059Z",
) -> bytes:
    return (
        '{"payment_id_coinbar":"499f5adb-5911-4d1f-8642-2c53c24075d9",'
        '"payment_request_id_client":"%s",'
        '"service_client_id":"2cb63353-2541-4c4e-90d4-7bf1d4b42c5c","status":"%s",'
        '"payment_detail":{"destination_coin":"BTC","trade_pair":"BTC/EUR",'
        '"destination_amount":0.00045145423250897323,"coin_change":19913.425,"total_price":%s},'
        '"input_coin":"EUR","creation_time":"2022-05-11T12:16:01.064Z","update_time":"%s",'
        '"status_descr":"%s"}' % (order_id, status, total, update_time, descr)
    ).encode()


def coinbarpay_signature(body: bytes, secret: str = "your_secret_key") -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def cryptoprocessing_callback(
    status: str,
    *,
    foreign_id: str = "order_12345",
    received: str = "0",
    expected: str = "0.0094",
    amount: str = "0.3",
    kind: str = "payment_request",
) -> bytes:
    return (
        '{"payment_request_id":"019c0ebf-81e5-751d-aa57-fb9e2cba23c2","foreign_id":"%s",'
        '"type":"%s","status":"%s","end_user_email":"test@test.com",'
        '"payment_request_address":{"id":"019c0ebf-84a1-7bdc-a09c-8b62294cc75d",'
        '"currency":{"iso":"BTC","network_name":"bitcoin"},'
        '"convert_to":{"iso":"ETH","network_name":"ethereum"},'
        '"address":"tb1qj0d4rsczat6dx3yy065g98rrz5hewkrdcrz7je"},'
        '"payment_request_amount":{"currency":{"iso":"ETH","network_name":"ethereum"},'
        '"amount":"%s"},'
        '"currency_sent":{"currency":{"iso":"BTC","network_name":"bitcoin"},'
        '"expected_amount":"%s","received_amount":"%s","remaining_amount":"0"},'
        '"fixed_at":1769773958,"expires_at":1769774157,"valid_until":1769774157}'
        % (foreign_id, kind, status, amount, expected, received)
    ).encode()


def cryptoprocessing_headers(
    body: bytes, *, secret: str = "AbCdEfG123456", key: str = "cp-api-key"
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Processing-Key": key,
        "X-Processing-Signature": hmac.new(secret.encode(), body, hashlib.sha512).hexdigest(),
    }


def later(**delta: float) -> datetime:
    return datetime.now(UTC) + timedelta(**delta)


def provider_mock(**options: Any) -> responses.RequestsMock:
    """A `responses` mock of the provider sessions' transport."""
    return responses.RequestsMock(target=PROVIDER_SEND, **options)


def self_signed_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A certificate and key for `name` (an IP address or a DNS name), made by openssl."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    alt = f"IP:{name}" if name.replace(".", "").isdigit() else f"DNS:{name}"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
         "-addext", f"subjectAltName={alt}"],
        capture_output=True,
        check=False,
    )  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"openssl cannot make a certificate: {made.stderr[-200:]!r}")
    return cert, key
