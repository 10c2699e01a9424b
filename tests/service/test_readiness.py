"""The service against a database that is not at its schema's revision."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import text

from service.app import create_app
from service.context import ServiceContext
from service.migrate import head_revision, upgrade
from service.settings import Settings
from tests.service.test_cli import trainq


def _context(tmp_path: Path) -> ServiceContext:
    url = f"sqlite:///{tmp_path / 'trainq.db'}"
    return ServiceContext.from_settings(
        Settings(home=tmp_path, database_url=url, artifact_dir=tmp_path / "artifacts")
    )


def _readiness(context: ServiceContext) -> tuple[int, dict[str, str]]:
    with TestClient(create_app(context)) as client:
        response = client.get("/readyz")
    return response.status_code, response.json()["checks"]


def test_readiness_needs_the_schema_at_its_newest_revision(tmp_path: Path) -> None:
    context = _context(tmp_path)
    head = head_revision()
    assert _readiness(context) == (
        503,
        {
            "database": "ok",
            "schema": f"the database has no trainq tables yet: run 'trainq db upgrade' (to {head})",
        },
    )
    upgrade(context.settings.resolved_database_url())
    assert _readiness(context) == (200, {"database": "ok", "schema": "ok"})
    with context.engine.begin() as connection:  # as a newer trainq would leave it
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    assert _readiness(context) == (
        503,
        {
            "database": "ok",
            "schema": f"the database is at revision f00d, newer than this trainq knows "
            f"(its newest is {head}): run a newer trainq",
        },
    )


def test_roles_refuse_a_database_that_is_not_migrated(tmp_path: Path) -> None:
    """Each says why in one line and exits 2, before it serves or starts Ray."""
    settings = {"TRAINQ_HOME": str(tmp_path), "TRAINQ_DATABASE_URL": f"sqlite:///{tmp_path}/t.db"}
    expected = (
        f"trainq: the database has no trainq tables yet: run 'trainq db upgrade' "
        f"(to {head_revision()})\n"
    )
    for command in (
        ("token", "create", "--team", "vision"),
        ("api", "--port", "1"),
        ("dispatcher",),
    ):
        result = trainq(*command, **settings)
        assert (result.returncode, result.stderr, result.stdout) == (2, expected, "")
    assert trainq("db", "upgrade", **settings).returncode == 0
    created = trainq("token", "create", "--team", "vision", **settings)
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines()[-1].startswith("tq_")
