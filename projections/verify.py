"""Verify the log and the read model inside ONE REPEATABLE READ snapshot.

1. The hash chain, page by page (`domain.chain.find_break`): any change to any column of any
   event, an added JSON key included, breaks it at that position. Along it, `recorded_at` must
   never decrease (append_events never writes an earlier time than the head's): the first
   position where it does is reported.
2. Outside checkpoints of the chain head (signed heads kept outside the database): each
   `OutsideCheck` gets the verified head and answers a problem or None. None are wired yet.
3. The read model: every event up to the live tracked position is replayed into scratch tables
   (`read_model_create('pg_temp', false)`: the same definition, private to this session) and compared
   with the live tables column by column, as text (so -0.0 differs from 0.0, and jsonb compares
   in its canonical form). The same snapshot sees the live tables and their tracked position together.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime

import asyncpg
import msgspec

from db.sql import quote_ident
from db.store import StoredEvent, read_events
from domain.chain import GENESIS_HASH, ChainBreak, find_break
from projections.bulk import BulkWriter, pipeline
from projections.read_model import (
    LIVE_SCHEMA,
    READ_MODEL,
    TRACKING_TABLE,
    PreparedBatch,
)
from projections.rows import EventFields, fields_of

SCRATCH_SCHEMA = "pg_temp"
_SNAPSHOT_ID = re.compile(r"[0-9A-Fa-f-]+")

# (table, key column or columns, order column): compared in this order; the first difference is reported.
# In the order the API's readers and the rebuild's swap lock them (see rebuild.READ_MODEL_TABLES).
COMPARED_TABLES = (
    ("predictions", "prediction_id", "position"),
    ("inputs", "input_id", "position"),
    ("labels", "position", "position"),
    ("quality_cells", ("model_sha256", "hour", "status", "likely_class", "truth", "bin"), "hour"),
    ("projection_errors", "position", "position"),
)

# (connection inside the snapshot, head position, head hash) -> a problem, or None when fine.
OutsideCheck = Callable[[asyncpg.Connection, int, bytes], Awaitable[str | None]]


class Difference(msgspec.Struct, frozen=True):
    table: str
    key: str
    column: str | None  # None: the row exists on one side only
    live: str | None
    replayed: str | None

    def describe(self) -> str:
        if self.column is None:
            where = "live table only" if self.replayed is None else "replay only"
            return f"{self.table}: row {self.key} exists in the {where}"
        return f"{self.table}: row {self.key}, column {self.column}: live {self.live!r} != replayed {self.replayed!r}"


class VerifyReport(msgspec.Struct, frozen=True):
    ok: bool
    events: int
    head_position: int
    head_hash: str
    tracked: int  # the read model's tracked position
    rows: dict[str, int]
    skipped_events: int
    chain_break: int | None = None
    problem: str | None = None
    difference: Difference | None = None

    def describe(self) -> str:
        lines = [
            f"events: {self.events}, head {self.head_position} {self.head_hash}",
            f"read model at position {self.tracked}; rows: "
            + ", ".join(f"{table} {count}" for table, count in self.rows.items()),
            f"events the projection stepped over: {self.skipped_events}",
        ]
        lines.append("OK" if self.ok else f"FAILED: {self.problem}")
        return "\n".join(lines)


async def verify(
    owner_dsn: str,
    *,
    name: str = READ_MODEL,
    page_size: int = 10_000,
    outside_checks: Sequence[OutsideCheck] = (),
) -> VerifyReport:
    connection = await asyncpg.connect(owner_dsn)
    reader = await asyncpg.connect(owner_dsn)
    try:
        async with connection.transaction(isolation="repeatable_read"):
            # The reader (which feeds the replay while this connection writes it) shares this
            # transaction's snapshot: one snapshot for the chain, the replay and the diff.
            snapshot = await connection.fetchval("SELECT pg_export_snapshot()")
            if not _SNAPSHOT_ID.fullmatch(snapshot):
                raise RuntimeError(f"unexpected snapshot id {snapshot!r}")
            async with reader.transaction(isolation="repeatable_read", readonly=True):
                await reader.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
                return await _verify_in_snapshot(connection, reader, name, page_size, outside_checks)
    finally:
        await reader.close()
        await connection.close()


class _Chain:
    """The chain walked so far, page by page."""

    def __init__(self) -> None:
        self.position, self.hash, self.events = 0, GENESIS_HASH, 0
        self.broken: ChainBreak | None = None
        self.recorded_at: datetime | None = None  # of the last event walked
        self.time_went_back: str | None = None  # the first event recorded before its predecessor

    def follow_clock(self, page: Sequence[StoredEvent]) -> None:
        for event in page:
            if self.time_went_back is None and self.recorded_at is not None and event.recorded_at < self.recorded_at:
                self.time_went_back = (
                    f"recorded_at goes back in time at position {event.position}: {event.recorded_at.isoformat()}"
                    f" is before {self.recorded_at.isoformat()} at position {event.position - 1}"
                )
            self.recorded_at = event.recorded_at


async def _checked_pages(
    reader: asyncpg.Connection, chain: _Chain, tracked: int, page_size: int
) -> AsyncIterator[list[EventFields]]:
    """Every event through the chain check; the ones up to the tracked position on to the replay."""
    while page := await read_events(reader, chain.position, page_size):
        brk, chain.position, chain.hash = find_break(((e.chained(), e.hash) for e in page), chain.hash, chain.position)
        if brk is not None:
            chain.broken = brk
            return
        chain.follow_clock(page)
        chain.events += len(page)
        yield [fields_of(event) for event in page if event.position <= tracked]


async def _verify_in_snapshot(
    connection: asyncpg.Connection,
    reader: asyncpg.Connection,
    name: str,
    page_size: int,
    outside_checks: Sequence[OutsideCheck],
) -> VerifyReport:
    tracked = await connection.fetchval(f"SELECT position FROM {TRACKING_TABLE} WHERE name = $1", name) or 0
    await connection.execute("SELECT read_model_create($1, false)", SCRATCH_SCHEMA)
    writer = BulkWriter(SCRATCH_SCHEMA, log_skips=False)
    chain = _Chain()
    skipped = 0

    async def write(batch: PreparedBatch) -> None:
        nonlocal skipped
        skipped += len(await writer.write(connection, batch))

    await pipeline(_checked_pages(reader, chain, tracked, page_size), write)

    def report(problem: str | None = None, difference: Difference | None = None, rows: dict[str, int] | None = None):
        return VerifyReport(ok=problem is None, events=chain.events, head_position=chain.position,
                            head_hash=chain.hash.hex(), tracked=tracked, rows=rows or {},
                            skipped_events=skipped, problem=problem, difference=difference,
                            chain_break=chain.broken.position if chain.broken else None)

    if chain.broken is not None:
        return report(f"hash chain broken at position {chain.broken.position}: {chain.broken.reason}")
    if chain.time_went_back is not None:
        return report(chain.time_went_back)
    if tracked > chain.position:
        return report(f"the read model's tracked position ({tracked}) is beyond the last event ({chain.position})")
    for check in outside_checks:
        problem = await check(connection, chain.position, chain.hash)
        if problem is not None:
            return report(problem)

    rows: dict[str, int] = {}
    for table, key, order in COMPARED_TABLES:
        difference = await first_difference(connection, table, key, order)
        if difference is not None:
            return report(difference.describe(), difference)
        rows[table] = await connection.fetchval(f"SELECT count(*) FROM {quote_ident(LIVE_SCHEMA)}.{quote_ident(table)}")
    return report(rows=rows)


async def _columns(connection: asyncpg.Connection, schema: str, table: str) -> list[str]:
    rows = await connection.fetch(
        """
        SELECT a.attname FROM pg_attribute AS a
        WHERE a.attrelid = (
            SELECT c.oid FROM pg_class AS c
            WHERE c.relname = $2 AND c.relnamespace = (
                CASE WHEN $1 = 'pg_temp' THEN pg_my_temp_schema() ELSE $1::regnamespace END))
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
        """,
        schema,
        table,
    )
    return [row[0] for row in rows]


async def first_difference(
    connection: asyncpg.Connection, table: str, key: str | tuple[str, ...], order: str
) -> Difference | None:
    """The first row (by `order`) where the live table and the replayed one differ. `key` names
    the column (or columns) that identify a row."""
    live_columns = await _columns(connection, LIVE_SCHEMA, table)
    scratch_columns = await _columns(connection, SCRATCH_SCHEMA, table)
    if live_columns != scratch_columns:
        extra = sorted(set(live_columns) ^ set(scratch_columns)) or ["(column order)"]
        return Difference(table=table, key="*", column=", ".join(extra), live=str(live_columns),
                          replayed=str(scratch_columns))
    keys = (key,) if isinstance(key, str) else key
    name = ",".join(keys)

    def row_key(alias: str) -> str:
        return f"ROW({', '.join(f'{alias}.{quote_ident(k)}' for k in keys)})"

    first, o = quote_ident(keys[0]), quote_ident(order)  # key columns are NOT NULL: a NULL is a missing row
    # Compared as text: exact for float8 (shortest round-trip spelling, -0 kept) and canonical
    # for jsonb; json would not compare at all.
    differs = [f"l.{quote_ident(c)}::text IS DISTINCT FROM s.{quote_ident(c)}::text" for c in live_columns]
    flags = ", ".join(f"({d})" for d in differs)
    live = f"{quote_ident(LIVE_SCHEMA)}.{quote_ident(table)}"
    scratch = f"{quote_ident(SCRATCH_SCHEMA)}.{quote_ident(table)}"
    row = await connection.fetchrow(
        f"""
        SELECT CASE WHEN l.{first} IS NULL THEN {row_key('s')} ELSE {row_key('l')} END::text AS key,
               l.{first} IS NULL AS no_live, s.{first} IS NULL AS no_replayed,
               ARRAY[{flags}] AS flags, to_jsonb(l)::text AS live_row, to_jsonb(s)::text AS replayed_row
        FROM {live} AS l FULL JOIN {scratch} AS s ON {row_key('l')} = {row_key('s')}
        WHERE l.{first} IS NULL OR s.{first} IS NULL OR {" OR ".join(differs)}
        ORDER BY coalesce(l.{o}, s.{o}), 1
        LIMIT 1
        """
    )
    if row is None:
        return None
    key_text = row["key"] if len(keys) > 1 else row["key"][1:-1]  # ROW(x)::text spells "(x)"
    if row["no_live"] or row["no_replayed"]:
        return Difference(table=table, key=f"{name}={key_text}", column=None, live=row["live_row"],
                          replayed=row["replayed_row"])
    column = live_columns[row["flags"].index(True)]
    values = await connection.fetchrow(
        f"SELECT (SELECT {quote_ident(column)}::text FROM {live} AS l WHERE {row_key('l')}::text = $1) AS live, "
        f"(SELECT {quote_ident(column)}::text FROM {scratch} AS s WHERE {row_key('s')}::text = $1) AS replayed",
        row["key"],
    )
    return Difference(table=table, key=f"{name}={key_text}", column=column, live=values["live"],
                      replayed=values["replayed"])
