"""Fixtures every test package shares: BLAS threads, seeded generators, the
databases (a SQLite file always, PostgreSQL when ``TRAINQ_TEST_DATABASE_URL``
names one: every test that takes ``context`` runs on both) and one local Ray."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from threadpoolctl import threadpool_limits

from service.context import ServiceContext
from service.migrate import downgrade, upgrade
from service.models import Base
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("TRAINQ_TEST_DATABASE_URL")
DATABASES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)]
#: Logical CPUs of the session's Ray: enough for four workers and spare, on any machine.
RAY_NUM_CPUS = 8
RAY_OBJECT_STORE_BYTES = 256 * 1024 * 1024


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread() -> Iterator[None]:
    """The tests' matrices are tiny: BLAS threads only contend for the cores."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test's id, so each test draws the same numbers in any order."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


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


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (started on first use)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=RAY_NUM_CPUS,
            include_dashboard=False,
            object_store_memory=RAY_OBJECT_STORE_BYTES,
            logging_level="ERROR",
            log_to_driver=False,
            # Workers import test modules' actor classes; their matrices are tiny,
            # so one BLAS thread each keeps actors from contending for the cores.
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}},
        )
    yield
    ray.shutdown()
