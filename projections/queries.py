"""The read side for the API: predictions from the read tables, or from a stream's events.

Every function takes an asyncpg pool or connection. A view is built by `_view` from a mapping of
the same named fields whichever way it came (the tables, or `prediction_view_from_events`), so
both give the same answer field for field; ids and cursors come from the events, so a rebuild
gives byte-identical answers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Literal

import asyncpg
import msgspec

from db.store import StoredEvent
from domain.labels import is_correct
from projections.quality import confidence_sql
from projections.read_model import READ_MODEL, TRACKING_TABLE
from projections.rows import (
    InputRow,
    LabelRow,
    PredictionRow,
    SkippedEvent,
    row_from_event,
)

Queryable = asyncpg.Pool | asyncpg.Connection


class ModelView(msgspec.Struct, frozen=True):
    name: str
    version: str
    sha256: str


class ImageView(msgspec.Struct, frozen=True):
    format: str
    mode: str
    width: int
    height: int


class ErrorView(msgspec.Struct, frozen=True):
    code: str
    message: str


class PredictionView(msgspec.Struct, frozen=True):
    prediction_id: uuid.UUID
    input_id: uuid.UUID
    status: Literal["made", "failed"]
    output: list[float] | None
    likely_class: int | None
    model: ModelView
    device: str
    filename: str | None
    content_type: str | None
    size_bytes: int
    blob_sha256: str
    image: ImageView
    tensor_sha256: str
    position: int  # of the outcome event: the list's cursor
    request_position: int
    recorded_at: datetime  # of the outcome event
    error: ErrorView | None
    erased: bool
    label: int | None  # the current ground truth
    labelled_at: int | None  # position of the label event that set `label` (or withdrew it)
    correct: bool | None  # likely_class == label, for a made prediction with a current label


class InputView(msgspec.Struct, frozen=True):
    input_id: uuid.UUID
    prediction_id: uuid.UUID
    blob_sha256: str
    filename: str | None
    content_type: str | None
    size_bytes: int
    position: int
    erased: bool


class Lag(msgspec.Struct, frozen=True):
    events: int
    seconds: float


_VIEW_SELECT = """
    SELECT p.prediction_id, p.input_id, p.status, p.output, p.likely_class,
           p.model_name, p.model_version, p.model_sha256, p.device,
           i.filename, i.content_type, i.size_bytes, i.blob_sha256,
           i.image_format, i.image_mode, i.image_width, i.image_height, i.tensor_sha256,
           p.position, i.position AS request_position, p.recorded_at,
           p.error_code, p.error_message, i.erased_at IS NOT NULL AS erased, p.label, p.labelled_at
    FROM public.predictions AS p
    JOIN public.inputs AS i ON i.input_id = p.input_id
"""


def _view(m: Mapping[str, Any]) -> PredictionView:
    failed = m["status"] == "failed"
    output = m["output"]
    return PredictionView(
        prediction_id=m["prediction_id"],
        input_id=m["input_id"],
        status=m["status"],
        output=None if output is None else list(output),
        likely_class=m["likely_class"],
        model=ModelView(name=m["model_name"], version=m["model_version"], sha256=m["model_sha256"]),
        device=m["device"],
        filename=m["filename"],
        content_type=m["content_type"],
        size_bytes=m["size_bytes"],
        blob_sha256=m["blob_sha256"],
        image=ImageView(
            format=m["image_format"], mode=m["image_mode"], width=m["image_width"], height=m["image_height"]
        ),
        tensor_sha256=m["tensor_sha256"],
        position=m["position"],
        request_position=m["request_position"],
        recorded_at=m["recorded_at"],
        error=ErrorView(code=m["error_code"], message=m["error_message"]) if failed else None,
        erased=m["erased"],
        label=m["label"],
        labelled_at=m["labelled_at"],
        correct=is_correct(m["status"], m["likely_class"], m["label"]),
    )


async def get_prediction(conn: Queryable, prediction_id: uuid.UUID) -> PredictionView | None:
    row = await conn.fetchrow(_VIEW_SELECT + " WHERE p.prediction_id = $1", prediction_id)
    return None if row is None else _view(row)


async def list_predictions(
    conn: Queryable,
    *,
    limit: int,
    before_position: int | None = None,
    likely_class: int | None = None,
    model_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    labelled: bool | None = None,
    correct: bool | None = None,
    confidence_below: float | None = None,
) -> tuple[list[PredictionView], int | None]:
    """Newest first (by position). `since` is inclusive, `until` exclusive; `confidence_below`
    keeps made predictions whose top confidence is under it. The cursor is the position of the
    last item when there is a further page, None otherwise."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    where, arguments = _where(before_position, likely_class, model_version, since, until, labelled, correct,
                              confidence_below)
    arguments.append(limit + 1)
    rows = await conn.fetch(f"{_VIEW_SELECT}{where} ORDER BY p.position DESC LIMIT ${len(arguments)}", *arguments)
    views = [_view(row) for row in rows[:limit]]
    next_cursor = views[-1].position if len(rows) > limit else None
    return views, next_cursor


def _where(
    before_position: int | None, likely_class: int | None, model_version: str | None, since: datetime | None,
    until: datetime | None, labelled: bool | None, correct: bool | None, confidence_below: float | None,
) -> tuple[str, list[Any]]:
    """The list's filters over `public.predictions AS p`. The WHERE clause names only the filters
    given (values stay parameters): a generic `$n IS NULL OR …` would keep the planner from the
    index that serves each filter."""
    conditions: list[str] = []
    arguments: list[Any] = []
    for clause, value in (
        ("p.position < ${}", before_position),
        ("p.likely_class = ${}", likely_class),
        ("p.model_version = ${}", model_version),
        ("p.recorded_at >= ${}", since),
        ("p.recorded_at < ${}", until),
        (f"{confidence_sql('p.output')} < ${{}}", confidence_below),
    ):
        if value is not None:
            arguments.append(value)
            conditions.append(clause.format(len(arguments)))
    if labelled is not None:
        conditions.append("p.label IS NOT NULL" if labelled else "p.label IS NULL")
    if correct is not None:  # only made predictions with a current label are correct or not
        conditions.append("p.status = 'made' AND p.label " + ("= p.likely_class" if correct else "<> p.likely_class"))
    return (" WHERE " + " AND ".join(conditions)) if conditions else "", arguments


class PredictionCounts(msgspec.Struct, frozen=True):
    total: int
    failed: int
    labelled: int
    correct: int
    classes: dict[int, int]  # made predictions per predicted class


def _fold_counts(rows: Sequence[asyncpg.Record]) -> PredictionCounts:
    """Rows of (likely_class or NULL/-1 when failed, status, n, labelled, correct) as the counts."""
    total = failed = labelled = correct = 0
    classes: dict[int, int] = {}
    for likely, status, n, with_label, right in rows:
        total, labelled, correct = total + n, labelled + with_label, correct + right
        if status == "failed":
            failed += n
        else:
            classes[likely] = classes.get(likely, 0) + n
    return PredictionCounts(total, failed, labelled, correct, dict(sorted(classes.items())))


async def count_predictions(
    conn: Queryable, *, likely_class: int | None = None, model_version: str | None = None,
    since: datetime | None = None, until: datetime | None = None, labelled: bool | None = None,
    correct: bool | None = None, confidence_below: float | None = None,
) -> PredictionCounts:
    """How many predictions the list's filters match, and of those how many failed, are labelled
    and are correct: the counts above the console's table. From the kept quality cells when the
    filter is one they can answer (a sum over a few thousand cells instead of a count over every
    prediction: 259 ms at 1M predictions, BENCHMARKS.md), else from the predictions."""
    if model_version is None and confidence_below is None and _whole_hour(since) and _whole_hour(until):
        return await count_from_cells(conn, likely_class=likely_class, since=since, until=until, labelled=labelled,
                                      correct=correct)
    return await count_from_rows(conn, likely_class=likely_class, model_version=model_version, since=since,
                                 until=until, labelled=labelled, correct=correct, confidence_below=confidence_below)


async def count_from_rows(
    conn: Queryable, *, likely_class: int | None = None, model_version: str | None = None,
    since: datetime | None = None, until: datetime | None = None, labelled: bool | None = None,
    correct: bool | None = None, confidence_below: float | None = None,
) -> PredictionCounts:
    where, arguments = _where(None, likely_class, model_version, since, until, labelled, correct, confidence_below)
    rows = await conn.fetch(
        "SELECT p.likely_class, p.status, count(*), count(p.label),"
        " count(*) FILTER (WHERE p.status = 'made' AND p.label = p.likely_class)"
        f" FROM public.predictions AS p{where} GROUP BY 1, 2",
        *arguments,
    )
    return _fold_counts(rows)


def _whole_hour(moment: datetime | None) -> bool:
    return moment is None or (moment.utcoffset() is not None and moment.minute == moment.second == moment.microsecond == 0)


async def count_from_cells(
    conn: Queryable, *, likely_class: int | None = None, since: datetime | None = None, until: datetime | None = None,
    labelled: bool | None = None, correct: bool | None = None,
) -> PredictionCounts:
    """The same counts from `quality_cells` (one row per model, hour, status, class, label and
    confidence bin, kept by the projection in the same transaction as the predictions)."""
    conditions, arguments = ["n > 0"], []
    for clause, value in (
        ("likely_class = ${}", likely_class),
        ("hour >= ${}", since.astimezone(timezone.utc).replace(tzinfo=None) if since else None),
        ("hour < ${}", until.astimezone(timezone.utc).replace(tzinfo=None) if until else None),
    ):
        if value is not None:
            arguments.append(value)
            conditions.append(clause.format(len(arguments)))
    if labelled is not None:
        conditions.append("truth <> -1" if labelled else "truth = -1")
    if correct is not None:
        conditions.append("status = 'made' AND truth <> -1 AND truth " + ("= likely_class" if correct else "<> likely_class"))
    rows = await conn.fetch(
        "SELECT likely_class, status, sum(n)::bigint, coalesce(sum(n) FILTER (WHERE truth <> -1), 0)::bigint,"
        " coalesce(sum(n) FILTER (WHERE status = 'made' AND truth = likely_class), 0)::bigint"
        " FROM public.quality_cells WHERE " + " AND ".join(conditions) + " GROUP BY 1, 2",
        *arguments,
    )
    return _fold_counts(rows)


def prediction_view_from_events(events: Sequence[StoredEvent], *, erased: bool = False) -> PredictionView | None:
    """The view the tables will give for this stream, from its events (read-your-writes).

    None unless the stream holds a request and its outcome. `erased` cannot be told from the
    stream alone (an erasure lives in a stream of its own); the caller may pass it.
    """
    request: InputRow | None = None
    outcome: PredictionRow | None = None
    label: LabelRow | None = None
    for event in sorted(events, key=lambda e: e.position):
        try:
            row = row_from_event(event)
        except SkippedEvent:
            if request is not None and outcome is not None:
                continue  # a bad label event: stepped over by the projection as well
            return None  # the projection steps over it too: there is no view to give
        if isinstance(row, InputRow) and request is None:
            request = row
        elif isinstance(row, PredictionRow) and request is not None and outcome is None:
            outcome = row
        elif isinstance(row, LabelRow) and outcome is not None:
            label = row
    if request is None or outcome is None:
        return None
    fields = msgspec.structs.asdict(outcome)
    fields.update(
        input_id=request.input_id,
        filename=request.filename,
        content_type=request.content_type,
        size_bytes=request.size_bytes,
        blob_sha256=request.blob_sha256,
        image_format=request.image_format,
        image_mode=request.image_mode,
        image_width=request.image_width,
        image_height=request.image_height,
        tensor_sha256=request.tensor_sha256,
        request_position=request.position,
        erased=erased,
        label=label.label if label else None,
        labelled_at=label.position if label else None,
    )
    return _view(fields)


async def get_input(conn: Queryable, input_id: uuid.UUID) -> InputView | None:
    row = await conn.fetchrow(
        """
        SELECT input_id, stream_id AS prediction_id, blob_sha256, filename, content_type, size_bytes,
               position, erased_at IS NOT NULL AS erased
        FROM public.inputs WHERE input_id = $1
        """,
        input_id,
    )
    return None if row is None else InputView(**dict(row))


async def tracked_position(conn: Queryable, name: str = READ_MODEL) -> int:
    """How far into the log the projection's read tables reflect."""
    position = await conn.fetchval(f"SELECT position FROM {TRACKING_TABLE} WHERE name = $1", name)
    return position or 0


async def wait_until_projected(conn: Queryable, position: int, timeout_s: float, *, name: str = READ_MODEL) -> bool:
    """Wait until the projection has applied `position`; false if it has not within the timeout."""
    deadline = time.monotonic() + timeout_s
    delay = 0.002
    while True:
        if await tracked_position(conn, name) >= position:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


async def lag(conn: Queryable, name: str = READ_MODEL) -> Lag:
    """Head position minus the tracked position, and `now()` minus the oldest unapplied event's time."""
    row = await conn.fetchrow(
        f"""
        WITH c AS (SELECT coalesce((SELECT position FROM {TRACKING_TABLE} WHERE name = $1), 0) AS position)
        SELECT coalesce((SELECT max(position) FROM events), 0) - c.position AS events,
               coalesce(extract(epoch FROM now() - (
                   SELECT recorded_at FROM events WHERE position > c.position ORDER BY position LIMIT 1)), 0)::float8
                   AS seconds
        FROM c
        """,
        name,
    )
    return Lag(events=max(0, row["events"]), seconds=max(0.0, row["seconds"]))


class Percentiles(msgspec.Struct, frozen=True):
    p50: float | None
    p90: float | None
    p99: float | None


class ModelLatency(msgspec.Struct, frozen=True):
    """Inference and queue-wait times as recorded in a model's latest PredictionMade events."""

    sample: int
    inference_ms: Percentiles
    queue_wait_ms: Percentiles
    batch_size: Percentiles


async def model_latency(conn: Queryable, model_sha256: str, *, last: int = 2000) -> ModelLatency:
    """Percentiles over the model's `last` made predictions: the read table finds them (newest
    first), the events carry the timings (each event by its primary key)."""
    row = await conn.fetchrow(
        """
        WITH recent AS (
            SELECT position FROM public.predictions
            WHERE model_sha256 = $1 AND status = 'made' ORDER BY position DESC LIMIT $2
        ), timings AS (
            SELECT (e.data->>'inference_ms')::float8 AS inference, (e.data->>'queue_wait_ms')::float8 AS wait,
                   (e.data->>'batch_size')::float8 AS batch
            FROM recent JOIN events AS e USING (position)
        )
        SELECT count(*) AS n,
               percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY inference) AS inference,
               percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY wait) AS wait,
               percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY batch) AS batch
        FROM timings
        """,
        model_sha256, last,
    )

    def percentiles(values: Sequence[float] | None) -> Percentiles:
        return Percentiles(*(values or (None, None, None)))

    return ModelLatency(sample=row["n"], inference_ms=percentiles(row["inference"]),
                        queue_wait_ms=percentiles(row["wait"]), batch_size=percentiles(row["batch"]))
