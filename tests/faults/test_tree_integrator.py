"""The tree integrator in a real worker process (`python -m cli project`) killed with SIGKILL in
the middle of its transaction: a restarted worker continues the tiles and the checkpoints, and
every checkpoint is consistent with the one before and with the events."""

from __future__ import annotations

import asyncio
import signal

import asyncpg

from db.store import EventStore
from domain import merkle
from projections import tree_store
from tests.factories import prediction_request
from tests.faults.test_projection_worker import _spawn_worker
from tests.projection_support import append, eventually, waiting_on_lock


async def _tree_size(owner) -> int:
    return await owner.fetchval("SELECT size FROM merkle_tree")


async def _signed(owner) -> int:
    return await owner.fetchval("SELECT coalesce(max(tree_size), 0) FROM tlog_checkpoints")


async def test_kill_9_mid_transaction_then_restart_continues_tiles_and_checkpoints(database, app_pool, owner, tmp_path):
    store = EventStore(app_pool)
    await append(store, *[prediction_request(label=str(i)) for i in range(400)])
    env = {"TREE_BATCH_SIZE": "97", "CHECKPOINT_INTERVAL_MS": "20", "PROJECTIONS": "off",
           "CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "CHECKPOINT_KEY": str(tmp_path / "key.pem")}
    first = _spawn_worker(database, **env)
    blocker = await asyncpg.connect(database.owner_dsn)
    try:
        await eventually(lambda: _signed_more_than(owner, 100), timeout_s=30)
        async with blocker.transaction():
            # The integrator writes a batch's tiles, then waits here to move the tree: killed mid-transaction.
            await blocker.execute("LOCK TABLE merkle_tree IN ACCESS EXCLUSIVE MODE")
            await append(store, *[prediction_request() for _ in range(100)])
            await eventually(lambda: waiting_on_lock(owner, "projection:merkle_tree"), timeout_s=10)
            first.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.wait, 5)
        killed_at = await _tree_size(owner)
        assert killed_at < 1000
        second = _spawn_worker(database, **env)
        try:
            await eventually(lambda: _signed_more_than(owner, 999), timeout_s=30)
        finally:
            second.send_signal(signal.SIGTERM)
            await asyncio.to_thread(second.wait, 10)
    finally:
        if first.poll() is None:
            first.kill()
        await blocker.close()
    rows = await tree_store.leaf_rows(owner, 0, 10_000)
    leaves = [merkle.leaf_hash(tree_store.entry_of(row)) for row in rows]
    assert len(leaves) == 1000 and (await tree_store.tree_state(owner)).root == merkle.root(leaves)
    stored = b"".join(bytes(r[0]) for r in await owner.fetch(
        "SELECT hashes FROM merkle_tiles WHERE level = 0 ORDER BY tile_index"))
    assert stored == b"".join(leaves)  # no leaf lost or doubled by the kill
    checkpoints = await tree_store.all_checkpoints(owner)
    assert any(c.tree_size < killed_at for c in checkpoints) and checkpoints[-1].tree_size == 1000
    for older, newer in zip(checkpoints, checkpoints[1:]):
        assert newer.root_hash == merkle.root(leaves[: newer.tree_size])
        if older.tree_size:
            merkle.verify_consistency(older.tree_size, newer.tree_size, older.root_hash, newer.root_hash,
                                      merkle.consistency_proof(older.tree_size, leaves[: newer.tree_size]))


async def _signed_more_than(owner, size: int) -> bool:
    return await _signed(owner) > size
