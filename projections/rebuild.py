"""Rebuild the read model from position 0 without downtime, then swap it in atomically.

1. Build fresh tables in a new schema (`read_model_create`), owned by the operator's role and
   granted to the service's, replaying events up to the live tracked position (bare tables first, the
   indexes and the foreign key added once the rows are in). The live tables keep answering and
   the live worker keeps running meanwhile.
2. Swap, in one transaction: lock the live tracking row (the first thing every worker batch
   locks, so this waits for the batch in hand and holds off the next one), apply the events
   between the rebuilt position and the live tracked position, lock the live tables (readers wait a
   moment, nobody fails), move them out and the new ones in, drop the old ones. The tracked position
   does not move: the worker carries on from it, on the new tables.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import asyncpg
import msgspec

from db.sql import quote_ident
from projections.bulk import BulkWriter, pages, pipeline
from projections.read_model import (
    TRACKING_TABLE,
    LIVE_SCHEMA,
    READ_MODEL,
    PreparedBatch,
    ReadModelWriter,
)

log = logging.getLogger(__name__)

REBUILD_LOCK_KEY = 0x72626C64  # "rbld": one rebuild at a time
# Locked in this order by the swap: the order readers take them in (`FROM predictions JOIN
# inputs`), so a reader holding one while the swap waits for it cannot deadlock with the swap.
READ_MODEL_TABLES = ("predictions", "inputs", "labels", "quality_cells", "projection_errors")


class RebuildReport(msgspec.Struct, frozen=True):
    position: int  # the tracked position the rebuilt tables were swapped in at
    events: int  # events replayed
    swap_events: int  # of which applied inside the swap transaction (caught up with the worker)
    skipped: int  # events stepped over (recorded in projection_errors)
    build_s: float
    swap_s: float
    swap_attempts: int


class RebuildError(Exception):
    pass


class _Progress:
    def __init__(self) -> None:
        self.position = 0
        self.events = 0
        self.skipped = 0


async def rebuild(
    owner_dsn: str,
    *,
    name: str = READ_MODEL,
    batch_size: int = 5000,
    lock_timeout_s: float = 1.0,
    swap_attempts: int = 10,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildReport:
    connection = await asyncpg.connect(owner_dsn)
    reader = await asyncpg.connect(owner_dsn)
    schema = f"read_model_rebuild_{uuid.uuid4().hex[:12]}"
    swapped = False
    try:
        if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", REBUILD_LOCK_KEY):
            raise RebuildError("another rebuild is running")
        started = time.perf_counter()
        # The build's commits need not wait for the disk: nothing reads the new tables before the
        # swap, whose own (synchronous) commit flushes the log up to and including them.
        await connection.execute("SET synchronous_commit = off")
        async with connection.transaction():
            await connection.execute(f"CREATE SCHEMA {quote_ident(schema)}")
            await connection.execute("SELECT read_model_create($1, false)", schema)
        bulk = BulkWriter(schema)
        done = _Progress()

        async def write(batch: PreparedBatch) -> None:
            async with connection.transaction():
                done.skipped += len(await bulk.write(connection, batch))
            done.position, done.events = batch.last, done.events + len(batch.events)

        # Catch up with the live tracked position (a moving target) before the swap, so that the swap
        # itself has only a few events left to apply while it holds the worker off.
        while True:
            target = await _live_position(connection, name)
            if target - done.position <= batch_size:
                break
            await pipeline(pages(reader, done.position, target, batch_size), write)
            if progress is not None:
                progress(done.position, target)
        await connection.execute("SELECT read_model_add_indexes($1)", schema)
        for table in READ_MODEL_TABLES:
            await connection.execute(f"ANALYZE {quote_ident(schema)}.{quote_ident(table)}")
        build_s = time.perf_counter() - started

        started = time.perf_counter()
        for attempt in range(1, swap_attempts + 1):
            try:
                position, applied, skipped = await _swap(connection, bulk.exact, schema, name, done.position, batch_size,
                                                         lock_timeout_s)
            except asyncpg.LockNotAvailableError:
                # Readers queue behind a waiting swap, so it waits briefly and tries again later
                # rather than waiting long (a verify holds the live tables for its whole snapshot).
                log.warning("rebuild: swap attempt %d could not get its locks in %.1f s", attempt, lock_timeout_s)
                await asyncio.sleep(min(0.5 * attempt, 5.0))
                continue
            swapped = True
            return RebuildReport(position=position, events=done.events + applied, swap_events=applied,
                                 skipped=done.skipped + skipped, build_s=build_s,
                                 swap_s=time.perf_counter() - started, swap_attempts=attempt)
        raise RebuildError(f"could not swap the rebuilt tables in after {swap_attempts} attempts")
    finally:
        await reader.close()
        if not swapped and not connection.is_closed():
            await connection.execute(f"DROP SCHEMA IF EXISTS {quote_ident(schema)} CASCADE")
        await connection.close()


async def _live_position(connection: asyncpg.Connection, name: str) -> int:
    position = await connection.fetchval(f"SELECT position FROM {TRACKING_TABLE} WHERE name = $1", name)
    if position is None:
        raise RebuildError(f"no tracking row named {name!r}")
    return position


async def _swap(
    connection: asyncpg.Connection,
    writer: ReadModelWriter,
    schema: str,
    name: str,
    position: int,
    batch_size: int,
    lock_timeout_s: float,
) -> tuple[int, int, int]:
    new, live = quote_ident(schema), quote_ident(LIVE_SCHEMA)
    retired = quote_ident(f"read_model_retired_{uuid.uuid4().hex[:12]}")
    applied = skipped = 0
    async with connection.transaction():
        await connection.execute("SELECT set_config('lock_timeout', $1, true)", f"{int(lock_timeout_s * 1000)}ms")
        await connection.execute("SET LOCAL synchronous_commit = on")
        target = await connection.fetchval(
            f"SELECT position FROM {TRACKING_TABLE} WHERE name = $1 FOR UPDATE", name
        )
        if target is None or target < position:
            raise RebuildError(f"the live tracked position went back ({target} < {position}) during the rebuild")
        async for events in pages(connection, position, target, batch_size):
            skipped += len(await writer.write(connection, PreparedBatch(events)))
            position, applied = events[-1][0], applied + len(events)
        tables = ", ".join(f"{live}.{quote_ident(t)}" for t in READ_MODEL_TABLES)
        await connection.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
        await connection.execute(f"CREATE SCHEMA {retired}")
        for table in READ_MODEL_TABLES:
            await connection.execute(f"ALTER TABLE {live}.{quote_ident(table)} SET SCHEMA {retired}")
        for table in READ_MODEL_TABLES:
            await connection.execute(f"ALTER TABLE {new}.{quote_ident(table)} SET SCHEMA {live}")
        # No CASCADE: should anything else depend on the old tables (a view, say), the swap fails
        # and the live tables stay as they were.
        await connection.execute(
            f"DROP TABLE {', '.join(f'{retired}.{quote_ident(t)}' for t in READ_MODEL_TABLES)}"
        )
        await connection.execute(f"DROP SCHEMA {retired}")
        await connection.execute(f"DROP SCHEMA {new}")
    log.info("rebuild: swapped the rebuilt read model in at position %d", position)
    return position, applied, skipped
