"""The FastAPI application."""

from __future__ import annotations

import time

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import datasets, jobs
from service.api.deps import TeamDep
from service.artifacts import ArtifactNotFound
from service.context import ServiceContext
from service.errors import ServiceError
from service.migrate import schema_problem
from service.telemetry import make_registry

API_PREFIX = "/api/v1"
#: The front page until the team dashboard exists: where to go from here.
HOME_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trainq</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40em; margin: 3em auto">
<h1>trainq</h1>
<p>The REST API is at <a href="/api/v1/jobs"><code>/api/v1</code></a>
(every route takes <code>Authorization: Bearer &lt;token&gt;</code>);
its interactive documentation is at <a href="/docs">/docs</a>.</p>
<p>From a terminal: <code>trainq submit job.json</code>, <code>trainq jobs</code>,
<code>trainq watch ID</code>, <code>trainq metrics ID</code>.</p>
<p>Health: <a href="/healthz">/healthz</a>, <a href="/readyz">/readyz</a>.</p>
</body></html>
"""


class LatencyMiddleware:
    """Observes each HTTP request's duration by method, route template and status
    (plain ASGI: no per-request task or body buffering)."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def record_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            self.histogram.labels(
                scope["method"], getattr(route, "path", "unmatched"), str(status_code)
            ).observe(time.perf_counter() - started)


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

    app.add_middleware(LatencyMiddleware, histogram=latency)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(ArtifactNotFound)
    async def artifact_missing(_request: Request, exc: ArtifactNotFound) -> JSONResponse:
        return JSONResponse({"detail": "artifact not found"}, status_code=404)

    @app.get("/", include_in_schema=False)
    def home() -> HTMLResponse:
        return HTMLResponse(HOME_PAGE)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        checks: dict[str, str] = {}

        def database() -> None:
            problem = schema_problem(context.engine)  # its query reaches the database
            checks["database"] = "ok"
            checks["schema"] = problem or "ok"

        try:
            await run_in_threadpool(database)
        except Exception as exc:  # reported, not raised: this is the readiness answer
            checks.setdefault("database", f"unreachable: {type(exc).__name__}")
            checks.setdefault("schema", "unknown")
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


def app_from_environment() -> FastAPI:
    """The app configured from ``TRAINQ_*`` (for ``uvicorn --factory`` worker processes)."""
    from service.settings import get_settings

    return create_app(ServiceContext.from_settings(get_settings()))
