"""Applying events to the read tables of one schema, in batches, and moving the checkpoint.

One `INSERT … SELECT FROM unnest(…)` per table per batch. An event that cannot be applied (bad
data PostgreSQL refuses, such as a NUL in a text, an outcome without its request, an unknown type)
is recorded in `projection_errors` and stepped over: the batch is retried one event at a time
inside savepoints, so one bad event costs one batch a second pass and never stalls the worker.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
import msgspec

from db.store import StoredEvent
from projections.rows import ErasureRow, InputRow, PredictionRow, Row, SkippedEvent, row_from_event

log = logging.getLogger(__name__)

READ_MODEL = "read_model"  # the projection's name in projection_checkpoints
LIVE_SCHEMA = "public"
CHECKPOINTS_TABLE = "public.projection_checkpoints"

EVENT_COLUMNS = "position, stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at, hash"

# What makes one event unappliable, as opposed to a database that is down or busy (which must
# fail the batch, to be retried as a whole later).
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # SQLSTATE class 22: NUL in text, out of range, ...
    asyncpg.IntegrityConstraintViolationError,  # class 23: duplicate outcome, missing input, ...
    asyncpg_base.DataError,  # refused by asyncpg's own encoder before it was sent
)


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class ProjectionError(msgspec.Struct, frozen=True, order=True):
    position: int
    stream_id: uuid.UUID
    event_type: str
    reason: str  # unknown_event | undecodable | rejected
    detail: str


class CheckpointMoved(Exception):
    """The checkpoint is not where this worker left it: another worker (or a rebuild) moved it."""

    def __init__(self, name: str, expected: int, actual: int | None) -> None:
        super().__init__(f"checkpoint {name!r} is at {actual}, this worker expected {expected}")
        self.expected, self.actual = expected, actual


def stored_event(row: asyncpg.Record) -> StoredEvent:
    return StoredEvent(
        position=row[0],
        stream_id=row[1],
        stream_version=row[2],
        event_type=row[3],
        schema_version=row[4],
        data=row[5],
        metadata=row[6],
        recorded_at=row[7],
        hash=row[8],
    )


async def read_events(
    connection: asyncpg.Connection, after: int, limit: int, *, up_to: int | None = None
) -> list[StoredEvent]:
    if up_to is None:
        rows = await connection.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2", after, limit
        )
    else:
        rows = await connection.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 AND position <= $3 ORDER BY position LIMIT $2",
            after,
            limit,
            up_to,
        )
    return [stored_event(row) for row in rows]


def _printable(text: str) -> str:
    return text.replace("\x00", "\\x00")


class ReadModelWriter:
    """Writes rows into the read tables of one schema (the live one, a rebuild's, or pg_temp)."""

    def __init__(self, schema: str = LIVE_SCHEMA) -> None:
        s = quote_ident(schema)
        self.schema = schema
        self._insert_inputs = f"""
            INSERT INTO {s}.inputs (input_id, stream_id, position, blob_sha256, filename, content_type,
                size_bytes, image_format, image_mode, image_width, image_height, image_frames,
                tensor_sha256, preprocessing, idempotency_key, recorded_at)
            SELECT u.input_id, u.stream_id, u.position, u.blob_sha256, u.filename, u.content_type,
                u.size_bytes, u.image_format, u.image_mode, u.image_width, u.image_height, u.image_frames,
                u.tensor_sha256, u.preprocessing::jsonb, u.idempotency_key, u.recorded_at
            FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                $7::bigint[], $8::text[], $9::text[], $10::int[], $11::int[], $12::int[],
                $13::text[], $14::text[], $15::text[], $16::timestamptz[])
                AS u(input_id, stream_id, position, blob_sha256, filename, content_type,
                     size_bytes, image_format, image_mode, image_width, image_height, image_frames,
                     tensor_sha256, preprocessing, idempotency_key, recorded_at)
        """
        # Outputs travel as one flat float8 array (binary, exact) sliced per row: unnest cannot
        # yield one array per row, and a text round trip would cost a parse per number.
        # The input is the request of the same stream; an outcome whose request was not applied
        # finds no row in the join and is reported by the caller (RETURNING tells which).
        self._insert_predictions = f"""
            INSERT INTO {s}.predictions (prediction_id, input_id, position, status, output, likely_class,
                model_name, model_version, model_sha256, device, batch_size, batch_index,
                error_code, error_message, recorded_at)
            SELECT u.prediction_id, i.input_id, u.position, u.status,
                CASE WHEN u.output_length IS NULL THEN NULL
                     ELSE ($16::float8[])[u.output_start + 1 : u.output_start + u.output_length] END,
                u.likely_class, u.model_name, u.model_version, u.model_sha256, u.device,
                u.batch_size, u.batch_index, u.error_code, u.error_message, u.recorded_at
            FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::int[], $5::int[], $6::int[],
                $7::text[], $8::text[], $9::text[], $10::text[], $11::int[], $12::int[],
                $13::text[], $14::text[], $15::timestamptz[])
                AS u(prediction_id, position, status, output_start, output_length, likely_class,
                     model_name, model_version, model_sha256, device, batch_size, batch_index,
                     error_code, error_message, recorded_at)
            JOIN {s}.inputs AS i ON i.stream_id = u.prediction_id
            RETURNING position
        """
        # An erasure marks the inputs of its blob recorded before it (a later upload of the same
        # bytes is a new input whose blob exists again). DISTINCT ON keeps the earliest erasure
        # when one batch holds several for the same blob, so the result does not depend on the
        # join order.
        self._apply_erasures = f"""
            WITH erasure AS (
                SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[]) AS e(blob_sha256, position, recorded_at)
            ), first_erasure AS (
                SELECT DISTINCT ON (i.input_id) i.input_id, e.recorded_at
                FROM {s}.inputs AS i
                JOIN erasure AS e ON e.blob_sha256 = i.blob_sha256 AND e.position > i.position
                WHERE i.erased_at IS NULL
                ORDER BY i.input_id, e.position
            )
            UPDATE {s}.inputs AS i SET erased_at = f.recorded_at FROM first_erasure AS f WHERE i.input_id = f.input_id
        """
        self._insert_errors = f"""
            INSERT INTO {s}.projection_errors (position, stream_id, event_type, reason, detail)
            SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[])
        """

    async def apply(self, connection: asyncpg.Connection, events: Sequence[StoredEvent]) -> list[ProjectionError]:
        """Apply events (in position order) inside the caller's transaction.

        Returns the events that were stepped over; they are recorded in `projection_errors` too.
        Raises on anything but bad data (the caller's transaction must then roll back).
        """
        by_position = {event.position: event for event in events}
        rows: list[Row] = []
        errors: list[ProjectionError] = []
        for event in events:
            try:
                row = row_from_event(event)
            except SkippedEvent as skipped:
                errors.append(_error(event, skipped.reason, skipped.detail))
                continue
            if row is not None:
                rows.append(row)

        try:
            async with connection.transaction():  # a savepoint
                errors.extend(await self._write(connection, rows, by_position))
        except DATA_ERRORS as error:
            log.warning("batch %d..%d refused (%s); applying it event by event", events[0].position,
                        events[-1].position, error)
            for row in rows:
                try:
                    async with connection.transaction():
                        errors.extend(await self._write(connection, [row], by_position))
                except DATA_ERRORS as row_error:
                    errors.append(_error(by_position[row.position], "rejected", f"{type(row_error).__name__}: {row_error}"))

        if errors:
            errors.sort()
            for error in errors:
                log.warning("projection skipped event %d (%s): %s", error.position, error.reason, error.detail)
            await connection.execute(
                self._insert_errors,
                [e.position for e in errors],
                [e.stream_id for e in errors],
                [e.event_type for e in errors],
                [e.reason for e in errors],
                [_printable(e.detail) for e in errors],
            )
        return errors

    async def _write(
        self, connection: asyncpg.Connection, rows: Sequence[Row], by_position: dict[int, StoredEvent]
    ) -> list[ProjectionError]:
        inputs = [row for row in rows if isinstance(row, InputRow)]
        outcomes = [row for row in rows if isinstance(row, PredictionRow)]
        erasures = [row for row in rows if isinstance(row, ErasureRow)]
        errors: list[ProjectionError] = []
        if inputs:
            await self._write_inputs(connection, inputs)
        if outcomes:
            stored = set(await self._write_predictions(connection, outcomes))
            errors.extend(
                _error(by_position[row.position], "rejected", "no applied PredictionRequested in this stream")
                for row in outcomes
                if row.position not in stored
            )
        if erasures:
            await connection.execute(
                self._apply_erasures,
                [row.blob_sha256 for row in erasures],
                [row.position for row in erasures],
                [row.recorded_at for row in erasures],
            )
        return errors

    async def _write_inputs(self, connection: asyncpg.Connection, rows: Sequence[InputRow]) -> None:
        await connection.execute(
            self._insert_inputs,
            [r.input_id for r in rows],
            [r.stream_id for r in rows],
            [r.position for r in rows],
            [r.blob_sha256 for r in rows],
            [r.filename for r in rows],
            [r.content_type for r in rows],
            [r.size_bytes for r in rows],
            [r.image_format for r in rows],
            [r.image_mode for r in rows],
            [r.image_width for r in rows],
            [r.image_height for r in rows],
            [r.image_frames for r in rows],
            [r.tensor_sha256 for r in rows],
            [r.preprocessing for r in rows],
            [r.idempotency_key for r in rows],
            [r.recorded_at for r in rows],
        )

    async def _write_predictions(self, connection: asyncpg.Connection, rows: Sequence[PredictionRow]) -> list[int]:
        flat: list[float] = []
        starts: list[int | None] = []
        lengths: list[int | None] = []
        for row in rows:
            if row.output is None:
                starts.append(None)
                lengths.append(None)
            else:
                starts.append(len(flat))
                lengths.append(len(row.output))
                flat.extend(row.output)
        records = await connection.fetch(
            self._insert_predictions,
            [r.prediction_id for r in rows],
            [r.position for r in rows],
            [r.status for r in rows],
            starts,
            lengths,
            [r.likely_class for r in rows],
            [r.model_name for r in rows],
            [r.model_version for r in rows],
            [r.model_sha256 for r in rows],
            [r.device for r in rows],
            [r.batch_size for r in rows],
            [r.batch_index for r in rows],
            [r.error_code for r in rows],
            [r.error_message for r in rows],
            [r.recorded_at for r in rows],
            flat,
        )
        return [record[0] for record in records]


def _error(event: StoredEvent, reason: str, detail: str) -> ProjectionError:
    return ProjectionError(
        position=event.position, stream_id=event.stream_id, event_type=event.event_type, reason=reason, detail=detail
    )


async def project_batch(
    connection: asyncpg.Connection,
    writer: ReadModelWriter,
    *,
    name: str,
    expected: int,
    batch_size: int,
) -> tuple[int, int, list[ProjectionError]]:
    """Apply the events after `expected` and move the checkpoint there, in one transaction.

    Returns (new checkpoint, events applied, events skipped). Raises `CheckpointMoved` (and rolls
    the batch back) when the checkpoint is not at `expected`.
    """
    async with connection.transaction():
        # Lock the checkpoint row first: it is the one point every writer of these tables
        # serializes on (a rebuild's swap locks it too), always before any read-table row, so a
        # batch and a swap can wait for each other but never deadlock.
        current = await connection.fetchval(
            f"SELECT position FROM {CHECKPOINTS_TABLE} WHERE name = $1 FOR UPDATE", name
        )
        if current != expected:
            raise CheckpointMoved(name, expected, current)
        events = await read_events(connection, expected, batch_size)
        if not events:
            return expected, 0, []
        errors = await writer.apply(connection, events)
        new_position = events[-1].position
        # Compare-and-set: redundant with the row lock above while this worker's session holds
        # it, but the rule that refuses a deposed worker's late write whatever path it came by.
        status = await connection.execute(
            f"UPDATE {CHECKPOINTS_TABLE} SET position = $3 WHERE name = $1 AND position = $2",
            name,
            expected,
            new_position,
        )
        if status != "UPDATE 1":
            raise CheckpointMoved(name, expected, None)
        return new_position, len(events), errors
