"""Where the database is, for every process: DATABASE_URL's server, or the embedded one started on
demand; migrated before use; and the service's connection pools.

`start_or_locate_database` starts the embedded PostgreSQL when `DATABASE_URL` is unset (the
server then lives as long as this process); `provision_database` also applies the migrations.
"""

from __future__ import annotations

import asyncpg

from db import embedded
from db.dsn import APP_ROLE, with_database, with_user
from db.migrate import migrate
from db.store import append_settings
from infra.settings import Settings

EMBEDDED_DATABASE = "prediction_audit"


class DatabaseTarget:
    """The owner URL (migrations, operator commands) and the service's own non-superuser URL."""

    def __init__(self, owner_dsn: str, app_dsn: str, server_handle: object | None = None) -> None:
        self.owner_dsn = owner_dsn
        self.app_dsn = app_dsn
        self._server_handle = server_handle  # keeps the embedded server alive with this process


def start_or_locate_database(settings: Settings) -> DatabaseTarget:
    """DATABASE_URL's server when set; otherwise start (or attach to) the embedded server."""
    if settings.database_url:
        owner = settings.database_url
        handle = None
    else:
        handle, server_dsn = embedded.start(settings.embedded_pgdata)
        owner = with_database(server_dsn, EMBEDDED_DATABASE)
    app = settings.app_database_url or with_user(owner, APP_ROLE)
    return DatabaseTarget(owner, app, handle)


async def provision_database(settings: Settings) -> DatabaseTarget:
    """`start_or_locate_database`, then apply the migrations (under an advisory lock)."""
    target = start_or_locate_database(settings)
    await migrate(target.owner_dsn)
    return target


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool release without asyncpg's reset round trip (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL): the service changes no session state, and its locks are transaction-scoped."""


async def create_pool(dsn: str, settings: Settings, *, size: int | None = None, min_size: int = 1) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        reset=_keep_session,
        max_size=size or settings.pool_size,
        timeout=settings.connect_timeout_s,
        command_timeout=settings.statement_timeout_ms / 1000 + 1,
        server_settings=append_settings(
            lock_timeout_ms=settings.lock_timeout_ms,
            statement_timeout_ms=settings.statement_timeout_ms,
            idle_timeout_ms=settings.idle_in_transaction_timeout_ms,
        ),
    )
