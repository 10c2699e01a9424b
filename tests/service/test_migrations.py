from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service.context import ServiceContext
from service.models import Base

#: Indexes on expressions (``priority DESC``) do not reflect back as they were
#: declared, so the comparison skips them and checks that they exist instead.
EXPRESSION_INDEXES = {"ix_jobs_claim"}


def _compared(obj: Any, name: str | None, kind: str, reflected: bool, compare_to: Any) -> bool:
    return not (kind == "index" and name in EXPRESSION_INDEXES)


def test_revisions_build_exactly_the_models(context: ServiceContext) -> None:
    """The migrated schema (from scratch, see conftest) has nothing the models lack or add."""
    with context.engine.connect() as connection:
        migration = MigrationContext.configure(
            connection, opts={"compare_type": True, "include_object": _compared}
        )
        assert compare_metadata(migration, Base.metadata) == []
        indexes = {index["name"] for index in inspect(connection).get_indexes("jobs")}
    assert EXPRESSION_INDEXES <= indexes
