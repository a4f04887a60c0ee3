"""ipn.db.Prepared: a Core statement run by psycopg itself gives what SQLAlchemy would give,
and fails as SQLAlchemy fails."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

from ipn.db import Prepared, prepared
from ipn.services import Services
from models import Notification, NotificationKind, NotificationStatus, Payment, PaymentStatus

from helpers import make_payment

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("backend", ["postgresql"], indirect=True),
]

AT = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def pg(services: Services) -> Services:
    assert services.db.is_postgresql
    return services


def test_values_come_back_as_sqlalchemy_gives_them(pg: Services) -> None:
    """Money as a Decimal, times in UTC, enums as members, NULLs as None."""
    make_payment(
        pg.db,
        order_id="A1",
        provider_payment_id="C1",
        paid_amount=Decimal("0.000000000000000000000001"),
        expires_at=AT + timedelta(hours=6),
        status=PaymentStatus.CONFIRMING,
    )
    query = select(Payment.__table__).where(Payment.order_id == bindparam("order"))
    with pg.db.reading_connection() as connection:
        by_sqlalchemy = [tuple(row) for row in connection.execute(query, {"order": "A1"})]
        by_driver = prepared(query, connection.dialect).rows(connection, {"order": "A1"})
        again = prepared(query, connection.dialect).rows(connection, {"order": "A1"})
    assert by_driver == by_sqlalchemy == again
    [row] = by_driver
    values = dict(zip(Payment.__table__.columns.keys(), row, strict=True))
    assert values["paid_amount"] == Decimal("1E-24") and isinstance(values["amount"], Decimal)
    assert values["status"] is PaymentStatus.CONFIRMING
    assert values["expires_at"] == AT + timedelta(hours=6)
    assert values["expires_at"].tzinfo is UTC
    assert values["pay_address"] is None


def test_parameters_go_in_as_sqlalchemy_sends_them(pg: Services) -> None:
    """Enum members, aware times and JSON bound through their column types; a constant of the
    statement (the status compared) bound too."""
    statement = (
        insert(Notification)
        .values(
            provider="cubepay",
            account="default",
            kind=bindparam("kind"),
            received_at=bindparam("at"),
            headers=bindparam("headers"),
            body=b"{}",
            body_sha256="0" * 64,
            status=NotificationStatus.RECEIVED,
            attempts=0,
        )
        .returning(Notification.id, Notification.kind, Notification.received_at)
    )
    params = {"kind": NotificationKind.ANOMALY, "at": AT, "headers": {"X-A": "1"}}
    with pg.db.engine.begin() as connection:
        [(row_id, kind, received_at)] = prepared(statement, connection.dialect).rows(
            connection, params
        )
    assert (kind, received_at) == (NotificationKind.ANOMALY, AT)
    with pg.db.reading() as session:
        row = session.get(Notification, row_id)
        assert row is not None
        assert (row.kind, row.status, row.headers) == (
            NotificationKind.ANOMALY,
            NotificationStatus.RECEIVED,
            {"X-A": "1"},
        )


def test_a_naive_time_is_refused_as_the_column_type_refuses_it(pg: Services) -> None:
    statement = update(Payment).values(updated_at=bindparam("at")).returning(Payment.id)
    with pg.db.engine.begin() as connection, pytest.raises(ValueError, match="naive"):
        prepared(statement, connection.dialect).rows(connection, {"at": datetime(2026, 5, 1)})


def test_a_refused_statement_is_sqlalchemys_error_and_rolls_back_with_its_transaction(
    pg: Services,
) -> None:
    payment = make_payment(pg.db, order_id="A1")
    make_payment(pg.db, order_id="A2", provider_payment_id="C2")
    statement = (
        update(Payment)
        .where(Payment.id == bindparam("held"))
        .values(provider_payment_id=bindparam("to"))
        .returning(Payment.id)
    )
    with pytest.raises(IntegrityError) as raised, pg.db.transaction() as session:
        session.execute(update(Payment).where(Payment.id == payment.id).values(description="x"))
        connection = session.connection()
        prepared(statement, connection.dialect).rows(connection, {"held": payment.id, "to": "C2"})
    assert raised.value.params is None  # never kept: the parameters hold callbacks' bodies
    with pg.db.reading() as session:
        assert session.get(Payment, payment.id).description is None  # type: ignore[union-attr]


def test_a_lost_connection_is_invalidated_and_the_next_one_works(pg: Services) -> None:
    query = select(Payment.id).where(Payment.order_id == bindparam("order"))
    with pg.db.reading_connection() as connection:
        pid = connection.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with pg.db.reading_connection() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(OperationalError) as raised:
            prepared(query, connection.dialect).rows(connection, {"order": "A1"})
        assert raised.value.connection_invalidated
    make_payment(pg.db, order_id="A1")
    with pg.db.reading_connection() as connection:
        assert len(prepared(query, connection.dialect).rows(connection, {"order": "A1"})) == 1


def test_a_statement_of_expanding_parameters_is_not_taken(pg: Services) -> None:
    query = select(Payment.id).where(Payment.order_id.in_(bindparam("orders", expanding=True)))
    with pytest.raises(ValueError, match="expanding"):
        Prepared(query, pg.db.engine.dialect)
