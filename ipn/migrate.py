"""Schema migrations with Alembic, run from code so an installed package can upgrade itself."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import models
from ipn.db import Database


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(models.__file__).parent / "migrations"))
    return config


def upgrade(db: Database, revision: str = "head") -> None:
    config = alembic_config()
    with db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def pending(db: Database) -> bool:
    """Whether the database is behind the newest migration."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with db.engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    return current != head
