"""Apply the Alembic revisions (``trainq db upgrade``)."""

from __future__ import annotations

import functools
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("sqlite://"))


@functools.cache
def head_revision() -> str:
    """The newest revision this code knows."""
    head = _scripts().get_current_head()
    assert head is not None
    return head


def schema_problem(engine: Engine) -> str | None:
    """Why the database cannot serve this code (not migrated, behind, or ahead of
    it), or None when it is at this code's newest revision."""
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    head = head_revision()
    if current == head:
        return None
    if current is None:
        return f"the database has no trainq tables yet: run 'trainq db upgrade' (to {head})"
    known = {script.revision for script in _scripts().walk_revisions()}
    if current not in known:
        return (
            f"the database is at revision {current}, newer than this trainq knows "
            f"(its newest is {head}): run a newer trainq"
        )
    return f"the database is at revision {current}, not {head}: run 'trainq db upgrade'"
