"""The Litestar application: routes, error handling, middleware and lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from litestar import Litestar, Response, get
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from db.migrate import pending_migrations
from db.store import CONNECTION_ERRORS, DatabaseUnavailable
from service.bootstrap import Runtime
from service.config import Settings
from service.observability import Observed
from service.problems import EXCEPTION_HANDLERS, problem_response
from service.routes import ROUTES
from service.security import require_route_scope


@get("/health/live", summary="Liveness: the process is up", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "live"}


@get(
    "/health/ready",
    summary="Readiness: database reachable, migrations applied, model warm, projection lag",
    tags=["health"],
)
async def ready(state: State) -> Response[dict[str, Any]]:
    runtime: Runtime = state.runtime
    settings = runtime.settings
    checks: dict[str, Any] = {}
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            async with runtime.reading() as connection:
                await connection.fetchval("SELECT 1")
                checks["database"] = {"ok": True}
                pending = await pending_migrations(connection)
                checks["migrations"] = {"ok": not pending, "pending": pending}
            lag = await runtime.refresh_lag()
            limit = settings.readiness_max_lag_events
            checks["projection"] = {
                "ok": limit <= 0 or lag.events <= limit,
                "lag_events": lag.events,
                "lag_seconds": lag.seconds,
                "max_lag_events": limit or None,
                "runs": settings.projections,
                "active_here": runtime.projector.is_active if runtime.projector else False,
            }
    except (*CONNECTION_ERRORS, DatabaseUnavailable, asyncpg.PostgresError) as error:
        checks["database"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    model = runtime.model_info
    checks["model"] = {
        "ok": model is not None and runtime.model_registered,
        "warm": model is not None,
        "registered": runtime.model_registered,
        **({"name": model.name, "version": model.version, "device": model.device} if model else {}),
        **({"error": runtime.model_error} if runtime.model_error else {}),
    }
    ok = all(check["ok"] for check in checks.values()) and "migrations" in checks
    body = {"status": "ready" if ok else "not_ready", "checks": checks}
    return Response(body, status_code=200 if ok else 503, headers={} if ok else {"Retry-After": "1"})


def _database_unavailable(request, error: DatabaseUnavailable):
    return problem_response(request, 503, "database_unavailable", str(error), {"Retry-After": "1"})


def create_app(settings: Settings, app_dsn: str, *, run_projections: bool = True) -> Observed:
    """Build the app around the service's own (non-superuser) database login."""
    runtime = Runtime(settings, app_dsn, run_projections=run_projections)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = Litestar(
        route_handlers=[live, ready, *ROUTES],
        lifespan=[lifespan],
        state=State({"runtime": runtime}),
        exception_handlers={**EXCEPTION_HANDLERS, DatabaseUnavailable: _database_unavailable},  # type: ignore[dict-item]
        request_max_body_size=settings.max_upload_bytes,
        # Without keys there is nothing to check: no guard at all (Litestar copies the handler
        # on every guard call).
        guards=[require_route_scope] if runtime.api_keys else [],
        multipart_form_part_limit=16,
        logging_config=None,  # logging is configured once, as JSON lines (service/observability.py)
        openapi_config=OpenAPIConfig(
            title="Prediction audit service",
            version="1.0.0",
            description="Predictions on uploaded images, with an immutable, verifiable event log.",
        ),
    )
    return Observed(app, runtime.metrics)


def create_app_from_env() -> Observed:
    """uvicorn's factory: `python -m service` has put the resolved database URLs in the env."""
    settings = Settings.from_env()
    if not settings.app_database_url:
        raise RuntimeError("APP_DATABASE_URL is unset: start the service with `python -m service`")
    # With PROJECTIONS=process the worker is a child of `python -m service` (service/__main__.py),
    # not part of any uvicorn worker.
    return create_app(settings, settings.app_database_url, run_projections=settings.projections == "inline")
