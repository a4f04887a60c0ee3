"""The migrations build exactly the schema the models describe, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from ipn import migrate
from models import Base

from conftest import Backend


def test_migrations_match_the_models(backend: Backend) -> None:
    with backend.db.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    assert not migrate.pending(backend.db)
