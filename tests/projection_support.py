"""Helpers for the projection tests (integration and fault drills): more kinds of streams (failed,
model registration, erasure), appending them, raw events the domain would refuse, a worker with short
timings, waiting for its checkpoint, the read tables' row counts, and who holds or waits on its locks."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from db.store import APPEND_LOCK_KEY, AppendRequest, EventStore
from domain.chain import GENESIS_HASH, ChainedRecord, link, to_microseconds
from domain.events import BlobErased, ModelRef, ModelRegistered, PredictionFailed
from domain.streams import erasure_stream_id, model_stream_id
from projections.worker import ProjectionRunner, projection_lock_key
from tests.factories import MODEL, prediction_request


def failed_request(*, label: str = "") -> AppendRequest:
    request = prediction_request(label=label)
    failed = PredictionFailed(error_code="non_finite_output", message="the model answered NaN", model=MODEL,
                              device="/device:CPU:0")
    return AppendRequest(
        stream_id=request.stream_id,
        expected_version=0,
        events=[request.events[0], failed],
        metadata=request.metadata,
        blobs=request.blobs,
    )


def model_registration() -> AppendRequest:
    # As the service registers a model: the artifact is kept as a blob under its digest.
    artifact = b"a test model artifact"
    digest = hashlib.sha256(artifact).digest()
    model = ModelRef(name=MODEL.name, version=MODEL.version, sha256=digest.hex())
    registered = ModelRegistered(model=model, size_bytes=len(artifact), input_shape=[28, 28, 1],
                                 output_kind="vector", num_classes=10, runtime={"tensorflow": "test"})
    return AppendRequest(stream_id=model_stream_id(model.sha256), expected_version=0, events=[registered],
                         blobs={digest: artifact})


def erasure(blob_sha256: str) -> AppendRequest:
    return AppendRequest(stream_id=erasure_stream_id(blob_sha256), expected_version=0,
                         events=[BlobErased(blob_sha256=blob_sha256, reason="test")])


async def append(store: EventStore, *requests: AppendRequest) -> int:
    """Append and return the head position; fails the test on any refusal."""
    outcomes = await store.append(list(requests))
    for outcome in outcomes:
        assert hasattr(outcome, "head_position"), outcome
    return outcomes[-1].head_position  # type: ignore[union-attr]


async def append_raw(
    connection: asyncpg.Connection,
    event_type: str,
    data: str,
    *,
    stream_id: uuid.UUID | None = None,
    stream_version: int = 1,
    schema_version: int = 1,
    metadata: str = "{}",
) -> int:
    """Append one event the domain would refuse to encode (unknown type, bad data), correctly
    chained and without a NOTIFY. Returns its position."""
    stream_id = stream_id or uuid.uuid4()
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        head = await connection.fetchrow("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
        position = (head["position"] if head else 0) + 1
        previous = bytes(head["hash"]) if head else GENESIS_HASH
        recorded_at = await connection.fetchval("SELECT clock_timestamp()")
        record = ChainedRecord(position=position, stream_id=str(stream_id), stream_version=stream_version,
                               event_type=event_type, schema_version=schema_version,
                               recorded_at_us=to_microseconds(recorded_at), data=data, metadata=metadata)
        await connection.execute(
            "INSERT INTO events (position, stream_id, stream_version, event_type, schema_version, data, metadata,"
            " recorded_at, hash) VALUES ($1, $2, $3, $4, $5, $6::json, $7::json, $8, $9)",
            position, stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at,
            link(previous, record),
        )
    return position


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0, interval_s: float = 0.02) -> float:
    """Wait until `check()` is true; returns the seconds it took. Fails after the timeout."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not true within {timeout_s} s")
        await asyncio.sleep(interval_s)


def runner_for(dsn: str, **options) -> ProjectionRunner:
    """A projection worker that polls, elects and backs off within a test's patience."""
    options.setdefault("poll_interval_s", 0.2)
    options.setdefault("lock_poll_s", 0.1)
    options.setdefault("backoff_initial_s", 0.05)
    options.setdefault("backoff_max_s", 0.5)
    return ProjectionRunner(dsn, **options)


async def is_active(runner: ProjectionRunner) -> bool:
    return runner.is_active


async def table_counts(connection) -> tuple[int, int, int]:
    row = await connection.fetchrow(
        "SELECT (SELECT count(*) FROM inputs), (SELECT count(*) FROM predictions),"
        " (SELECT count(*) FROM projection_errors)"
    )
    return tuple(row)  # type: ignore[return-value]


async def tracked_position_of(connection: asyncpg.Connection | asyncpg.Pool) -> int:
    return await connection.fetchval("SELECT position FROM projection_tracking WHERE name = 'read_model'")


async def head_of(connection: asyncpg.Connection | asyncpg.Pool) -> int:
    return await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")


async def caught_up(connection: asyncpg.Connection | asyncpg.Pool, timeout_s: float = 5.0) -> None:
    head = await head_of(connection)
    await eventually(lambda: _at_least(connection, head), timeout_s)


async def _at_least(connection: asyncpg.Connection | asyncpg.Pool, position: int) -> bool:
    return await tracked_position_of(connection) >= position


async def waiting_on_lock(connection: asyncpg.Connection, application_name: str = "projection:read_model") -> bool:
    """Is a worker's backend blocked on a heavyweight lock (i.e. mid-batch behind a test's lock)?"""
    return bool(
        await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
            " AND datname = current_database()",
            application_name,
        )
    )


async def lock_holders(connection: asyncpg.Connection) -> int:
    """Sessions holding the read model's projection lock."""
    key = projection_lock_key("read_model")
    # A bigint advisory key shows as (classid = high 32 bits, objid = low 32 bits, objsubid = 1).
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    return await connection.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND classid::bigint = $1 AND objid::bigint = $2 AND database = (SELECT oid FROM pg_database"
        " WHERE datname = current_database())",
        unsigned >> 32,
        unsigned & 0xFFFFFFFF,
    )


def digest_of(request: AppendRequest) -> str:
    return hashlib.sha256(next(iter(request.blobs.values()))).hexdigest()
