"""Tamper evidence outside the chain: the signing key, and erasure that keeps the chain intact
(signed checkpoints: test_tree_integrator.py and tests/api/test_verify_end_to_end.py)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import timedelta

import asyncpg
import pytest

from db.store import Committed, EventStore
from domain.chain import ChainedRecord, find_break, link, to_microseconds
from projections.checkpoints import load_or_create_key
from projections.audit_checks import original_bytes
from projections.verify import verify
from usecases.erase import ErasureRefused, erase
from tests.factories import prediction_request


async def fill(app_pool, n: int = 4) -> list[Committed]:
    outcomes = await EventStore(app_pool).append([prediction_request(label=str(i)) for i in range(n)])
    assert all(isinstance(o, Committed) for o in outcomes)
    return outcomes  # type: ignore[return-value]


async def test_the_key_file_is_private_and_stable(tmp_path):
    first = load_or_create_key(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    second = load_or_create_key(tmp_path / "k.pem")
    assert first.public_key().public_bytes_raw() == second.public_key().public_bytes_raw()


async def test_erasure_deletes_the_bytes_records_why_and_keeps_the_chain(app_pool, database, owner):
    committed = await fill(app_pool, 2)
    request_event = committed[0].events[0].decode()
    digest = request_event.blob_sha256
    result = await erase(database.owner_dsn, digest, "retention: 30 days")
    assert await owner.fetchval("SELECT count(*) FROM blobs WHERE sha256 = $1", bytes.fromhex(digest)) == 0
    erased = result.events[0].decode()
    assert erased.blob_sha256 == digest and erased.reason == "retention: 30 days"
    rows = await EventStore(app_pool).read_all(0, 100)
    assert find_break((e.chained(), e.hash) for e in rows)[0] is None
    with pytest.raises(ErasureRefused, match="already erased"):
        await erase(database.owner_dsn, digest, "again")
    with pytest.raises(ErasureRefused, match="no upload"):
        await erase(database.owner_dsn, hashlib.sha256(b"never uploaded").hexdigest(), "x")


async def test_only_the_erasure_path_may_delete_a_blob(app_pool, owner):
    committed = await fill(app_pool, 1)
    digest = bytes.fromhex(committed[0].events[0].decode().blob_sha256)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_pool.execute("DELETE FROM blobs WHERE sha256 = $1", digest)  # the service's role
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner.execute("DELETE FROM blobs WHERE sha256 = $1", digest)  # even a superuser, directly
    async with owner.transaction():  # naming another blob in the flag does not open this one
        await owner.execute("SELECT set_config('audit.erasing_blob', $1, true)", "00" * 32)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await owner.execute("DELETE FROM blobs WHERE sha256 = $1", digest)


# --- what the chain alone does not show (issue 17, item 4) ----------------------------------------


async def test_verify_reports_an_event_recorded_before_its_predecessor(app_pool, database, owner):
    """A superuser (the only one left who can insert by hand) adds a correctly hashed event
    dated before the head: the chain verifies, the clock does not."""
    committed = await fill(app_pool, 2)
    assert (await verify(database.owner_dsn)).ok
    head = committed[-1].events[-1]
    backdated = head.recorded_at - timedelta(seconds=1)
    record = ChainedRecord(position=head.position + 1, stream_id=str(uuid.uuid4()), stream_version=1,
                           event_type="SomethingNew", schema_version=1,
                           recorded_at_us=to_microseconds(backdated), data="{}", metadata="{}")
    await owner.execute(
        "INSERT INTO events (position, stream_id, stream_version, event_type, schema_version, data, metadata,"
        " recorded_at, hash) VALUES ($1, $2::uuid, 1, $3, 1, '{}', '{}', $4, $5)",
        record.position, record.stream_id, record.event_type, backdated, link(head.hash, record),
    )
    report = await verify(database.owner_dsn)
    assert report.chain_break is None and not report.ok
    assert report.problem.startswith(f"recorded_at goes back in time at position {head.position + 1}:"), report.problem


@pytest.mark.parametrize("named", [True, False], ids=["an-uploads-blob", "a-blob-no-event-names"])
async def test_verify_reports_a_blob_whose_bytes_do_not_match_its_digest(app_pool, database, owner, named):
    committed = await fill(app_pool, 2)
    notes: list[str] = []
    assert (await verify(database.owner_dsn, outside_checks=[original_bytes(notes)])).ok
    if named:
        digest = committed[1].events[0].decode().blob_sha256
        async with owner.transaction():
            await owner.execute("ALTER TABLE blobs DISABLE TRIGGER USER")
            await owner.execute("UPDATE blobs SET content = 'other bytes', size_bytes = 11 WHERE sha256 = $1",
                                bytes.fromhex(digest))
            await owner.execute("ALTER TABLE blobs ENABLE TRIGGER USER")
    else:
        digest = hashlib.sha256(b"what the digest says").hexdigest()
        await owner.execute("INSERT INTO blobs (sha256, content, size_bytes) VALUES ($1, 'other bytes', 11)",
                            bytes.fromhex(digest))
    report = await verify(database.owner_dsn, outside_checks=[original_bytes(notes)])
    assert not report.ok and f"blob {digest}" in report.problem and "does not match its digest" in report.problem

