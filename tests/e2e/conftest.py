"""A real uvicorn on 127.0.0.1 serving the app, with dispatchers on the session's Ray."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from service.auth import create_token
from service.context import ServiceContext
from service.datasets import register_builtins
from service.dispatcher import Dispatcher, JobRunner, ray_runner
from tests.servers import serving


@dataclass
class Service:
    url: str
    token: str
    context: ServiceContext
    http: httpx.Client


@pytest.fixture
def service(context: ServiceContext, ray_session: None) -> Iterator[Service]:
    import ray

    context.needs_ray = True
    resources = ray.cluster_resources()
    context.cluster_workers = int(resources.get("CPU", 1))
    context.cluster_gpus = int(resources.get("GPU", 0))
    with context.session_factory() as session:
        register_builtins(session=session)
        _, token = create_token(session=session, team_name="e2e")
    with (
        serving(context) as url,
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60.0
        ) as http,
    ):
        yield Service(url=url, token=token, context=context, http=http)


@pytest.fixture
def dispatchers(service: Service) -> Iterator[list[Dispatcher]]:
    """Starts dispatcher threads on demand: ``start(count, runner)``."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    started: list[Dispatcher] = []

    def start(count: int = 1, runner: JobRunner = ray_runner) -> list[Dispatcher]:
        for _ in range(count):
            dispatcher = Dispatcher(service.context, runner=runner)
            thread = threading.Thread(target=dispatcher.run_forever, args=(stop,), daemon=True)
            thread.start()
            threads.append(thread)
            started.append(dispatcher)
        return started

    yield start  # type: ignore[misc]
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
