"""Applying events to the read tables of one schema, in batches, and moving the tracked position.

One `INSERT … SELECT FROM unnest(…)` per table per batch. An event that cannot be applied (bad
data PostgreSQL refuses, such as a NUL in a text, an outcome without its request, an unknown type)
is recorded in `projection_errors` and stepped over: the batch is retried one event at a time
inside savepoints, so one bad event costs one batch a second pass and never stalls the worker.

A batch is prepared (decoded into rows and columns: CPU only) apart from being written, so a bulk
replay can prepare the next batch while PostgreSQL writes the previous one.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

import asyncpg
import asyncpg.exceptions._base as asyncpg_base
import msgspec

from db.sql import quote_ident
from db.store import fetch_events_after
from projections.quality import EDGES_SQL, brier_sql, confidence_sql
from projections.rows import (
    ErasureRow,
    EventFields,
    EventLike,
    InputRow,
    LabelRow,
    PredictionRow,
    Row,
    SkippedEvent,
    fields_of,
    row_from_fields,
)

log = logging.getLogger(__name__)

READ_MODEL = "read_model"  # the projection's name in projection_tracking
LIVE_SCHEMA = "public"
TRACKING_TABLE = "public.projection_tracking"

# What a projection reads of each event: the fields of `rows.EventFields`, in its order.
PROJECTED_COLUMNS = "position, stream_id, event_type, schema_version, data, recorded_at"

# What makes one event unappliable, as opposed to a database that is down or busy (which must
# fail the batch, to be retried as a whole later).
DATA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DataError,  # SQLSTATE class 22: NUL in text, out of range, ...
    asyncpg.IntegrityConstraintViolationError,  # class 23: duplicate outcome, missing input, ...
    asyncpg_base.DataError,  # refused by asyncpg's own encoder before it was sent
)

_json = msgspec.json.Encoder()


class ProjectionError(msgspec.Struct, frozen=True, order=True):
    position: int
    stream_id: uuid.UUID
    event_type: str
    reason: str  # unknown_event | undecodable | rejected
    detail: str


class TrackingMoved(Exception):
    """The tracked position is not where this worker left it: another worker (or a rebuild) moved it."""

    def __init__(self, name: str, expected: int, actual: int | None) -> None:
        super().__init__(f"projection {name!r} is tracked at {actual}, this worker expected {expected}")
        self.expected, self.actual = expected, actual


async def read_projected_events(
    connection: asyncpg.Connection, after: int, limit: int, *, up_to: int | None = None
) -> list[EventFields]:
    """What the projection needs of the events after `after`, in position order (as fetched:
    records of `EventFields`)."""
    return await fetch_events_after(connection, after, limit, up_to=up_to, columns=PROJECTED_COLUMNS)  # type: ignore[return-value]


def _printable(text: str) -> str:
    return text.replace("\x00", "\\x00")


def _error(event: EventFields, reason: str, detail: str) -> ProjectionError:
    return ProjectionError(position=event[0], stream_id=event[1], event_type=event[2], reason=reason, detail=detail)


def _float8_array_literal(values: list[float]) -> str:
    # msgspec spells each double in its shortest round-trip form and PostgreSQL reads it back
    # correctly rounded, so the stored float8 is the same double; one text per row is far
    # cheaper to send than one array element per number.
    return "{" + _json.encode(values)[1:-1].decode() + "}"


class PreparedBatch:
    """A batch decoded into rows (CPU only; no I/O)."""

    def __init__(self, events: Sequence[EventFields]) -> None:
        self.events = events
        self.first, self.last = events[0][0], events[-1][0]
        self.rows: list[Row] = []
        self.inputs: list[InputRow] = []
        self.outcomes: list[PredictionRow] = []
        self.erasures: list[ErasureRow] = []
        self.labels: list[LabelRow] = []
        self.skipped: list[ProjectionError] = []
        by_kind = {InputRow: self.inputs, PredictionRow: self.outcomes, ErasureRow: self.erasures,
                   LabelRow: self.labels}
        for event in events:
            try:
                row = row_from_fields(*event)
            except SkippedEvent as skipped:
                self.skipped.append(_error(event, skipped.reason, skipped.detail))
                continue
            if row is not None:
                self.rows.append(row)
                by_kind[type(row)].append(row)
        self._columns: _Columns | None = None
        self._by_position: dict[int, EventFields] | None = None

    def event_at(self, position: int) -> EventFields:
        if self._by_position is None:
            self._by_position = {event[0]: event for event in self.events}
        return self._by_position[position]

    @property
    def columns(self) -> _Columns:
        if self._columns is None:
            self._columns = _columns(self.inputs, self.outcomes, self.erasures, self.labels)
        return self._columns


class _Columns(msgspec.Struct):
    inputs: list[list] | None
    outcomes: list[list] | None
    outcome_positions: list[int]
    erasures: list[list] | None
    labels: Sequence[LabelRow]


def _cell_upsert(schema: str, source: str) -> str:
    """Add the rows of `source` (a prediction's columns with the `truth` it counts under and
    `sign` +1 or -1) to their quality cells."""
    return f"""
        INSERT INTO {schema}.quality_cells AS q
            (model_sha256, hour, status, likely_class, truth, bin, n, confidence_sum, brier_sum)
        SELECT model_sha256, date_trunc('hour', recorded_at AT TIME ZONE 'UTC'), status, coalesce(likely_class, -1),
               coalesce(truth, -1), coalesce(width_bucket(confidence, {EDGES_SQL}), -1), sum(sign),
               coalesce(sum(sign * confidence::numeric), 0), coalesce(sum(sign * brier::numeric), 0)
        FROM (SELECT d.*, {confidence_sql("d.output")} AS confidence, {brier_sql("d.output", "d.truth")} AS brier
              FROM ({source}) AS d) AS f
        GROUP BY 1, 2, 3, 4, 5, 6
        ON CONFLICT (model_sha256, hour, status, likely_class, truth, bin) DO UPDATE
        SET n = q.n + excluded.n, confidence_sum = q.confidence_sum + excluded.confidence_sum,
            brier_sum = q.brier_sum + excluded.brier_sum
    """


def _label_columns(labels: Sequence[LabelRow]) -> tuple[list[list], list[list], list[list]]:
    """The label events as columns, each with the position of the next label event of its
    prediction within the batch (None for the last: a later batch supersedes it); then per
    prediction its first and its last label event in the batch."""
    superseded: list[int | None] = [None] * len(labels)
    last_index: dict[uuid.UUID, int] = {}
    first: dict[uuid.UUID, LabelRow] = {}
    for index, row in enumerate(labels):  # in position order
        previous = last_index.get(row.prediction_id)
        if previous is not None:
            superseded[previous] = row.position
        else:
            first[row.prediction_id] = row
        last_index[row.prediction_id] = index
    last = [labels[index] for index in last_index.values()]
    return (
        [
            [r.position for r in labels], [r.prediction_id for r in labels], [r.kind for r in labels],
            [r.label for r in labels], [r.source for r in labels], [r.note for r in labels],
            [r.reason for r in labels], [r.actor for r in labels], [r.recorded_at for r in labels], superseded,
        ],
        [[r.prediction_id for r in first.values()], [r.position for r in first.values()]],
        [[r.prediction_id for r in last], [r.label for r in last], [r.position for r in last]],
    )


def _columns(
    inputs: Sequence[InputRow],
    outcomes: Sequence[PredictionRow],
    erasures: Sequence[ErasureRow],
    labels: Sequence[LabelRow] = (),
) -> _Columns:
    return _Columns(
        labels=labels,
        inputs=[
            [r.input_id for r in inputs],
            [r.stream_id for r in inputs],
            [r.position for r in inputs],
            [r.blob_sha256 for r in inputs],
            [r.filename for r in inputs],
            [r.content_type for r in inputs],
            [r.size_bytes for r in inputs],
            [r.image_format for r in inputs],
            [r.image_mode for r in inputs],
            [r.image_width for r in inputs],
            [r.image_height for r in inputs],
            [r.image_frames for r in inputs],
            [r.tensor_sha256 for r in inputs],
            [r.preprocessing for r in inputs],
            [r.idempotency_key for r in inputs],
            [r.recorded_at for r in inputs],
        ]
        if inputs
        else None,
        outcomes=[
            [r.prediction_id for r in outcomes],
            [r.position for r in outcomes],
            [r.status for r in outcomes],
            [None if r.output is None else _float8_array_literal(r.output) for r in outcomes],
            [r.likely_class for r in outcomes],
            [r.model_name for r in outcomes],
            [r.model_version for r in outcomes],
            [r.model_sha256 for r in outcomes],
            [r.device for r in outcomes],
            [r.batch_size for r in outcomes],
            [r.batch_index for r in outcomes],
            [r.error_code for r in outcomes],
            [r.error_message for r in outcomes],
            [r.recorded_at for r in outcomes],
        ]
        if outcomes
        else None,
        outcome_positions=[r.position for r in outcomes],
        erasures=[[r.blob_sha256 for r in erasures], [r.position for r in erasures], [r.recorded_at for r in erasures]]
        if erasures
        else None,
    )


def _columns_of(row: Row) -> _Columns:
    return _columns(
        [row] if type(row) is InputRow else [],
        [row] if type(row) is PredictionRow else [],
        [row] if type(row) is ErasureRow else [],
        [row] if type(row) is LabelRow else [],
    )


class ReadModelWriter:
    """Writes rows into the read tables of one schema (the live one, a rebuild's, or pg_temp)."""

    def __init__(self, schema: str = LIVE_SCHEMA, *, log_skips: bool = True) -> None:
        s = quote_ident(schema)
        self.schema = schema
        self._log_skips = log_skips
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
        # The input is the request of the same stream; an outcome whose request was not applied
        # finds no row in the join and is reported by the caller (RETURNING tells which). One
        # probe of inputs' unique stream_id index per outcome, however it is planned (see
        # project_batch: a hash join over a scan of `inputs` is what a plan made on an empty table
        # chose for a plain join).
        self._insert_predictions = f"""
            INSERT INTO {s}.predictions (prediction_id, input_id, position, status, output, likely_class,
                model_name, model_version, model_sha256, device, batch_size, batch_index,
                error_code, error_message, recorded_at)
            SELECT u.prediction_id, i.input_id, u.position, u.status, u.output::float8[], u.likely_class,
                u.model_name, u.model_version, u.model_sha256, u.device, u.batch_size, u.batch_index,
                u.error_code, u.error_message, u.recorded_at
            FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::text[],
                $7::text[], $8::text[], $9::text[], $10::int[], $11::int[], $12::text[], $13::text[],
                $14::timestamptz[])
                AS u(prediction_id, position, status, output, likely_class, model_name, model_version,
                     model_sha256, device, batch_size, batch_index, error_code, error_message, recorded_at)
            CROSS JOIN LATERAL (SELECT i.input_id FROM {s}.inputs AS i WHERE i.stream_id = u.prediction_id LIMIT 1) AS i
            RETURNING position, prediction_id
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
        # Label events, in three steps: the events themselves; the label that was the latest
        # before this batch is superseded by the batch's first one; the prediction takes the
        # batch's last one (a withdrawal leaves no label). Applied after the outcomes, so a label
        # in the same batch as its prediction finds the row.
        self._insert_labels = f"""
            INSERT INTO {s}.labels (position, prediction_id, kind, label, source, note, reason, actor, recorded_at,
                superseded_at)
            SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::int[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::timestamptz[], $10::bigint[])
        """
        self._supersede_labels = f"""
            UPDATE {s}.labels AS l SET superseded_at = u.position
            FROM unnest($1::uuid[], $2::bigint[]) AS u(prediction_id, position)
            WHERE l.prediction_id = u.prediction_id AND l.superseded_at IS NULL AND l.position < u.position
        """
        self._set_current_labels = f"""
            UPDATE {s}.predictions AS p SET label = u.label, labelled_at = u.position
            FROM unnest($1::uuid[], $2::int[], $3::bigint[]) AS u(prediction_id, label, position)
            WHERE p.prediction_id = u.prediction_id
        """
        # Quality cells: a new outcome counts in its cell as unlabelled; a label that changes
        # moves the prediction from the cell of its old label to the cell of its new one.
        # (one probe of the primary key per prediction, however it is planned)
        self._count_outcomes = _cell_upsert(s, f"""
            SELECT p.model_sha256, p.recorded_at, p.status, p.likely_class, p.output, NULL::int AS truth, 1 AS sign
            FROM (SELECT DISTINCT t.id FROM unnest($1::uuid[]) AS t(id)) AS x
            CROSS JOIN LATERAL (SELECT * FROM {s}.predictions AS p WHERE p.prediction_id = x.id LIMIT 1) AS p
        """)
        self._move_labelled = _cell_upsert(s, f"""
            SELECT p.model_sha256, p.recorded_at, p.status, p.likely_class, p.output, x.truth, x.sign
            FROM unnest($1::uuid[], $2::int[]) AS u(prediction_id, label)
            JOIN {s}.predictions AS p ON p.prediction_id = u.prediction_id
            CROSS JOIN LATERAL (VALUES (p.label, -1), (u.label, 1)) AS x(truth, sign)
            WHERE p.label IS DISTINCT FROM u.label
        """)
        self._drop_empty_cells = f"DELETE FROM {s}.quality_cells WHERE n = 0"
        self._insert_errors = f"""
            INSERT INTO {s}.projection_errors (position, stream_id, event_type, reason, detail)
            SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[])
        """

    async def apply(self, connection: asyncpg.Connection, events: Sequence[EventLike]) -> list[ProjectionError]:
        """Apply events (in position order) inside the caller's transaction.

        Returns the events that were stepped over; they are recorded in `projection_errors` too.
        Raises on anything but bad data (the caller's transaction must then roll back).
        """
        if not events:
            return []
        return await self.write(connection, PreparedBatch([fields_of(event) for event in events]))

    async def write(self, connection: asyncpg.Connection, batch: PreparedBatch) -> list[ProjectionError]:
        errors = list(batch.skipped)
        try:
            async with connection.transaction():  # a savepoint
                errors.extend(await self._write(connection, batch.columns, batch))
        except DATA_ERRORS as error:
            log.warning("events %d..%d refused as a batch (%s); applying them one by one", batch.first, batch.last,
                        error)
            for row in batch.rows:
                try:
                    async with connection.transaction():
                        errors.extend(await self._write(connection, _columns_of(row), batch))
                except DATA_ERRORS as row_error:
                    errors.append(_error(batch.event_at(row.position), "rejected", f"{type(row_error).__name__}: {row_error}"))
        await self.record_errors(connection, errors)
        return errors

    async def record_errors(self, connection: asyncpg.Connection, errors: list[ProjectionError]) -> None:
        if not errors:
            return
        errors.sort()
        if self._log_skips:
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

    async def write_erasures(self, connection: asyncpg.Connection, erasures: Sequence[ErasureRow]) -> None:
        if erasures:
            await connection.execute(
                self._apply_erasures,
                [row.blob_sha256 for row in erasures],
                [row.position for row in erasures],
                [row.recorded_at for row in erasures],
            )

    async def _write(
        self, connection: asyncpg.Connection, columns: _Columns, batch: PreparedBatch
    ) -> list[ProjectionError]:
        errors: list[ProjectionError] = []
        if columns.inputs is not None:
            await connection.execute(self._insert_inputs, *columns.inputs)
        if columns.outcomes is not None:
            inserted = await connection.fetch(self._insert_predictions, *columns.outcomes)
            await self.count_outcomes(connection, [record[1] for record in inserted])
            stored = {record[0] for record in inserted}
            errors.extend(
                _error(batch.event_at(position), "rejected", "no applied PredictionRequested in this stream")
                for position in columns.outcome_positions
                if position not in stored
            )
        if columns.erasures is not None:
            await connection.execute(self._apply_erasures, *columns.erasures)
        await self.write_labels(connection, columns.labels)
        return errors

    async def write_labels(self, connection: asyncpg.Connection, labels: Sequence[LabelRow]) -> None:
        if not labels:
            return
        rows, starts, ends = _label_columns(labels)
        await connection.execute(self._supersede_labels, *starts)
        await connection.execute(self._insert_labels, *rows)
        await connection.execute(self._move_labelled, ends[0], ends[1])  # before the labels change
        await connection.execute(self._set_current_labels, *ends)
        await connection.execute(self._drop_empty_cells)

    async def count_outcomes(self, connection: asyncpg.Connection, prediction_ids: Sequence[uuid.UUID]) -> None:
        if prediction_ids:
            await connection.execute(self._count_outcomes, list(prediction_ids))


_GENERIC_PLANS = "SET LOCAL plan_cache_mode = force_generic_plan"


async def project_batch(
    connection: asyncpg.Connection,
    writer: ReadModelWriter,
    *,
    name: str,
    expected: int,
    batch_size: int,
) -> tuple[int, int, list[ProjectionError]]:
    """Apply the events after `expected` and move the tracked position there, in one transaction.

    Returns (new position, events applied, events skipped). Raises `TrackingMoved` (and rolls
    the batch back) when the tracked position is not at `expected`.
    """
    async with connection.transaction():
        # Lock the tracking row first: it is the one point every writer of these tables
        # serializes on (a rebuild's swap locks it too), always before any read-table row, so a
        # batch and a swap can wait for each other but never deadlock.
        current = await connection.fetchval(
            f"SELECT position FROM {TRACKING_TABLE} WHERE name = $1 FOR UPDATE", name
        )
        if current != expected:
            raise TrackingMoved(name, expected, current)
        events = await read_projected_events(connection, expected, batch_size)
        if not events:
            return expected, 0, []
        batch = PreparedBatch(events)
        if not batch.labels and not batch.erasures:
            # Uploads only (what every batch is while no labels arrive): each statement left in
            # this transaction inserts rows from arrays or probes a unique index, so its generic
            # plan is right at any table size, even one made while the tables were empty, and
            # planning it again for every batch would cost about a third of the batch's
            # PostgreSQL CPU (BENCHMARKS.md, "PostgreSQL plan caching"). Label and erasure
            # statements join against the read tables and keep the session's custom plans.
            await connection.execute(_GENERIC_PLANS)
        errors = await writer.write(connection, batch)
        new_position = events[-1][0]
        # Compare-and-set: redundant with the row lock above while this worker's session holds
        # it, but the rule that refuses a deposed worker's late write whatever path it came by.
        status = await connection.execute(
            f"UPDATE {TRACKING_TABLE} SET position = $3 WHERE name = $1 AND position = $2",
            name,
            expected,
            new_position,
        )
        if status != "UPDATE 1":
            raise TrackingMoved(name, expected, None)
        return new_position, len(events), errors
