"""The Litestar application: routes and the composition of the service's parts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from litestar import Litestar, Response, get
from litestar.datastructures import State

from db.migrate import pending_migrations
from db.store import CONNECTION_ERRORS, EventStore
from service.config import Settings
from service.database import create_pool
from service.problems import EXCEPTION_HANDLERS

log = logging.getLogger(__name__)


@get("/health/live", summary="Liveness: the process is up", tags=["health"])
async def live() -> dict[str, str]:
    return {"status": "live"}


@get("/health/ready", summary="Readiness: database reachable, migrations applied", tags=["health"])
async def ready(state: State) -> Response[dict[str, Any]]:
    checks: dict[str, Any] = {}
    settings: Settings = state.settings
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            async with state.pool.acquire() as connection:
                await connection.fetchval("SELECT 1")
                checks["database"] = {"ok": True}
                pending = await pending_migrations(connection)
                checks["migrations"] = {"ok": not pending, "pending": pending}
    except (*CONNECTION_ERRORS, asyncpg.PostgresError) as error:
        checks["database"] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        checks["migrations"] = {"ok": False, "error": "database unreachable"}
    ok = all(check["ok"] for check in checks.values())
    body = {"status": "ready" if ok else "not_ready", "checks": checks}
    return Response(body, status_code=200 if ok else 503, headers={} if ok else {"Retry-After": "1"})


def create_app(settings: Settings, app_dsn: str) -> Litestar:
    """Build the app around the service's own (non-superuser) database login."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # min_size=0 inside create_pool would not connect here: the service starts, and answers
        # readiness red, while the database is down.
        app.state.pool = await create_pool(app_dsn, settings, min_size=0)
        app.state.store = EventStore(app.state.pool)
        try:
            yield
        finally:
            await app.state.pool.close()

    return Litestar(
        route_handlers=[live, ready],
        lifespan=[lifespan],
        state=State({"settings": settings}),
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=settings.max_upload_bytes,
    )


def create_app_from_env() -> Litestar:
    """uvicorn's factory: `python -m service` has put the resolved database URLs in the env."""
    settings = Settings.from_env()
    if not settings.app_database_url:
        raise RuntimeError("APP_DATABASE_URL is unset: start the service with `python -m service`")
    return create_app(settings, settings.app_database_url)
