"""The FastAPI application."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.api import datasets, jobs
from service.api.deps import TeamDep
from service.artifacts import ArtifactNotFound
from service.context import ServiceContext
from service.errors import ServiceError
from service.telemetry import make_registry

API_PREFIX = "/api/v1"


def _ray_ready() -> bool:
    try:
        import ray

        return bool(ray.is_initialized()) and bool(ray.cluster_resources())
    except Exception:  # any failure to reach Ray means not ready
        return False


def create_app(context: ServiceContext) -> FastAPI:
    app = FastAPI(title="trainq", version="0.1.0")
    app.state.context = context
    registry, latency = make_registry(context.session_factory)

    @app.middleware("http")
    async def measure(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        latency.labels(request.method, path, str(response.status_code)).observe(
            time.perf_counter() - started
        )
        return response

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(ArtifactNotFound)
    async def artifact_missing(_request: Request, exc: ArtifactNotFound) -> JSONResponse:
        return JSONResponse({"detail": "artifact not found"}, status_code=404)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        checks: dict[str, str] = {}

        def database() -> None:
            with context.engine.connect() as connection:
                connection.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(database)
            checks["database"] = "ok"
        except Exception as exc:  # reported, not raised: this is the readiness answer
            checks["database"] = f"unreachable: {type(exc).__name__}"
        if context.needs_ray:
            checks["ray"] = "ok" if await run_in_threadpool(_ray_ready) else "unreachable"
        ready = all(value == "ok" for value in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    api = APIRouter(prefix=API_PREFIX)
    api.include_router(jobs.router)
    api.include_router(datasets.router)
    app.include_router(api)

    @app.get("/metrics", tags=["health"])
    def prometheus(_team: TeamDep) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
