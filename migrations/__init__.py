"""Alembic environment and revisions: the only way the schema is made or changed."""
