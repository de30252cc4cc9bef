"""The asyncpg event store: group appends under one advisory lock, reads by position and stream.

Ordering: every append takes one transaction-scoped advisory lock before it reads the head and
assigns positions, so positions are gap-free, commit in order and form a single hash chain.
Conflicts (stream version, idempotency key) are checked under the lock before positions are
assigned, so one request's conflict fails only that request; any other error in a group is retried
with each request in a transaction of its own. All of that runs in PostgreSQL, in the
`append_events` function, so a group costs one round trip; the hashes it writes follow
domain/chain.py, which verifiers run.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from domain.chain import GENESIS_HASH, MAX_PAYLOAD_BYTES, ChainedRecord, to_microseconds
from domain.events import (
    SCHEMA_VERSIONS,
    Event,
    decode_event,
    encode_event,
    encode_metadata,
    event_type,
)

log = logging.getLogger(__name__)

APPEND_LOCK_KEY = 0x61756474  # "audt"; append_events (db/migrations) takes the same lock
NOTIFY_CHANNEL = "audit_events"

# Errors that mean "the database is not there", as opposed to "this request was wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    asyncpg.LockNotAvailableError,
    asyncpg.QueryCanceledError,
    asyncpg.IdleInTransactionSessionTimeoutError,
)


class StoredEvent(msgspec.Struct, frozen=True):
    position: int
    stream_id: uuid.UUID
    stream_version: int
    event_type: str
    schema_version: int
    data: str
    metadata: str
    recorded_at: datetime
    hash: bytes

    def chained(self) -> ChainedRecord:
        return ChainedRecord(
            position=self.position,
            stream_id=str(self.stream_id),
            stream_version=self.stream_version,
            event_type=self.event_type,
            schema_version=self.schema_version,
            recorded_at_us=to_microseconds(self.recorded_at),
            data=self.data,
            metadata=self.metadata,
        )

    def decode(self) -> Event:
        return decode_event(self.event_type, self.schema_version, self.data)


class AppendRequest(msgspec.Struct):
    """One request's events for one stream, appended all or nothing."""

    stream_id: uuid.UUID
    expected_version: int  # events the stream must hold already (0: a new stream)
    events: list[Any]  # domain Event structs
    metadata: dict[str, Any] = {}
    blobs: dict[bytes, bytes] = {}  # sha256 digest -> original bytes
    idempotency_key: str | None = None
    request_sha256: bytes | None = None
    # Blobs this request deletes (the erasure path: its events record why). Only a role with
    # DELETE on blobs may do it; the service's own role may not.
    erase_blobs: list[bytes] = []


class Committed(msgspec.Struct, frozen=True):
    stream_id: uuid.UUID
    events: list[StoredEvent]
    head_position: int
    head_hash: bytes


class Replayed(msgspec.Struct, frozen=True):
    """The idempotency key was used before for the same request: nothing was appended."""

    stream_id: uuid.UUID


class AppendError(Exception):
    """This request was refused; the rest of its group is unaffected."""


class VersionConflict(AppendError):
    def __init__(self, stream_id: uuid.UUID, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id} holds {actual} events, the append expected {expected}")
        self.stream_id, self.expected, self.actual = stream_id, expected, actual


class IdempotencyKeyReused(AppendError):
    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency key {key!r} was already used for a different request")
        self.key = key


class DatabaseUnavailable(Exception):
    """The database could not be reached or timed out; the outcome of the append is unknown."""


class AppendRejected(AppendError):
    """PostgreSQL refused this request's rows (e.g. a value it cannot store)."""


class EventTooLarge(AppendRejected):
    """An event whose canonical bytes would not fit a transparency-log entry (65,535 bytes)."""


class NotApplied(AppendError):
    """An all-or-nothing group was rolled back because another of its requests was refused."""


class _RollBack(Exception):
    """Raised inside the transaction of an all-or-nothing group to undo it."""


AppendOutcome = Committed | Replayed | AppendError | DatabaseUnavailable

# Every column of an event, in StoredEvent's field order.
EVENT_COLUMNS = "position, stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at, hash"
_AFTER_SQL = "SELECT {columns} FROM events WHERE position > $1 AND position <= $3 ORDER BY position LIMIT $2"
_LAST_POSITION = 2**63 - 1

_HEAD_SQL = "SELECT position, hash FROM events ORDER BY position DESC LIMIT 1"

# The whole group append: lock, clock, checks, positions, hashes, inserts and NOTIFY, in one
# statement (db/migrations/20261126150000_append_function.sql), so in autocommit it is one round
# trip, COMMIT included.
_APPEND_SQL = "SELECT * FROM append_events($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"


def stored_event(row: asyncpg.Record) -> StoredEvent:
    """An event from a row that has its columns by name (in any order)."""
    return StoredEvent(
        position=row["position"],
        stream_id=row["stream_id"],
        stream_version=row["stream_version"],
        event_type=row["event_type"],
        schema_version=row["schema_version"],
        data=row["data"],
        metadata=row["metadata"],
        recorded_at=row["recorded_at"],
        hash=bytes(row["hash"]),
    )


async def fetch_events_after(
    connection: asyncpg.Connection | asyncpg.Pool,
    after: int,
    limit: int,
    *,
    up_to: int | None = None,
    columns: str = EVENT_COLUMNS,
) -> list[asyncpg.Record]:
    """The events after position `after` (and at most `up_to`), in position order: the one
    query for reading the log forward, whatever subset of the columns a reader needs."""
    return await connection.fetch(
        _AFTER_SQL.format(columns=columns), after, limit, _LAST_POSITION if up_to is None else up_to
    )


async def read_events(
    connection: asyncpg.Connection | asyncpg.Pool, after: int, limit: int, *, up_to: int | None = None
) -> list[StoredEvent]:
    """Whole events after `after`, in position order."""
    return [StoredEvent(*row) for row in await fetch_events_after(connection, after, limit, up_to=up_to)]


class EventStore:
    """Reads and group appends over an asyncpg pool (as the service's non-superuser role)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._releasing: set[asyncio.Task[None]] = set()

    def _release_later(self, connection: asyncpg.Connection) -> None:
        task = asyncio.get_running_loop().create_task(self.pool.release(connection))
        self._releasing.add(task)  # a reference until it is done, so it cannot be collected midway
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # asyncpg terminates a connection it cannot reset; the pool opens another.
            log.warning("returning a connection to the pool failed: %r", error)

    # ---- appends -------------------------------------------------------------------------

    async def append(self, requests: Sequence[AppendRequest], *, all_or_nothing: bool = False) -> list[AppendOutcome]:
        """Append a group of requests in one transaction; one outcome per request, in order.

        By default each request stands alone (a conflict fails only its own request). With
        `all_or_nothing`, any refused request rolls the whole group back: the others answer
        `NotApplied` (a bulk import whose idempotency key turns out to be taken must leave no trace).
        """
        try:
            return await self._append_in_one_transaction(requests, all_or_nothing=all_or_nothing)
        except CONNECTION_ERRORS as error:
            unavailable = DatabaseUnavailable(f"database unavailable: {error}")
            return [unavailable for _ in requests]
        except asyncpg.PostgresError as error:
            if len(requests) == 1 or all_or_nothing:
                return [AppendRejected(f"the database refused the append: {error}") for _ in requests]
        # Something in the group was refused as a whole: retry each request alone so that only
        # the culprit fails.
        outcomes: list[AppendOutcome] = []
        for request in requests:
            outcomes.extend(await self.append([request]))
        return outcomes

    async def _append_in_one_transaction(
        self, requests: Sequence[AppendRequest], *, all_or_nothing: bool = False
    ) -> list[AppendOutcome]:
        outcomes: list[AppendOutcome | None] = [None] * len(requests)
        # Encode before the round trip: a value that cannot be encoded fails its own request only.
        sent: list[tuple[int, list[tuple[str, int, str]], str]] = []
        shared_metadata: tuple[object, str] | None = None  # a bulk request's 10,000 appends share one dict
        for index, request in enumerate(requests):
            if not request.events:
                outcomes[index] = AppendRejected("an append needs at least one event")
                continue
            try:
                events = [(event_type(e), SCHEMA_VERSIONS[event_type(e)], encode_event(e)) for e in request.events]
                if shared_metadata is None or shared_metadata[0] is not request.metadata:
                    shared_metadata = (request.metadata, encode_metadata(request.metadata))
                encoded_metadata = shared_metadata[1]
            except (TypeError, ValueError, KeyError, msgspec.EncodeError) as error:
                outcomes[index] = AppendRejected(f"the events cannot be encoded: {error}")
                continue
            largest = max(len(data) for _, _, data in events) + len(encoded_metadata)
            if largest * 4 > MAX_PAYLOAD_BYTES:  # UTF-8 takes up to 4 bytes a character: count bytes only then
                largest = max(len(data.encode()) for _, _, data in events) + len(encoded_metadata.encode())
            if largest > MAX_PAYLOAD_BYTES:
                outcomes[index] = EventTooLarge(
                    f"an event's data and metadata take {largest:,} bytes; at most {MAX_PAYLOAD_BYTES:,} fit a log entry"
                )
                continue
            sent.append((index, events, encoded_metadata))
        if not sent or (all_or_nothing and len(sent) < len(requests)):
            return [outcome or NotApplied("the group was not appended") for outcome in outcomes]

        stream_ids, expected, keys, fingerprints, metadata, counts = [], [], [], [], [], []
        types, schema_versions, data = [], [], []
        blob_requests, blob_digests, blob_contents = [], [], []
        for number, (index, events, encoded_metadata) in enumerate(sent, start=1):
            request = requests[index]
            stream_ids.append(request.stream_id)
            expected.append(request.expected_version)
            keys.append(request.idempotency_key)
            fingerprints.append(request.request_sha256)
            metadata.append(encoded_metadata)
            counts.append(len(events))
            for name, schema_version, encoded in events:
                types.append(name)
                schema_versions.append(schema_version)
                data.append(encoded)
            for digest, content in request.blobs.items():
                blob_requests.append(number)
                blob_digests.append(digest)
                blob_contents.append(content)
        arguments = (stream_ids, expected, keys, fingerprints, metadata, counts, types, schema_versions, data,
                     blob_requests, blob_digests, blob_contents)
        erasures = [digest for index, _, _ in sent for digest in requests[index].erase_blobs]

        rolled_back = False
        if not erasures and not all_or_nothing:
            # The upload path: one statement in autocommit, and the connection goes back to the
            # pool without this append waiting for it. asyncpg's release is shielded in a task,
            # so awaiting it costs two more turns of the event loop, each behind every callback
            # already queued, and the next group waits for them (BENCHMARKS.md, "Decisions").
            connection = await self.pool.acquire()
            try:
                rows = await connection.fetch(_APPEND_SQL, *arguments)
            finally:
                self._release_later(connection)
        else:
            async with self.pool.acquire() as connection:
                try:
                    async with connection.transaction():
                        rows = await connection.fetch(_APPEND_SQL, *arguments)
                        if all_or_nothing and any(row["outcome"] != "committed" for row in rows):
                            raise _RollBack()
                        for digest in erasures:
                            # The blob table's DELETE trigger lets through exactly the blob named here.
                            await connection.execute("SELECT set_config('audit.erasing_blob', $1, true)", digest.hex())
                            await connection.execute("DELETE FROM blobs WHERE sha256 = $1", digest)
                except _RollBack:
                    rolled_back = True

        # Committed: only now may anyone be told.
        committed: list[tuple[int, list[StoredEvent]]] = []
        for row, (index, events, encoded_metadata) in zip(rows, sent, strict=True):
            request = requests[index]
            outcome = row["outcome"]
            if outcome == "committed" and rolled_back:
                outcomes[index] = NotApplied("rolled back with its group, which another request's refusal undid")
            elif outcome == "committed":
                first_version = row["stream_version"] - len(events)
                stored = [
                    StoredEvent(
                        position=position,
                        stream_id=request.stream_id,
                        stream_version=first_version + offset,
                        event_type=name,
                        schema_version=schema_version,
                        data=encoded,
                        metadata=encoded_metadata,
                        recorded_at=row["recorded_at"],
                        hash=bytes(hash_),
                    )
                    for offset, ((name, schema_version, encoded), position, hash_) in enumerate(
                        zip(events, row["positions"], row["hashes"], strict=True), start=1
                    )
                ]
                committed.append((index, stored))
            elif outcome == "replayed":
                outcomes[index] = Replayed(row["stream_id"])
            elif outcome == "key_reused":
                outcomes[index] = IdempotencyKeyReused(request.idempotency_key or "")
            else:
                outcomes[index] = VersionConflict(request.stream_id, request.expected_version, row["stream_version"])
        if committed:
            head = committed[-1][1][-1]  # every committed request has events: the group's last one
            for index, stored in committed:
                outcomes[index] = Committed(requests[index].stream_id, stored, head.position, head.hash)
        return outcomes  # type: ignore[return-value]

    # ---- reads (a connection failure surfaces as DatabaseUnavailable) -------------------

    async def read_all(self, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        try:
            return await read_events(self.pool, after, limit)
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"database unavailable: {error}") from error

    async def read_stream(self, stream_id: uuid.UUID) -> list[StoredEvent]:
        rows = await self._fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 ORDER BY stream_version", stream_id
        )
        return [stored_event(row) for row in rows]

    async def read_stream_starts(self, stream_ids: Sequence[uuid.UUID], first: int = 2
                                 ) -> dict[uuid.UUID, tuple[int, list[Event]]]:
        """Each stream's version and its first `first` events, decoded (unknown ids are absent):
        for a writer that needs how a stream began and where it is now, not its whole history
        (bulk labels). Later events are counted, not read."""
        rows = await self._fetch(
            "SELECT stream_id, stream_version, event_type, schema_version,"
            " CASE WHEN stream_version <= $2 THEN data END FROM events WHERE stream_id = ANY($1::uuid[])"
            " ORDER BY stream_id, stream_version",
            list(stream_ids), first,
        )
        starts: dict[uuid.UUID, tuple[int, list[Event]]] = {}
        for stream_id, version, kind, schema_version, data in rows:
            _, events = starts.get(stream_id) or (0, [])
            if data is not None:
                events.append(decode_event(kind, schema_version, data))
            starts[stream_id] = (version, events)
        return starts

    async def prediction_facts(self, prediction_ids: Sequence[uuid.UUID]
                               ) -> dict[uuid.UUID, tuple[str, str, int | None, int | None, int]]:
        """What labelling needs of each prediction the read tables hold (unknown and not yet
        projected ids are absent): status, model sha256, likely class, output width (None when
        failed), and the stream's current version, read from the log itself. One indexed probe
        per id; reading and decoding the streams' first events cost bulk labels twice as much.
        The LIMIT keeps the probes: as a join or `= ANY(...)`, 10,000 ids of a million-row table
        got a parallel scan of all of it, 2-3 times slower."""
        rows = await self._fetch(
            "SELECT w.id, p.status, p.model_sha256, p.likely_class, cardinality(p.output),"
            " (SELECT max(e.stream_version) FROM events AS e WHERE e.stream_id = w.id)"
            " FROM unnest($1::uuid[]) AS w(id) CROSS JOIN LATERAL"
            " (SELECT * FROM predictions AS p WHERE p.prediction_id = w.id LIMIT 1) AS p",
            list(prediction_ids),
        )
        return {row[0]: (row[1], row[2], row[3], row[4], row[5]) for row in rows}

    async def find_events(self, places: Sequence[tuple[uuid.UUID, int]]) -> dict[tuple[uuid.UUID, int], StoredEvent]:
        """Events by (stream id, stream version)."""
        rows = await self._fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE (stream_id, stream_version) IN"
            " (SELECT * FROM unnest($1::uuid[], $2::int[]))",
            [stream for stream, _ in places], [version for _, version in places],
        )
        return {(event.stream_id, event.stream_version): event for event in (StoredEvent(*row) for row in rows)}

    async def stream_head(self, stream_id: uuid.UUID) -> int:
        """The position of the stream's latest event (0 for an unknown stream)."""
        rows = await self._fetch("SELECT coalesce(max(position), 0) AS position FROM events WHERE stream_id = $1", stream_id)
        return rows[0]["position"]

    async def head(self) -> tuple[int, bytes]:
        rows = await self._fetch(_HEAD_SQL)
        return (rows[0]["position"], bytes(rows[0]["hash"])) if rows else (0, GENESIS_HASH)

    async def read_blob(self, digest: bytes) -> bytes | None:
        rows = await self._fetch("SELECT content FROM blobs WHERE sha256 = $1", digest)
        return rows[0]["content"] if rows else None

    async def find_idempotency_key(self, key: str) -> tuple[bytes, uuid.UUID] | None:
        rows = await self._fetch("SELECT request_sha256, stream_id FROM idempotency_keys WHERE key = $1", key)
        return (bytes(rows[0]["request_sha256"]), rows[0]["stream_id"]) if rows else None

    async def log_id(self) -> uuid.UUID:
        rows = await self._fetch("SELECT log_id FROM log_identity")
        return rows[0]["log_id"]

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        try:
            return await self.pool.fetch(query, *args)
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"database unavailable: {error}") from error


def append_settings(*, lock_timeout_ms: int, statement_timeout_ms: int, idle_timeout_ms: int) -> dict[str, str]:
    """Server settings for the append path's connections: a stuck lock holder loses its session
    instead of stalling every writer. synchronous_commit stays on: a 2xx means durable."""
    return {
        "lock_timeout": str(lock_timeout_ms),
        "statement_timeout": str(statement_timeout_ms),
        "idle_in_transaction_session_timeout": str(idle_timeout_ms),
        "synchronous_commit": "on",
        # asyncpg prepares every statement; after five runs PostgreSQL may switch to a generic
        # plan chosen while the tables were empty (a scan), and keep it as they grow
        # (BENCHMARKS.md, "Decisions": server CPU per request grew 28-fold by 104k events).
        # append_events overrides it for its own statements, which are all index probes
        # (db/migrations/20261204040000_append_events_cached_plans.sql).
        "plan_cache_mode": "force_custom_plan",
        # Every statement here is a lookup or works on arrays whose joins the planner misjudges by
        # orders of magnitude, so JIT (on by default) would compile some of them with LLVM on every
        # call: 100-240 ms each for a bulk-label request, longer than the queries themselves.
        "jit": "off",
    }
