from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.context import ServiceContext
from service.models import Base


def test_revisions_build_exactly_the_models(context: ServiceContext) -> None:
    """The migrated schema (from scratch, see conftest) has nothing the models lack or add."""
    with context.engine.connect() as connection:
        migration = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(migration, Base.metadata) == []
