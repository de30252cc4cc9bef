from __future__ import annotations

import os
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.databases import Server, ThrowawayDatabase


@pytest.fixture(scope="session", autouse=True)
def private_checkpoints(tmp_path_factory):
    """Chain-head checkpoints and their signing key go to a temporary folder, never `.data/`
    (service processes the tests start inherit this environment)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    saved = {name: os.environ.get(name) for name in ("CHECKPOINT_DIR", "CHECKPOINT_KEY")}
    os.environ["CHECKPOINT_DIR"] = str(folder / "heads")
    os.environ["CHECKPOINT_KEY"] = str(folder / "key.pem")
    yield folder
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
async def pg_server() -> AsyncIterator[Server]:
    server = Server()
    await server.make_template()
    yield server
    await server.close()


@pytest.fixture
async def database(pg_server: Server) -> AsyncIterator[ThrowawayDatabase]:
    """A fresh migrated database for one test."""
    db = await pg_server.create()
    yield db
    await pg_server.drop(db.name)


@pytest.fixture(scope="module")
async def module_database(pg_server: Server) -> AsyncIterator[ThrowawayDatabase]:
    """A fresh migrated database shared by one module's tests."""
    db = await pg_server.create()
    yield db
    await pg_server.drop(db.name)


@pytest.fixture
async def app_pool(database: ThrowawayDatabase) -> AsyncIterator[asyncpg.Pool]:
    """A pool logged in as the service's own role, on this test's database."""
    pool = await asyncpg.create_pool(database.app_dsn, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture
async def owner(database: ThrowawayDatabase) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection on this test's database (an operator, or an attacker)."""
    connection = await asyncpg.connect(database.owner_dsn)
    yield connection
    await connection.close()
