"""The standalone projection worker process (`python -m cli project`) killed with SIGKILL mid-batch
(the standby takes over) and stopped with SIGTERM mid-batch (it drains its batch first)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import asyncpg

from db.store import EventStore
from harness.live import ROOT
from tests.factories import prediction_request
from tests.projection_support import (
    append,
    caught_up,
    tracked_position_of,
    eventually,
    is_active,
    lock_holders,
    runner_for,
    table_counts,
    waiting_on_lock,
)


def _spawn_worker(database, **env) -> subprocess.Popen:
    environment = {
        **os.environ,
        "DATABASE_URL": database.owner_dsn,
        "APP_DATABASE_URL": database.app_dsn,
        "PROJECTION_POLL_S": "0.2",
        "PROJECTION_LOCK_POLL_S": "0.1",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    environment.setdefault("PROJECTION_BATCH_SIZE", "7")
    return subprocess.Popen([sys.executable, "-m", "cli", "project"], cwd=ROOT,
                            env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_killed_worker_process_resumes_and_the_standby_takes_over(database, app_pool, owner):
    store = EventStore(app_pool)
    await append(store, *[prediction_request(label=str(i)) for i in range(20)])
    blocker = await asyncpg.connect(database.owner_dsn)
    process = _spawn_worker(database)
    standby = runner_for(database.app_dsn, batch_size=7)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
            await eventually(lambda: waiting_on_lock(owner), timeout_s=8)
            await standby.start()
            await asyncio.sleep(0.3)
            assert not standby.is_active and await lock_holders(owner) == 1
            process.send_signal(signal.SIGKILL)
            process.wait(5)
        # The killed worker's backend finds its client gone once its statement gets the lock,
        # rolls back and drops the projection lock: the standby takes over.
        took = await eventually(lambda: is_active(standby), timeout_s=15)
        assert took < 15
        await caught_up(owner)
        assert await table_counts(owner) == (20, 20, 0)
        positions = [r[0] for r in await owner.fetch("SELECT position FROM predictions ORDER BY position")]
        assert positions == list(range(2, 41, 2))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        await standby.stop()
        await blocker.close()


async def test_sigterm_drains_the_standalone_worker(database, app_pool, owner):
    store = EventStore(app_pool)
    await append(store, *[prediction_request() for _ in range(5)])
    blocker = await asyncpg.connect(database.owner_dsn)
    process = _spawn_worker(database)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
            await eventually(lambda: waiting_on_lock(owner), timeout_s=8)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            assert process.poll() is None  # still finishing its batch
        assert await asyncio.to_thread(process.wait, 10) == 0
        assert await tracked_position_of(owner) == 7  # its batch of 7 events was committed, then it stopped
        assert await lock_holders(owner) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        await blocker.close()
