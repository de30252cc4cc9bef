"""Throwaway databases for tests and benchmarks: one migrated template per session (or bench run),
cloned per test, module or run.

On DATABASE_URL's server when it is set, otherwise on a private embedded PostgreSQL in a temporary
folder. Cloning a template takes milliseconds; migrating a fresh database would take a dbmate run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import asyncpg
import msgspec

from db import embedded
from db.dsn import APP_ROLE, with_database, with_user
from db.migrate import migrate
from db.sql import quote_ident


class ThrowawayDatabase(msgspec.Struct, frozen=True):
    name: str
    owner_dsn: str  # superuser: what an operator (or an attacker with the keys) has
    app_dsn: str  # the service's own non-superuser login


class Server:
    """A PostgreSQL server a test session or a bench run may create and drop databases on."""

    def __init__(self) -> None:
        self._handle: object | None = None
        self._tmp: Path | None = None
        url = os.environ.get("DATABASE_URL")
        if url:
            self.admin_dsn = url
        else:
            self._tmp = Path(tempfile.mkdtemp(prefix="audit-test-pg-"))
            self._handle, self.admin_dsn = embedded.start(self._tmp / "pgdata")
        self.template: str | None = None

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.admin_dsn)

    async def make_template(self) -> None:
        name = f"audit_tpl_{uuid.uuid4().hex[:12]}"
        await migrate(with_database(self.admin_dsn, name))  # creates the database, then migrates
        self.template = name

    async def create(self) -> ThrowawayDatabase:
        assert self.template is not None
        name = f"audit_t_{uuid.uuid4().hex[:12]}"
        connection = await self._admin()
        try:
            await connection.execute(f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(self.template)}")
        finally:
            await connection.close()
        owner = with_database(self.admin_dsn, name)
        # A clone would share the template's log identity (and so its checkpoint folder).
        connection = await asyncpg.connect(owner)
        try:
            await connection.execute("UPDATE log_identity SET log_id = gen_random_uuid()")
        finally:
            await connection.close()
        return ThrowawayDatabase(name=name, owner_dsn=owner, app_dsn=with_user(owner, APP_ROLE))

    async def drop(self, name: str) -> None:
        connection = await self._admin()
        try:
            await connection.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await connection.close()

    async def close(self) -> None:
        if self.template:
            await self.drop(self.template)
        if self._handle is not None:
            self._handle.cleanup()  # type: ignore[attr-defined]
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
