"""Engines and sessions for PostgreSQL and SQLite, with SQLite made safe for concurrent writers."""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Connection, Dialect, Engine, ReturnsRows, Select, create_engine, event
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
POOL_RECYCLE_SECONDS = 300


def dumps(value: Any) -> str:
    """JSON for JSON columns: Decimals as exact strings, times as ISO 8601."""

    def default(obj: Any) -> Any:
        if isinstance(obj, Decimal):
            return format(obj, "f")
        if isinstance(obj, datetime | date):
            return obj.isoformat()
        if isinstance(obj, bytes):
            return obj.decode("utf-8", "replace")
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    return json.dumps(value, default=default, separators=(",", ":"))


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, **kwargs)
    return create_engine(
        url,
        # No ping before each checkout (a round trip per transaction): a connection the server
        # dropped fails its first statement, which invalidates the whole pool (SQLAlchemy
        # treats a disconnect that way), and the caller retries or answers 503. Recycling
        # bounds the age of idle connections that a proxy or firewall may cut silently.
        pool_pre_ping=False,
        pool_recycle=POOL_RECYCLE_SECONDS,
        # Up to 16, opened as they are first needed and then kept: one for each thread of the
        # Procfile's worker pool, so a thread never waits on another's connection. No overflow:
        # a connection opened beyond the pool's size is closed again at its checkin, and under
        # a burst the web process paid a connect and a close for most of its requests.
        pool_size=16,
        max_overflow=0,
        json_serializer=dumps,
        **kwargs,
    )


def _sqlite_engine(url: str, **kwargs: Any) -> Engine:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        json_serializer=dumps,
        **kwargs,
    )

    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: two deferred transactions that both read and
        # then write would otherwise deadlock, and SQLite answers that with an error, not a wait.
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Database:
    """One engine and its session factory; `dispose()` after a fork."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **kwargs)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        # The same pool, for statements that commit by themselves (no BEGIN, no COMMIT).
        self.autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction: committed on success, rolled back on error."""
        with self.sessions() as session, session.begin():
            yield session

    def reading(self) -> Session:
        """A session for reads outside any transaction: on PostgreSQL no BEGIN and no
        ROLLBACK go with its statements (each sees what was committed when it ran)."""
        if self.is_postgresql:
            return Session(self.autocommit, expire_on_commit=False)
        return self.sessions()

    def reading_connection(self) -> Connection:
        """`reading`'s Core counterpart: a connection for reads outside any transaction (on
        PostgreSQL autocommit, no BEGIN or ROLLBACK)."""
        if self.is_postgresql:
            return self.autocommit.connect()
        return self.engine.connect()

    def keyset(self, query: Select[Any], key: Any, page: int = 500) -> Iterator[Any]:
        """Every row `query` selects, in `key` order, a page at a time, each page in a session
        of its own: a long listing never holds a transaction open or sits in memory at once.
        `query` selects either `key` itself or whole rows that carry it."""
        last: Any = None
        while True:
            paged = query.order_by(key).limit(page)
            if last is not None:
                paged = paged.where(key > last)
            with self.sessions() as session:
                rows = session.scalars(paged).all()
            if not rows:
                return
            yield from rows
            last = getattr(rows[-1], key.key, rows[-1])

    def dispose(self) -> None:
        self.engine.dispose(close=False)


class Prepared:
    """A Core statement compiled once for PostgreSQL and run by psycopg itself, prepared once
    per connection. Values go in and come out converted by the columns' own SQLAlchemy types,
    as SQLAlchemy converts them; what is skipped is its execution context, its result wrapping
    and the row descriptions it reads, which on the worker's hot path cost more CPU than the
    statements themselves. Errors are raised as SQLAlchemy's, and a connection lost on the way
    is invalidated as SQLAlchemy invalidates one, so callers handle both as they always did."""

    def __init__(self, statement: ReturnsRows, dialect: Dialect) -> None:
        self._compiled = compiled = statement.compile(dialect=dialect)
        if "POSTCOMPILE" in compiled.string:
            raise ValueError("a statement with expanding parameters is compiled per run")
        self.sql = compiled.string
        self._dialect = dialect
        self._binds: dict[str, Any] = {}
        for bind, name in compiled.bind_names.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self._binds[name] = processor
        self._types = [column.type for column in statement.exported_columns]
        # Some result processors depend on the type the server reports (numeric's), so they
        # are taken from the first run's description: (column index, processor) of each
        # column that has one.
        self._results: list[tuple[int, Any]] | None = None

    def rows(self, connection: Connection, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Run on `connection` (in its transaction, if it is in one) and return every row."""
        values = self._compiled.construct_params(params)
        for name, processor in self._binds.items():
            values[name] = processor(values[name])
        driver: psycopg.Connection[Any] = connection.connection.driver_connection  # type: ignore[assignment]
        try:
            with driver.cursor() as cursor:
                cursor.execute(self.sql, values, prepare=True)
                rows = cursor.fetchall()
                if self._results is None:
                    self._results = self._result_processors(cursor)
        except psycopg.Error as exc:
            lost = driver.broken or driver.closed
            if lost:
                # As SQLAlchemy does on a disconnect: every idle connection is as dead as this.
                connection.invalidate(exc)
                connection.engine.dispose(close=False)
            raise driver_error(self.sql, exc, lost) from exc
        if not self._results:
            return rows
        converted = []
        for row in rows:
            values_out = list(row)
            for i, processor in self._results:
                values_out[i] = processor(values_out[i])
            converted.append(tuple(values_out))
        return converted

    def _result_processors(self, cursor: psycopg.Cursor[Any]) -> list[tuple[int, Any]]:
        described = cursor.description or []
        processors = [
            type_.dialect_impl(self._dialect).result_processor(self._dialect, column.type_code)
            for type_, column in zip(self._types, described, strict=True)
        ]
        return [(i, processor) for i, processor in enumerate(processors) if processor is not None]


def driver_error(sql: str, exc: psycopg.Error, lost: bool) -> StatementError:
    """A psycopg error as SQLAlchemy raises it for `sql`. Never with the parameters, even
    hidden: they hold the callbacks' bodies."""
    return DBAPIError.instance(
        sql, None, exc, psycopg.Error, hide_parameters=True, connection_invalidated=lost
    )


def fetch_rows(
    connection: Connection, statement: ReturnsRows, params: Mapping[str, Any]
) -> Sequence[Sequence[Any]]:
    """Every row of `statement`: on PostgreSQL run by the driver (`Prepared`), elsewhere by
    SQLAlchemy."""
    if connection.dialect.name == "postgresql":
        return prepared(statement, connection.dialect).rows(connection, params)
    return list(connection.execute(statement, params))  # type: ignore[call-overload]


_PREPARED: weakref.WeakKeyDictionary[Dialect, dict[ReturnsRows, Prepared]] = (
    weakref.WeakKeyDictionary()
)


def prepared(statement: ReturnsRows, dialect: Dialect) -> Prepared:
    """`statement` as `Prepared` for `dialect`, compiled on its first use."""
    statements = _PREPARED.setdefault(dialect, {})
    found = statements.get(statement)
    if found is None:
        found = statements[statement] = Prepared(statement, dialect)
    return found
