"""The Litestar application: routes, error handling, middleware and lifecycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from litestar import Litestar, Response, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.template.config import TemplateConfig

from db.migrate import pending_migrations
from db.store import CONNECTION_ERRORS, DatabaseUnavailable
from infra.settings import Settings
from projections.worker import elected_workers
from service.audit_routes import AUDIT_ROUTES
from service.bootstrap import Services, ServicesDependency
from service.console import CONSOLE, TEMPLATES, template_globals
from service.label_routes import LABEL_ROUTES
from service.metrics import Metrics
from service.observability import Observed
from service.problems import EXCEPTION_HANDLERS
from service.quality_routes import QUALITY_ROUTES
from service.routes import ROUTES
from service.security import scope_guard
from service.tlog_routes import TLOG_ROUTES, CachedTiles
from service.uploads import MAX_PARTS


@get("/health/live", summary="Liveness: the process is up", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "live"}


@get(
    "/health/ready",
    summary="Readiness: database reachable, migrations applied, model warm, projection lag; the replica's lag",
    tags=["health"],
)
async def ready(services: ServicesDependency) -> Response[dict[str, Any]]:
    settings = services.settings
    checks: dict[str, Any] = {}
    replica = None
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            # The primary: writes need it, and reads fall back to it when the replica cannot serve.
            async with services.pool.acquire(timeout=settings.connect_timeout_s) as connection:
                await connection.fetchval("SELECT 1")
                checks["database"] = {"ok": True}
                pending = await pending_migrations(connection)
                checks["migrations"] = {"ok": not pending, "pending": pending}
                elected = await elected_workers(connection)
            lag = await services.refresh_lag()
            limit = settings.readiness_max_lag_events
            checks["projection"] = {
                "ok": limit <= 0 or lag.events <= limit,
                "lag_events": lag.events,
                "lag_seconds": lag.seconds,
                "max_lag_events": limit or None,
                "runs": settings.projections,
                "active_here": services.projection.is_active if services.projection else False,
                "elected": elected,
            }
            # Reported, never a reason to leave the pool: without the replica reads go to the primary.
            replica = await services.refresh_replica()
            checks["transparency_log"] = await services.refresh_tlog()
    except (*CONNECTION_ERRORS, DatabaseUnavailable, asyncpg.PostgresError) as error:
        checks["database"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    slot = services.model
    loaded = slot.loaded
    checks["model"] = {
        "ok": slot.ready,
        "warm": loaded is not None,
        "registered": slot.ready,
        **({"name": loaded.name, "version": loaded.version, "device": loaded.device} if loaded else {}),
        **({"error": slot.error} if slot.error else {}),
    }
    ok = all(check["ok"] for check in checks.values()) and "migrations" in checks
    body = {"status": "ready" if ok else "not_ready", "checks": checks, "replica": replica}
    return Response(body, status_code=200 if ok else 503, headers={} if ok else {"Retry-After": "1"})


def create_app(settings: Settings, app_dsn: str, *, run_projections: bool = True) -> Observed:
    """Build the app around the service's own (non-superuser) database login."""
    metrics = Metrics()
    started: list[Services] = []

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        services = await Services.start(settings, app_dsn, metrics, run_projections=run_projections)
        started.append(services)
        try:
            yield
        finally:
            await services.stop()

    def provide_services() -> Services:
        return started[0]  # the lifespan has run before any request is served

    app = Litestar(
        route_handlers=[live, ready, *ROUTES, *LABEL_ROUTES, *QUALITY_ROUTES, *TLOG_ROUTES, *AUDIT_ROUTES, CONSOLE],
        template_config=TemplateConfig(directory=TEMPLATES, engine=JinjaTemplateEngine, engine_callback=template_globals),
        lifespan=[lifespan],
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=settings.max_upload_bytes,
        # Without keys there is nothing to check: no guard at all (Litestar copies the handler
        # on every guard call).
        guards=[scope_guard(settings.api_keys)] if settings.api_keys else [],
        multipart_form_part_limit=MAX_PARTS,
        logging_config=None,  # logging is configured once, as JSON lines (infra/logs.py)
        openapi_config=OpenAPIConfig(
            title="Prediction audit service",
            version="1.0.0",
            description="Predictions on uploaded images, with an immutable, verifiable event log.",
        ),
    )
    return Observed(CachedTiles(app), metrics)


def create_app_from_env() -> Observed:
    """uvicorn's factory: `just serve` (cli/serve.py) has put the resolved database URLs in the env."""
    settings = Settings.from_env()
    if not settings.app_database_url:
        raise RuntimeError("APP_DATABASE_URL is unset: start the service with `just serve`")
    # With PROJECTIONS=process the worker is a child of `just serve` (cli/supervisor.py), not
    # part of any uvicorn worker.
    return create_app(settings, settings.app_database_url, run_projections=settings.projections == "inline")
