"""HTTP routes for model quality: every registered model, and one model's measured quality over a
time window, per bucket, with drift against a reference window, as of any position of the log."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated, Literal

import msgspec
from litestar import get
from litestar.params import PathParameter, QueryParameter

from domain.quality import Drift, QualityCounts, QualityReport, drift, quality_report
from projections import quality, queries
from service.bootstrap import ServicesDependency
from service.openapi import ProblemOperation, problem_spec
from service.problems import Problem
from service.routes import MAX_BIGINT, in_utc

# What "all time" means for a window: PostgreSQL's timestamptz holds these.
_BEGINNING = datetime(1, 1, 1, tzinfo=timezone.utc)
_END = datetime(9999, 12, 31, tzinfo=timezone.utc)


class ModelsPage(msgspec.Struct, frozen=True):
    items: list[quality.ModelEntry]
    as_of_position: int


class CalibrationBin(msgspec.Struct, frozen=True):
    lower: float
    upper: float
    count: int
    mean_confidence: float | None
    accuracy: float | None


class BucketQuality(msgspec.Struct, frozen=True):
    start: datetime
    predictions: int
    failed: int
    labelled: int
    correct: int
    accuracy: float | None
    label_coverage: float | None
    predicted_class_counts: list[int]
    predicted_class_psi: float | None  # this bucket's predicted classes against the reference window
    confidence_psi: float | None


class Window(msgspec.Struct, frozen=True):
    since: datetime | None
    until: datetime | None


class DriftAnswer(msgspec.Struct, frozen=True):
    reference: Window
    measures: Drift


class ModelQuality(msgspec.Struct, frozen=True):
    model: quality.ModelEntry
    as_of_position: int
    window: Window
    bucket: str
    report: QualityReport
    confusion: list[list[int]]  # [true label][predicted class]
    calibration: list[CalibrationBin]
    series: list[BucketQuality]
    drift: DriftAnswer
    counts: QualityCounts  # the sufficient statistics, for an auditor's own arithmetic


@get("/models/", summary="Every model the service has served, with its use", tags=["quality"],
     opt={"scope": "read"}, operation_class=ProblemOperation)
async def list_models(services: ServicesDependency) -> ModelsPage:
    async with services.reading() as connection:
        position = await queries.tracked_position(connection)
        return ModelsPage(items=await quality.models(connection), as_of_position=position)


@get(
    "/models/{sha256:str}/quality",
    summary="A model's measured quality against the labels: now, or as of an earlier position of the log",
    tags=["quality"],
    opt={"scope": "read"},
    operation_class=ProblemOperation,
    responses={404: problem_spec("No such model"), 400: problem_spec("A malformed window or position")},
)
async def model_quality(
    services: ServicesDependency,
    sha256: Annotated[str, PathParameter(pattern=r"^[0-9a-f]{64}$", description="The model's sha256")],
    since: Annotated[datetime | None, QueryParameter(description="Predictions made at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, QueryParameter(description="Predictions made before (ISO 8601)")] = None,
    bucket: Annotated[Literal["hour", "day"], QueryParameter(description="The series' bucket")] = "day",
    as_of: Annotated[int | None, QueryParameter(ge=0, le=MAX_BIGINT, description="Answer as of this log position")] = None,
    reference_since: Annotated[datetime | None, QueryParameter(description="Drift reference window start (default: the model's first day)")] = None,
    reference_until: Annotated[datetime | None, QueryParameter(description="Drift reference window end")] = None,
) -> ModelQuality:
    return await measure(services, sha256, since=in_utc("since", since), until=in_utc("until", until),
                         bucket=bucket, as_of=as_of, reference_since=in_utc("reference_since", reference_since),
                         reference_until=in_utc("reference_until", reference_until))


async def measure(
    services: ServicesDependency, sha256: str, *, since: datetime | None = None, until: datetime | None = None,
    bucket: Literal["hour", "day"] = "day", as_of: int | None = None, reference_since: datetime | None = None,
    reference_until: datetime | None = None,
) -> ModelQuality:
    """One model's quality: what `GET /models/{sha256}/quality` answers and the console shows."""
    since, until = since or _BEGINNING, until or _END
    async with services.reading() as connection:
        found = await quality.models(connection, sha256)
        if not found:
            raise Problem(404, "model_not_found", f"no model {sha256} was ever registered")
        (entry,) = found
        tracked = await queries.tracked_position(connection)
        if as_of is not None and as_of > tracked:
            # Bounded wait, as for read-your-writes; a position beyond the log is a client's mistake.
            head = await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")
            if as_of > head:
                raise Problem(400, "as_of_beyond_head", f"the log's head is at {head}")
            if not await queries.wait_until_projected(connection, as_of, services.settings.read_your_writes_timeout_s):
                raise Problem(503, "projection_behind", "the read model has not reached that position yet",
                              headers={"Retry-After": "1"})
            tracked = await queries.tracked_position(connection)
        position = tracked if as_of is None else as_of
        current = as_of is None or as_of == tracked
        k = entry.num_classes
        reference_since = (reference_since or entry.first_day()
                           or datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0))
        reference_until = reference_until or reference_since + timedelta(days=1)
        buckets, reference = await quality.window_and_reference(
            connection, sha256, k, position=position, current=current, since=since, until=until, bucket=bucket,
            reference_since=reference_since, reference_until=reference_until)
    counts = quality.total(buckets, k)
    return ModelQuality(
        model=entry, as_of_position=position, window=Window(since=_shown(since), until=_shown(until)),
        bucket=bucket, report=quality_report(counts), confusion=counts.confusion,
        calibration=_calibration(counts), series=[_series(b, reference) for b in buckets],
        drift=DriftAnswer(reference=Window(since=reference_since, until=reference_until),
                          measures=drift(reference, counts)),
        counts=counts,
    )


def _shown(moment: datetime) -> datetime | None:
    return None if moment in (_BEGINNING, _END) else moment


def _calibration(counts: QualityCounts) -> list[CalibrationBin]:
    bins = []
    for index, (n, confidence, hits) in enumerate(zip(counts.bin_counts, counts.bin_confidence_sums,
                                                      counts.bin_correct, strict=True)):
        bins.append(CalibrationBin(lower=index / 10, upper=(index + 1) / 10, count=n,
                                   mean_confidence=confidence / n if n else None, accuracy=hits / n if n else None))
    return bins


def _series(b: quality.BucketCounts, reference: QualityCounts) -> BucketQuality:
    c = b.counts
    moved = drift(reference, c)
    return BucketQuality(
        start=b.start.replace(tzinfo=timezone.utc), predictions=c.predictions, failed=c.failed, labelled=c.labelled,
        correct=c.correct, accuracy=c.correct / c.labelled if c.labelled else None,
        label_coverage=c.labelled / c.predictions if c.predictions else None,
        predicted_class_counts=list(c.predicted_class_counts), predicted_class_psi=moved.predicted_class_psi,
        confidence_psi=moved.confidence_psi,
    )


QUALITY_ROUTES = [list_models, model_quality]
