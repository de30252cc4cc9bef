"""Every test's marker, from its folder; the throwaway databases (one migrated template per
session, cloned per test or per module) and connections to them; private checkpoint files."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from harness.databases import Server, ThrowawayDatabase

TESTS = Path(__file__).resolve().parent
SCOPES = {"unit": "unit", "integration": "integration", "api": "api", "faults": "fault", "fuzz": "fuzz",
          "interop": "interop", "browser": "browser", "cluster": "cluster"}  # folder: marker


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by the folder it sits in (pyproject.toml says what each marker means), so a
    new test cannot forget its marker; a test outside those folders is an error."""
    for item in items:
        try:
            folder = item.path.relative_to(TESTS).parts[0]
        except ValueError:
            continue  # not one of ours
        if folder not in SCOPES:
            raise pytest.UsageError(f"{item.nodeid}: put it in one of tests/{{{','.join(SCOPES)}}}/")
        item.add_marker(SCOPES[folder])


@pytest.fixture(scope="session", autouse=True)
def private_checkpoints(tmp_path_factory):
    """Signed checkpoints and their signing key go to a temporary folder, never `.data/`
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
