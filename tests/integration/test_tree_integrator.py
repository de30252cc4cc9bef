"""The tree integrator against PostgreSQL: tiles, roots, proofs and checkpoints equal a
recomputation from the events; a kill resumes exactly; tampering is refused, with evidence."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from db.store import Committed, EventStore
from domain import merkle
from domain.signed_note import NoteError, parse_signed_note
from projections import tree_store
from projections.checkpoints import (
    NoteKey,
    chain_head_of,
    filed_checkpoints,
    load_or_create_key,
    open_checkpoint,
    rotate_key,
)
from projections.tree import TreeIntegrator
from tests.factories import prediction_request
from tests.projection_support import eventually

pytestmark = pytest.mark.timeout(120)


async def fill(app_pool, n: int) -> list[Committed]:
    outcomes = await EventStore(app_pool).append([prediction_request(label=str(i)) for i in range(n)])
    assert all(isinstance(o, Committed) for o in outcomes)
    return outcomes  # type: ignore[return-value]


async def leaves_from_events(connection) -> list[bytes]:
    rows = await tree_store.leaf_rows(connection, 0, 10**9)
    return [merkle.leaf_hash(tree_store.entry_of(row)) for row in rows]


def integrator(database, tmp_path, **options) -> TreeIntegrator:
    options = {"interval_s": 0.05, "poll_interval_s": 0.05, "lock_poll_s": 0.05, **options}
    return TreeIntegrator(
        database.app_dsn, key_path=tmp_path / "key.pem", checkpoint_dir=tmp_path / "checkpoints", **options
    )


async def signed_size(owner) -> int:
    return await owner.fetchval("SELECT coalesce(max(tree_size), -1) FROM tlog_checkpoints")


async def test_tiles_roots_and_proofs_equal_a_recomputation_from_the_events(app_pool, owner, database, tmp_path):
    await fill(app_pool, 300)  # 600 events: two full level-0 tiles and a partial one
    worker = integrator(database, tmp_path, batch_size=97)  # batches that straddle tile edges
    await worker.start()
    try:
        await eventually(lambda: _signed_at_least(owner, 600), timeout_s=30)
    finally:
        await worker.stop()
    leaves = await leaves_from_events(owner)
    assert len(leaves) == 600
    state = await tree_store.tree_state(owner)
    assert state.size == 600 and state.root == merkle.root(leaves)
    tiles = {(r["level"], r["tile_index"]): bytes(r["hashes"]) for r in await owner.fetch("SELECT * FROM merkle_tiles")}
    assert tiles[(0, 0)] == b"".join(leaves[:256]) and tiles[(0, 1)] == b"".join(leaves[256:512])
    assert tiles[(0, 2)] == b"".join(leaves[512:600])
    assert tiles[(1, 0)] == merkle.root(leaves[:256]) + merkle.root(leaves[256:512])
    assert set(tiles) == {(0, 0), (0, 1), (0, 2), (1, 0)}
    rng = random.Random(7)
    for _ in range(40):
        size = rng.randint(1, 600)
        index = rng.randrange(size)
        proof = await tree_store.inclusion(owner, index, size)
        assert proof.proof == merkle.inclusion_proof(index, leaves[:size])
        assert proof.root_hash == merkle.root(leaves[:size]) and proof.leaf_hash == leaves[index]
        old = rng.randint(1, size)
        consistency = await tree_store.consistency(owner, old, size)
        assert consistency.proof == merkle.consistency_proof(old, leaves[:size])
    with pytest.raises(tree_store.MissingTiles):
        await tree_store.inclusion(owner, 0, 601)
    checkpoint = await tree_store.latest_checkpoint(owner)
    key = NoteKey(f"prediction-audit/{await owner.fetchval('SELECT log_id FROM log_identity')}",
                  load_or_create_key(tmp_path / "key.pem"))
    opened = open_checkpoint(checkpoint.note, [key.verifier_key])
    assert (opened.size, opened.root_hash) == (600, merkle.root(leaves))
    head = await owner.fetchval("SELECT hash FROM events WHERE position = 600")
    assert chain_head_of(opened) == bytes(head)
    assert await tree_store.published_keys(owner) == [key.verifier_key]
    assert filed_checkpoints(tmp_path / "checkpoints", str(await owner.fetchval("SELECT log_id FROM log_identity")))[-1] == checkpoint.note


async def _signed_at_least(owner, size: int) -> bool:
    return await signed_size(owner) >= size


async def test_every_checkpoint_is_consistent_with_the_one_before(app_pool, owner, database, tmp_path):
    worker = integrator(database, tmp_path, batch_size=50)
    await worker.start()
    try:
        for _ in range(6):
            await fill(app_pool, 40)
            await eventually(lambda: _all_signed(owner), timeout_s=30)
    finally:
        await worker.stop()
    leaves = await leaves_from_events(owner)
    checkpoints = await tree_store.all_checkpoints(owner)
    # Each fill is waited for, so each head was signed (and maybe sizes between: batches of 50).
    assert {80, 160, 240, 320, 400, 480} <= {c.tree_size for c in checkpoints}
    for older, newer in zip(checkpoints, checkpoints[1:]):
        assert newer.root_hash == merkle.root(leaves[: newer.tree_size])
        if older.tree_size:
            merkle.verify_consistency(older.tree_size, newer.tree_size, older.root_hash, newer.root_hash,
                                      merkle.consistency_proof(older.tree_size, leaves[: newer.tree_size]))


async def test_full_tiles_never_change_and_tiles_are_never_deleted(app_pool, owner, database, tmp_path):
    await fill(app_pool, 140)
    worker = integrator(database, tmp_path)
    await worker.start()
    try:
        await eventually(lambda: _signed_at_least(owner, 280), timeout_s=30)
    finally:
        await worker.stop()
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner.execute("UPDATE merkle_tiles SET hashes = hashes WHERE level = 0 AND tile_index = 0")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner.execute("DELETE FROM merkle_tiles WHERE level = 0 AND tile_index = 1")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # a partial tile may only grow
        await owner.execute("UPDATE merkle_tiles SET hashes = substring(hashes FROM 33) WHERE level = 0 AND tile_index = 1")
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner.execute("DELETE FROM tlog_checkpoints")


async def test_a_killed_integrator_resumes_where_its_last_commit_left_it(app_pool, owner, database, tmp_path):
    await fill(app_pool, 500)
    first = integrator(database, tmp_path, batch_size=64)
    await first.start()
    await eventually(lambda: _tree_size_at_least(owner, 200), timeout_s=30)
    first._task.cancel()  # a kill mid-run: no drain, no final signature
    await asyncio.gather(first._task, return_exceptions=True)
    await owner.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'projection:merkle_tree'"
    )
    await fill(app_pool, 100)
    second = integrator(database, tmp_path, batch_size=64)
    await second.start()
    try:
        await eventually(lambda: _signed_at_least(owner, 1200), timeout_s=30)
    finally:
        await second.stop()
    leaves = await leaves_from_events(owner)
    assert (await tree_store.tree_state(owner)).root == merkle.root(leaves)
    checkpoints = await tree_store.all_checkpoints(owner)
    for older, newer in zip(checkpoints, checkpoints[1:]):
        assert newer.root_hash == merkle.root(leaves[: newer.tree_size])


async def _tree_size_at_least(owner, size: int) -> bool:
    return await owner.fetchval("SELECT size FROM merkle_tree") >= size


async def test_a_rewritten_event_and_tree_is_refused_with_the_reason_and_evidence(app_pool, owner, database, tmp_path):
    await fill(app_pool, 20)
    worker = integrator(database, tmp_path)
    await worker.start()
    await eventually(lambda: _signed_at_least(owner, 40), timeout_s=30)
    await worker.stop()
    signed = await tree_store.latest_checkpoint(owner)

    # A superuser rewrites event 5 and the stored tree to match it: leaf, tiles, edge and root.
    async with owner.transaction():
        await owner.execute("SET LOCAL session_replication_role = replica")  # no triggers
        await owner.execute(
            "UPDATE events SET data = replace(data::text, 'digit', 'DIGIT')::json WHERE position = 5"
        )
        leaves = await leaves_from_events(owner)
        await owner.execute("UPDATE merkle_tiles SET hashes = $1 WHERE level = 0 AND tile_index = 0", b"".join(leaves))
        forged = merkle.TreeBuilder()
        for leaf in leaves:
            forged.append(leaf)
        await owner.execute("UPDATE merkle_tree SET edge = $1, root = $2", b"".join(forged.edge), forged.root())

    await fill(app_pool, 5)
    worker = integrator(database, tmp_path)
    await worker.start()
    try:
        await eventually(lambda: _refused(owner), timeout_s=30)
        assert worker.refusing and "does not extend the signed tree of size 40" in worker.refusing
    finally:
        await worker.stop()
    assert await signed_size(owner) == 40  # nothing was signed on top of it
    refusal = await tree_store.open_refusal(owner)
    assert refusal.signed_size == 40 and refusal.new_size == 50 and "does not extend" in refusal.reason
    evidence = await owner.fetchval("SELECT evidence::text FROM tlog_refusals")
    assert signed.root_hash.hex() in evidence and "proof" in evidence


async def _refused(owner) -> bool:
    return await owner.fetchval("SELECT count(*) FROM tlog_refusals") > 0


async def test_a_rotated_key_cosigns_the_next_checkpoint_and_both_stay_published(app_pool, owner, database, tmp_path):
    await fill(app_pool, 3)
    worker = integrator(database, tmp_path)
    await worker.start()
    try:
        await eventually(lambda: _signed_at_least(owner, 6), timeout_s=30)
        origin = f"prediction-audit/{await owner.fetchval('SELECT log_id FROM log_identity')}"
        old, new = rotate_key(tmp_path / "key.pem", origin)
        await fill(app_pool, 1)
        await eventually(lambda: _signed_at_least(owner, 8), timeout_s=30)
        await fill(app_pool, 1)
        await eventually(lambda: _signed_at_least(owner, 10), timeout_s=30)
    finally:
        await worker.stop()
    by_size = {c.tree_size: c for c in await tree_store.all_checkpoints(owner)}
    _, both = parse_signed_note(by_size[8].note)
    assert len(both) == 2
    open_checkpoint(by_size[8].note, [old])
    open_checkpoint(by_size[8].note, [new])
    open_checkpoint(by_size[10].note, [new])
    with pytest.raises(NoteError, match="no trusted key"):
        open_checkpoint(by_size[10].note, [old])
    assert set(await tree_store.published_keys(owner)) == {old, new}


async def test_a_rewritten_event_fails_its_inclusion_proof_against_every_checkpoint(app_pool, owner, database, tmp_path):
    worker = integrator(database, tmp_path)
    await worker.start()
    try:
        for _ in range(3):
            await fill(app_pool, 5)
            await eventually(lambda: _all_signed(owner), timeout_s=30)
    finally:
        await worker.stop()
    async with owner.transaction():
        await owner.execute("SET LOCAL session_replication_role = replica")
        await owner.execute("UPDATE events SET data = ('{\"tampered\":true,' || substr(data::text, 2))::json"
                            " WHERE position = 5")
    (row,) = await tree_store.leaf_rows(owner, 4, 1)
    current_leaf = merkle.leaf_hash(tree_store.entry_of(row))
    checkpoints = [c for c in await tree_store.all_checkpoints(owner) if c.tree_size >= 5]
    assert len(checkpoints) >= 3
    for checkpoint in checkpoints:
        proof = await tree_store.inclusion(owner, 4, checkpoint.tree_size)
        merkle.verify_inclusion(4, checkpoint.tree_size, proof.leaf_hash, proof.proof, checkpoint.root_hash)
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(4, checkpoint.tree_size, current_leaf, proof.proof, checkpoint.root_hash)


async def _all_signed(owner) -> bool:
    return await signed_size(owner) == await owner.fetchval("SELECT max(position) FROM events")
