"""The read router (db/replica.py) without a standby: a replica URL that names the primary itself
is always fresh; an unreachable one sends reads to the primary, and is tried again after
`retry_s`. The streaming standby itself is drilled in tests/cluster."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from db.dsn import with_database
from db.replica import ReadRouter
from harness.live import free_port


async def in_recovery(router: ReadRouter) -> bool:
    async with router.connection() as connection:
        return await connection.fetchval("SELECT pg_is_in_recovery()")


@pytest.fixture
async def primary(database):
    pool = await asyncpg.create_pool(database.app_dsn, min_size=1, max_size=4)
    yield pool
    await pool.close()


async def test_a_replica_url_naming_the_primary_reads_there_and_reports_no_lag(primary, database):
    replica = await asyncpg.create_pool(database.app_dsn, min_size=1, max_size=2)
    seen = []
    router = ReadRouter(primary, replica, max_wait_s=0.2, retry_s=60, acquire_timeout_s=2, on_read=seen.append)
    try:
        results = await asyncio.gather(*(in_recovery(router) for _ in range(20)))
        assert seen == ["replica"] * 20  # not in recovery: nothing to wait for
        assert results == [False] * 20
        status = await router.status()
        assert status["reachable"] and status["standby"] is False and status["lag_bytes"] == 0
        assert status["reads_from"] == "replica"
    finally:
        await replica.close()


async def test_an_unreachable_replica_sends_reads_to_the_primary_until_retry(primary, database):
    nowhere = with_database(f"postgresql://audit_app@127.0.0.1:{free_port()}", "nothing")
    replica = await asyncpg.create_pool(nowhere, min_size=0, max_size=2)
    seen = []
    router = ReadRouter(primary, replica, max_wait_s=0.2, retry_s=0.5, acquire_timeout_s=2, on_read=seen.append)
    try:
        for _ in range(5):
            async with router.connection() as connection:
                assert await connection.fetchval("SELECT count(*) FROM events") >= 0
        assert seen == ["primary"] * 5
        assert router.avoided_because and router.avoided_because.startswith("unreachable")
        status = await router.status()
        assert status["reachable"] is False and status["reads_from"] == "primary"
        # Within retry_s it is not tried (the reason is not renewed); after it, it is, and is
        # avoided again.
        router.avoided_because = None
        async with router.connection():
            pass
        assert router.avoided_because is None
        await asyncio.sleep(0.6)
        async with router.connection():
            pass
        assert seen[-1] == "primary" and router.avoided_because.startswith("unreachable")
    finally:
        await replica.close()
