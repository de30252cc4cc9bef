"""Model quality from the read tables: counts per time bucket, as of any position of the log.

The counts are the sufficient statistics of `domain.quality` (accuracy, per-class precision,
recall and F1, confusion, calibration, Brier, drift), aggregated by PostgreSQL into small cells
(bucket × status × predicted class × true label × confidence bin) and folded into
`QualityCounts` here. "As of position P" takes the predictions whose outcome is at or before P and,
for each, the label that was current at P (the `labels` table keeps every label event with the
position that superseded it), so an earlier state of the log is a query, not a replay.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Literal

import asyncpg
import msgspec

from domain.events import ModelRegistered, decode_event
from domain.quality import BINS, QualityCounts, empty, merge

Bucket = Literal["hour", "day"]
# The lower edges of confidence bins 1 … 9: width_bucket(c, edges) is domain.quality's bin of c.
EDGES_SQL = "ARRAY[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]::float8[]"


def confidence_sql(output: str, classes: int | None = None) -> str:
    """The top confidence of a recorded output (a scalar model's p is read as [1 - p, p]). With
    `classes`, a vector's maximum is one expression over its elements instead of a subquery per
    row (the same value: max is exact)."""
    vector = (f"greatest({', '.join(f'{output}[{i}]' for i in range(1, classes + 1))})" if classes
              else f"(SELECT max(v) FROM unnest({output}) AS v)")
    return (f"CASE WHEN {output} IS NULL THEN NULL "
            f"WHEN cardinality({output}) = 1 THEN greatest(1 - {output}[1], {output}[1]) "
            f"ELSE {vector} END")


def brier_sql(output: str, truth: str, classes: int | None = None) -> str:
    """Sum over classes of (p_k - y_k)^2 with y the one-hot label; NULL without output or label.
    With `classes`, a vector's sum is one expression, added in the same order as the subquery's
    `sum` adds (so the same float8)."""
    vector = (" + ".join(f"({output}[{i}] - ({truth} = {i - 1})::int) ^ 2" for i in range(1, classes + 1)) if classes
              else f"(SELECT sum((v - (i - 1 = {truth})::int) ^ 2) FROM unnest({output}) WITH ORDINALITY AS o(v, i))")
    return (f"CASE WHEN {output} IS NULL OR {truth} IS NULL THEN NULL "
            f"WHEN cardinality({output}) = 1 "
            f"THEN (1 - {output}[1] - ({truth} = 0)::int) ^ 2 + ({output}[1] - ({truth} = 1)::int) ^ 2 "
            f"ELSE {vector} END")


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    sha256: str
    name: str
    version: str
    num_classes: int
    output_kind: str
    registered_at: datetime
    registered_position: int
    predictions: int
    failed: int
    labelled: int
    first_used: datetime | None
    last_used: datetime | None

    def first_day(self) -> datetime | None:
        """The UTC day of the model's first use: the default reference for drift."""
        if self.first_used is None:
            return None
        return self.first_used.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


class BucketCounts(msgspec.Struct, frozen=True):
    start: datetime
    counts: QualityCounts


@functools.cache
def _cells_sql(classes: int, as_of: bool) -> str:
    """Cells aggregated from the predictions (and, as of a position, the label history): one pass
    with the confidence and Brier terms as expressions over the model's `classes` outputs and a
    hash aggregate, which PostgreSQL may run in parallel (1M predictions in about 2 s on two cores;
    BENCHMARKS.md)."""
    truth = "l.label" if as_of else "p.label"
    # The label current at $2: the label event at or before it that nothing at or before it
    # superseded (a withdrawal has no label). `superseded_at` makes this a join, not a lookup per
    # prediction.
    label_join = """LEFT JOIN public.labels AS l
            ON l.prediction_id = p.prediction_id AND l.position <= $2
           AND (l.superseded_at IS NULL OR l.superseded_at > $2)""" if as_of else ""
    return f"""
    SELECT date_trunc($5, p.recorded_at AT TIME ZONE 'UTC') AS bucket, p.status, p.likely_class, {truth} AS truth,
           width_bucket(c.confidence, {EDGES_SQL}) AS bin, count(*) AS n,
           coalesce(sum(c.confidence), 0) AS confidence_sum,
           coalesce(sum({brier_sql("p.output", truth, classes)}), 0) AS brier_sum
    FROM public.predictions AS p
    {label_join}
    CROSS JOIN LATERAL (SELECT {confidence_sql("p.output", classes)} AS confidence) AS c
    WHERE p.model_sha256 = $1 AND p.position <= $2 AND p.recorded_at >= $3 AND p.recorded_at < $4
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
"""


# Memory for the aggregate of a whole model's predictions (a few hundred cells; the sort or hash
# of a million rows would spill to disk with the default 4 MB).
AGGREGATE_WORK_MEM = "64MB"


# The same cells, kept current by the projection (hourly): summed instead of recomputed.
_KEPT = """
    SELECT date_trunc($4, hour) AS bucket, status, nullif(likely_class, -1) AS likely_class,
           nullif(truth, -1) AS truth, nullif(bin, -1) AS bin, sum(n)::bigint AS n,
           sum(confidence_sum)::float8 AS confidence_sum, sum(brier_sum)::float8 AS brier_sum
    FROM public.quality_cells
    WHERE model_sha256 = $1 AND hour >= ($2 AT TIME ZONE 'UTC') AND hour < ($3 AT TIME ZONE 'UTC') AND n > 0
    GROUP BY 1, 2, 3, 4, 5
    ORDER BY 1, 2, 3, 4, 5
"""


def _on_the_hour(moment: datetime) -> bool:
    return moment.minute == moment.second == moment.microsecond == 0 and moment.utcoffset() is not None \
        and moment.utcoffset().seconds % 3600 == 0  # type: ignore[union-attr]


async def bucket_counts(
    connection: asyncpg.Connection, sha256: str, num_classes: int, *, position: int, current: bool,
    since: datetime, until: datetime, bucket: Bucket, kept: bool = True,
) -> list[BucketCounts]:
    """The model's counts per bucket over [since, until), as of `position` (`current`: the read
    tables' own state, which is the state at their tracked position). The current state over
    whole hours comes from the cells the projection keeps (`kept`); anything else is aggregated
    from the predictions and the label history."""
    if current and kept and _on_the_hour(since) and _on_the_hour(until):
        rows = await connection.fetch(_KEPT, sha256, since, until, bucket)
    else:
        async with connection.transaction():
            await connection.execute(f"SET LOCAL work_mem = '{AGGREGATE_WORK_MEM}'")
            rows = await connection.fetch(_cells_sql(num_classes, not current), sha256, position, since, until, bucket)
    buckets: dict[datetime, list[asyncpg.Record]] = {}
    for row in rows:
        buckets.setdefault(row["bucket"], []).append(row)
    return [BucketCounts(start, _fold(cells, num_classes)) for start, cells in buckets.items()]


def _fold(cells: Sequence[asyncpg.Record], k: int) -> QualityCounts:
    c = empty(k)
    predictions = failed = labelled = labelled_failed = correct = 0
    brier = 0.0
    for cell in cells:
        n, truth, predicted = cell["n"], cell["truth"], cell["likely_class"]
        if cell["status"] == "failed":
            failed += n
            labelled_failed += n if truth is not None else 0
            continue
        b = min(cell["bin"], BINS - 1)
        predictions += n
        c.predicted_class_counts[predicted] += n
        c.confidence_histogram[b] += n
        if truth is None:
            continue
        hit = n if truth == predicted else 0
        labelled += n
        correct += hit
        c.confusion[truth][predicted] += n
        c.bin_counts[b] += n
        c.bin_confidence_sums[b] += cell["confidence_sum"]
        c.bin_correct[b] += hit
        brier += cell["brier_sum"]
    return msgspec.structs.replace(
        c, predictions=predictions, failed=failed, labelled=labelled, labelled_failed=labelled_failed,
        correct=correct, brier_sum=brier,
    )


def total(buckets: Sequence[BucketCounts], num_classes: int) -> QualityCounts:
    return merge((b.counts for b in buckets), num_classes)


async def window_and_reference(
    connection: asyncpg.Connection, sha256: str, num_classes: int, *, position: int, current: bool,
    since: datetime, until: datetime, bucket: Bucket, reference_since: datetime, reference_until: datetime,
) -> tuple[list[BucketCounts], QualityCounts]:
    """The window's buckets and the drift reference's total. Aggregated from the predictions (as
    of a position), both come from one pass by the hour when the four bounds are whole hours: a
    second pass for the reference doubled the cost of every `as_of` answer."""
    bounds = (since, until, reference_since, reference_until)
    if current or not all(_on_the_hour(moment) for moment in bounds):
        buckets = await bucket_counts(connection, sha256, num_classes, position=position, current=current,
                                      since=since, until=until, bucket=bucket)
        reference = await bucket_counts(connection, sha256, num_classes, position=position, current=current,
                                        since=reference_since, until=reference_until, bucket="day")
        return buckets, total(reference, num_classes)
    hours = await bucket_counts(connection, sha256, num_classes, position=position, current=False,
                                since=min(since, reference_since), until=max(until, reference_until), bucket="hour")

    def within(start: datetime, lower: datetime, upper: datetime) -> bool:
        return lower <= start.replace(tzinfo=timezone.utc) < upper

    regrouped: dict[datetime, list[QualityCounts]] = {}
    for hour in hours:
        if within(hour.start, since, until):
            start = hour.start if bucket == "hour" else hour.start.replace(hour=0)
            regrouped.setdefault(start, []).append(hour.counts)
    buckets = [BucketCounts(start, merge(counts, num_classes)) for start, counts in sorted(regrouped.items())]
    reference = merge((h.counts for h in hours if within(h.start, reference_since, reference_until)), num_classes)
    return buckets, reference


async def models(connection: asyncpg.Connection, sha256: str | None = None) -> list[ModelEntry]:
    """Every registered model (or the one named), oldest registration first, with its use: the
    counts from the kept quality cells, the first and last use from the predictions of the first
    and last hour the cells name (a scan of one hour each: over all predictions, a model with few
    or none of them on a large log cost seconds, as `min` walked the time index filtering by model)."""
    rows = await connection.fetch(
        """
        SELECT r.event_type, r.schema_version, r.data, r.position, r.recorded_at,
               coalesce(c.predictions, 0) AS predictions, coalesce(c.failed, 0) AS failed,
               coalesce(c.labelled, 0) AS labelled, u.first_used, u.last_used
        FROM (SELECT e.*, e.data::jsonb -> 'model' ->> 'sha256' AS sha256
              FROM events AS e WHERE e.event_type = 'ModelRegistered') AS r
        LEFT JOIN LATERAL (
            SELECT sum(n) FILTER (WHERE status = 'made')::bigint AS predictions,
                   sum(n) FILTER (WHERE status = 'failed')::bigint AS failed,
                   sum(n) FILTER (WHERE status = 'made' AND truth <> -1)::bigint AS labelled
            FROM public.quality_cells WHERE model_sha256 = r.sha256
        ) AS c ON true
        LEFT JOIN LATERAL (
            SELECT min(hour) AS first_hour, max(hour) AS last_hour
            FROM public.quality_cells WHERE model_sha256 = r.sha256 AND n > 0
        ) AS h ON true
        LEFT JOIN LATERAL (
            SELECT (SELECT min(recorded_at) FROM public.predictions WHERE model_sha256 = r.sha256
                      AND recorded_at >= h.first_hour AT TIME ZONE 'UTC'
                      AND recorded_at < (h.first_hour + interval '1 hour') AT TIME ZONE 'UTC') AS first_used,
                   (SELECT max(recorded_at) FROM public.predictions WHERE model_sha256 = r.sha256
                      AND recorded_at >= h.last_hour AT TIME ZONE 'UTC'
                      AND recorded_at < (h.last_hour + interval '1 hour') AT TIME ZONE 'UTC') AS last_used
        ) AS u ON true
        WHERE $1::text IS NULL OR r.sha256 = $1
        ORDER BY r.position
        """,
        sha256,
    )
    entries = []
    for row in rows:
        event = decode_event(row["event_type"], row["schema_version"], row["data"])
        if not isinstance(event, ModelRegistered):
            continue
        entries.append(ModelEntry(
            sha256=event.model.sha256, name=event.model.name, version=event.model.version,
            num_classes=event.num_classes, output_kind=event.output_kind, registered_at=row["recorded_at"],
            registered_position=row["position"], predictions=row["predictions"], failed=row["failed"],
            labelled=row["labelled"], first_used=row["first_used"], last_used=row["last_used"],
        ))
    return entries


async def recently_used(connection: asyncpg.Connection, since: datetime) -> list[str]:
    """The models with predictions in the kept cells since `since` (an hour boundary)."""
    rows = await connection.fetch(
        "SELECT DISTINCT model_sha256 FROM public.quality_cells WHERE hour >= ($1 AT TIME ZONE 'UTC')", since
    )
    return [row["model_sha256"] for row in rows]
