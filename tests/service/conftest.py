"""Databases for service tests: a SQLite file always, PostgreSQL when
``TRAINQ_TEST_DATABASE_URL`` names one. Every test that takes ``context`` runs on both."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.app import create_app
from service.auth import create_token
from service.context import ServiceContext
from service.datasets import register_builtins
from service.migrate import downgrade, upgrade
from service.models import Base
from service.settings import Settings

POSTGRES_URL = os.environ.get("TRAINQ_TEST_DATABASE_URL")
DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]


@pytest.fixture(scope="session")
def migrated_urls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each database migrated once per session, down to nothing first, so the
    revisions themselves are exercised from scratch."""
    urls = {"sqlite": f"sqlite:///{tmp_path_factory.mktemp('db') / 'trainq.db'}"}
    if POSTGRES_URL:
        urls["postgresql"] = POSTGRES_URL
    for url in urls.values():
        downgrade(url, "base")
        upgrade(url)
    return urls


def _truncate(context: ServiceContext) -> None:
    tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
    with context.engine.begin() as connection:
        if context.engine.dialect.name == "postgresql":
            connection.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for table in tables:
                connection.execute(text(f"DELETE FROM {table}"))


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, migrated_urls: dict[str, str]) -> str:
    if request.param not in migrated_urls:
        pytest.skip("TRAINQ_TEST_DATABASE_URL is not set: PostgreSQL tests skip")
    return migrated_urls[request.param]


@pytest.fixture
def context(database_url: str, tmp_path: Path) -> Iterator[ServiceContext]:
    settings = Settings(
        home=tmp_path, database_url=database_url, artifact_dir=tmp_path / "artifacts"
    )
    ctx = ServiceContext.from_settings(settings)
    _truncate(ctx)
    yield ctx
    ctx.engine.dispose()


@dataclass
class Api:
    """The app in-process, with a token for each of two teams."""

    client: TestClient
    a: dict[str, str]
    b: dict[str, str]
    context: ServiceContext


@pytest.fixture
def api(context: ServiceContext) -> Iterator[Api]:
    with context.session_factory() as session:
        register_builtins(session=session)
        _, token_a = create_token(session=session, team_name="team-a")
        _, token_b = create_token(session=session, team_name="team-b")
    with TestClient(create_app(context)) as client:
        yield Api(
            client=client,
            a={"Authorization": f"Bearer {token_a}"},
            b={"Authorization": f"Bearer {token_b}"},
            context=context,
        )
