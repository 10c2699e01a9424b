"""The processes trainq runs as: API, dispatcher, and both at once (embedded mode)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import uvicorn

from service.app import create_app
from service.auth import create_token
from service.client import save_token
from service.context import ServiceContext
from service.datasets import register_builtins
from service.dispatcher import Dispatcher, JobRunner, ray_runner
from service.migrate import upgrade
from service.settings import Settings

log = logging.getLogger(__name__)

ADMIN_TEAM = "default"


def prepare(settings: Settings) -> ServiceContext:
    """Migrate the database, register the built-in datasets, and build the context."""
    context, _ = migrate_and_register(settings)
    return context


def migrate_and_register(settings: Settings) -> tuple[ServiceContext, list[str]]:
    """Migrate the database to its newest revision and record the built-in datasets
    this machine has (those already recorded stay); returns their names too."""
    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url())
    context = ServiceContext.from_settings(settings)
    with context.session_factory() as session:
        builtins = register_builtins(session=session)
    return context, builtins


def first_admin_token(context: ServiceContext) -> str | None:
    """A token for the ``default`` team when the database has none yet (shown once)."""
    from sqlalchemy import func, select

    from service.models import ApiToken

    with context.session_factory() as session:
        if session.scalar(select(func.count()).select_from(ApiToken)):
            return None
        _, token = create_token(session=session, team_name=ADMIN_TEAM)
    save_token(context.settings.home, token)
    return token


def start_ray(settings: Settings) -> dict[str, Any]:
    """Join ``RAY_ADDRESS`` or start a local Ray; returns the cluster's resources."""
    import ray

    if not ray.is_initialized():
        if settings.ray_address:
            ray.init(address=settings.ray_address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    return dict(ray.cluster_resources())


def job_runner() -> JobRunner:
    """Jobs run on Ray worker groups."""
    return ray_runner


def serve(context: ServiceContext, *, host: str, port: int) -> None:
    app = create_app(context)
    # No access log: a line per request costs more than many requests do.
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)


def run_dispatchers(
    context: ServiceContext, *, count: int, runner: JobRunner, stop: threading.Event
) -> list[threading.Thread]:
    threads = []
    for index in range(count):
        dispatcher = Dispatcher(context, runner=runner)
        thread = threading.Thread(
            target=dispatcher.run_forever, args=(stop,), daemon=True, name=f"dispatcher-{index}"
        )
        thread.start()
        threads.append(thread)
    return threads
