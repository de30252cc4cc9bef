"""Model quality from the read tables equals a small reference computed from the raw events:
random predictions, labels, corrections and withdrawals; now and as of earlier positions."""

from __future__ import annotations

import hashlib
import uuid
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db.store import AppendRequest, EventStore
from domain.events import (
    GroundTruthRecorded,
    GroundTruthWithdrawn,
    ImageFacts,
    ModelRef,
    ModelRegistered,
    PredictionFailed,
    PredictionMade,
    PredictionRequested,
)
from domain.model_port import likely_class
from domain.quality import QualityCounts, from_prediction, merge
from domain.streams import model_stream_id
from projections import quality, queries
from projections.worker import ProjectionRunner
from tests.projection_support import caught_up

pytestmark = pytest.mark.timeout(300)

HOUR = timedelta(hours=1)
BASE = datetime(2026, 12, 1, tzinfo=timezone.utc)
EPOCH, FAR = datetime(2000, 1, 1, tzinfo=timezone.utc), datetime(2100, 1, 1, tzinfo=timezone.utc)


@st.composite
def histories(draw):
    """(K, predictions): each a (output or None for failed, hour offset, label steps), where a
    step is a label (int) or None (a withdrawal, when a label is current)."""
    k = draw(st.integers(2, 4))
    scalar = k == 2 and draw(st.booleans())
    predictions = []
    for _ in range(draw(st.integers(1, 12))):
        failed = draw(st.integers(0, 9)) == 0
        if failed:
            output = None
        elif scalar:
            output = [draw(st.integers(0, 20)) / 20]
        else:
            weights = draw(st.lists(st.integers(0, 6), min_size=k, max_size=k).filter(any))
            output = [w / sum(weights) for w in weights]
        steps, current = [], False
        for _ in range(draw(st.integers(0, 3))):
            if current and draw(st.booleans()):
                steps.append(None)
                current = False
            else:
                steps.append(draw(st.integers(0, k - 1)))
                current = True
        predictions.append((output, draw(st.integers(0, 3)), steps))
    return k, scalar, predictions


async def record(store: EventStore, k: int, scalar: bool, predictions) -> tuple[ModelRef, list[dict]]:
    """Append the history (predictions first, then label rounds); returns what each event was."""
    model = ModelRef(name="q", version="1", sha256=hashlib.sha256(uuid.uuid4().bytes).hexdigest())
    registered = ModelRegistered(model=model, size_bytes=1, input_shape=[2, 2, 1],
                                 output_kind="scalar" if scalar else "vector", num_classes=k, runtime={})
    await store.append([AppendRequest(stream_id=model_stream_id(model.sha256), expected_version=0, events=[registered])])
    facts, requests = [], []
    for output, hour, steps in predictions:
        requested = PredictionRequested(
            input_id=str(uuid.uuid4()), blob_sha256="ab" * 32, size_bytes=1, filename=None, content_type=None,
            image=ImageFacts(format="PNG", mode="L", width=2, height=2), preprocessing={}, tensor_sha256="cd" * 32,
            model=model,
        )
        outcome = (
            PredictionFailed(error_code="x", message="x", model=model, device="cpu") if output is None else
            PredictionMade(output=output, likely_class=likely_class(output), model=model, device="cpu", batch_size=1,
                           batch_index=0, runtime={}, inference_ms=0.0, queue_wait_ms=0.0)
        )
        stream = uuid.uuid4()
        requests.append(AppendRequest(stream_id=stream, expected_version=0, events=[requested, outcome]))
        facts.append({"stream": stream, "output": output, "hour": hour, "steps": steps, "labels": []})
    committed = await store.append(requests)
    for fact, outcome in zip(facts, committed, strict=True):
        fact["position"] = outcome.events[-1].position
    for round_ in range(3):  # labels arrive later, in rounds: corrections interleave across predictions
        requests, which = [], []
        for fact in facts:
            if round_ < len(fact["steps"]):
                step = fact["steps"][round_]
                event = GroundTruthWithdrawn(reason="r") if step is None else GroundTruthRecorded(label=step, source="s")
                requests.append(AppendRequest(stream_id=fact["stream"], expected_version=2 + round_, events=[event]))
                which.append((fact, step))
        if requests:
            for (fact, step), outcome in zip(which, await store.append(requests), strict=True):
                fact["labels"].append((outcome.events[0].position, step))
    return model, facts


def reference(facts: list[dict], k: int, position: int) -> dict[datetime, QualityCounts]:
    """The counts per hour from the raw history, as of `position`."""
    buckets: dict[datetime, list[QualityCounts]] = {}
    for fact in facts:
        if fact["position"] > position:
            continue
        label = None
        for at, step in fact["labels"]:
            if at <= position:
                label = step
        counts = from_prediction(fact["output"], label, fact["output"] is None, num_classes=k)
        buckets.setdefault(BASE + fact["hour"] * HOUR, []).append(counts)
    return {hour: merge(items, k) for hour, items in buckets.items()}


def assert_counts_equal(actual: QualityCounts, expected: QualityCounts) -> None:
    for field in ("num_classes", "predictions", "failed", "labelled", "labelled_failed", "correct", "confusion",
                  "bin_counts", "bin_correct", "predicted_class_counts", "confidence_histogram"):
        assert getattr(actual, field) == getattr(expected, field), field
    assert actual.brier_sum == pytest.approx(expected.brier_sum, abs=1e-9)
    assert actual.bin_confidence_sums == pytest.approx(expected.bin_confidence_sums, abs=1e-9)


async def test_quality_equals_the_reference_now_and_as_of_every_position(database, app_pool, owner):
    runner = ProjectionRunner(database.app_dsn, poll_interval_s=0.1, lock_poll_s=0.1, batch_size=7)
    await runner.start()
    try:
        await _run_examples(EventStore(app_pool), database, owner)
    finally:
        await runner.stop()


async def _run_examples(store, database, owner) -> None:
    """Hypothesis drives synchronous functions: draw the examples first, then check each one on
    this test's event loop (the pool belongs to it). Each example uses a model of its own, and
    every position of its history is checked as `as_of`."""
    examples = []

    @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(histories())
    def collect(history):
        examples.append(history)

    collect()
    assert examples
    connection = await asyncpg.connect(database.owner_dsn)
    try:
        for k, scalar, predictions in examples:
            model, facts = await record(store, k, scalar, predictions)
            await caught_up(owner)
            head = await connection.fetchval("SELECT max(position) FROM events")
            # The cells the projection keeps equal the reference (everything happened this hour).
            kept = await quality.bucket_counts(connection, model.sha256, k, position=head, current=True,
                                               since=EPOCH, until=FAR, bucket="day")
            assert len(kept) == 1
            assert_counts_equal(kept[0].counts, merge(reference(facts, k, head).values(), k))
            # The console's counts come from the same cells when they can: equal to counting rows.
            for filters in ({}, {"likely_class": 0}, {"likely_class": 1}, {"labelled": True}, {"labelled": False},
                            {"correct": True}, {"correct": False}, {"likely_class": 1, "labelled": True},
                            {"since": BASE - 24 * HOUR, "until": FAR}):
                assert await queries.count_from_cells(connection, **filters) == \
                    await queries.count_from_rows(connection, **filters), filters
            for fact in facts:
                await connection.execute("UPDATE predictions SET recorded_at = $2 WHERE prediction_id = $1",
                                         fact["stream"], BASE + fact["hour"] * HOUR + timedelta(minutes=7))
            positions = sorted({head, *(f["position"] for f in facts), *(at for f in facts for at, _ in f["labels"])})
            for position in positions:
                got = await quality.bucket_counts(
                    connection, model.sha256, k, position=position, current=False,
                    since=BASE - HOUR, until=BASE + 10 * HOUR, bucket="hour",
                )
                expected = reference(facts, k, position)
                assert {b.start.replace(tzinfo=timezone.utc) for b in got} == set(expected)
                for b in got:
                    assert_counts_equal(b.counts, expected[b.start.replace(tzinfo=timezone.utc)])
                # What an `as_of` answer uses: the window by day and the drift reference from one
                # pass by the hour, equal to aggregating each on its own.
                days, first_hours = await quality.window_and_reference(
                    connection, model.sha256, k, position=position, current=False, since=BASE - 24 * HOUR,
                    until=BASE + 48 * HOUR, bucket="day", reference_since=BASE, reference_until=BASE + 3 * HOUR)
                by_day = await quality.bucket_counts(connection, model.sha256, k, position=position, current=False,
                                                     since=BASE - 24 * HOUR, until=BASE + 48 * HOUR, bucket="day")
                assert [b.start for b in days] == [b.start for b in by_day]
                for mine, theirs in zip(days, by_day, strict=True):
                    assert_counts_equal(mine.counts, theirs.counts)
                assert_counts_equal(first_hours, merge((expected[h] for h in expected if h < BASE + 3 * HOUR), k))
            current = await quality.bucket_counts(connection, model.sha256, k, position=head, current=True,
                                                  since=BASE - HOUR, until=BASE + 10 * HOUR, bucket="day",
                                                  kept=False)
            assert len(current) == 1
            assert_counts_equal(current[0].counts, merge(reference(facts, k, head).values(), k))
    finally:
        await connection.close()
