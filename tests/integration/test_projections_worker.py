"""The projection worker against PostgreSQL: applying, skipping, resuming, electing, waking, reconnecting,
draining (its process-level drills are in tests/faults/test_projection_worker.py)."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import msgspec
import pytest

from db.store import AppendRequest, EventStore
from domain.events import GroundTruthRecorded, encode_event
from projections.queries import get_prediction, list_predictions
from projections.read_model import READ_MODEL, TrackingMoved, ReadModelWriter, project_batch
from projections.worker import ProjectionRunner, worker_server_settings
from tests.factories import log_every_plan, prediction_request
from tests.proxy import TcpProxy
from tests.projection_support import (
    append,
    append_raw,
    caught_up,
    tracked_position_of,
    digest_of,
    erasure,
    eventually,
    failed_request,
    head_of,
    is_active,
    lock_holders,
    model_registration,
    runner_for,
    table_counts,
    waiting_on_lock,
)


async def test_worker_projects_made_and_failed_predictions(database, app_pool, owner):
    store = EventStore(app_pool)
    made = [prediction_request(label=str(i)) for i in range(3)]
    failed = failed_request(label="f")
    await append(store, model_registration(), *made, failed)
    runner = runner_for(database.app_dsn)
    await runner.start()
    try:
        await caught_up(owner)
        assert runner.is_active
        assert await table_counts(owner) == (4, 4, 0)

        view = await get_prediction(app_pool, made[1].stream_id)
        assert view is not None and view.status == "made" and view.error is None
        assert view.output == made[1].events[1].output and view.likely_class == 9
        assert view.filename == "digit1.png" and view.image.width == 28
        assert str(view.input_id) == made[1].events[0].input_id
        assert view.blob_sha256 == digest_of(made[1]) and not view.erased

        bad = await get_prediction(app_pool, failed.stream_id)
        assert bad is not None and bad.status == "failed" and bad.output is None and bad.likely_class is None
        assert bad.error is not None and bad.error.code == "non_finite_output"

        items, cursor = await list_predictions(app_pool, limit=10)
        assert [v.prediction_id for v in items] == [failed.stream_id] + [r.stream_id for r in reversed(made)]
        assert cursor is None
        page, cursor = await list_predictions(app_pool, limit=2)
        assert len(page) == 2 and cursor == page[-1].position
        rest, cursor = await list_predictions(app_pool, limit=2, before_position=cursor)
        assert [v.prediction_id for v in page + rest] == [v.prediction_id for v in items] and cursor is None
        assert [v.status for v in (await list_predictions(app_pool, limit=10, likely_class=9))[0]] == ["made"] * 3
        assert (await list_predictions(app_pool, limit=10, model_version="nope"))[0] == []
        since = items[1].recorded_at
        assert all(v.recorded_at >= since for v in (await list_predictions(app_pool, limit=10, since=since))[0])
        assert (await list_predictions(app_pool, limit=10, until=items[-1].recorded_at))[0] == []

        # An erasure marks the inputs of its blob recorded before it, not a later upload of it.
        again = prediction_request(content=next(iter(made[0].blobs.values())))
        await append(store, erasure(digest_of(made[0])), again)
        await caught_up(owner)
        assert (await get_prediction(app_pool, made[0].stream_id)).erased
        assert not (await get_prediction(app_pool, again.stream_id)).erased
        assert not (await get_prediction(app_pool, made[1].stream_id)).erased
    finally:
        await runner.stop()
    assert not runner.is_active


async def test_bad_and_unknown_events_are_reported_and_skipped_without_looping(database, app_pool, owner):
    store = EventStore(app_pool)
    before = prediction_request(label="before")
    nul = prediction_request(label="nul")
    nul.events[0] = msgspec.structs.replace(nul.events[0], filename="a\x00b.png")
    await append(store, before, nul)  # json (not jsonb) keeps \u0000: the log accepts it
    unknown = await append_raw(owner, "SomethingNew", '{"x": 1}')
    newer = await append_raw(owner, "PredictionMade", '{"output": []}', schema_version=99)
    undecodable = await append_raw(owner, "PredictionMade", '{"output": "not a list"}')
    bad_input_id = await append_raw(
        owner, "PredictionRequested", json.dumps({**json.loads(encode_event(before.events[0])), "input_id": "x"})
    )
    after = prediction_request(label="after")
    await append(store, after)

    runner = runner_for(database.app_dsn, batch_size=1000)
    await runner.start()
    try:
        await caught_up(owner)
        errors = {row["position"]: row for row in await owner.fetch("SELECT * FROM projection_errors")}
        nul_request, nul_outcome = 3, 4
        assert set(errors) == {nul_request, nul_outcome, unknown, newer, undecodable, bad_input_id}
        assert errors[nul_request]["reason"] == "rejected" and "CharacterNotInRepertoire" in errors[nul_request]["detail"]
        assert errors[nul_outcome]["reason"] == "rejected"
        assert errors[unknown]["reason"] == "unknown_event" and errors[newer]["reason"] == "unknown_event"
        assert errors[undecodable]["reason"] == "undecodable"
        assert errors[bad_input_id]["reason"] == "undecodable"
        assert await get_prediction(app_pool, before.stream_id) is not None
        assert await get_prediction(app_pool, after.stream_id) is not None
        assert await get_prediction(app_pool, nul.stream_id) is None
        applied = runner.events_applied
        await asyncio.sleep(0.5)  # a few polls: nothing is retried
        assert runner.events_applied == applied and runner.events_skipped == 6
        assert await table_counts(owner) == (2, 2, 6)
    finally:
        await runner.stop()


async def test_cancelled_mid_batch_resumes_without_duplicates_or_gaps(database, app_pool, owner):
    store = EventStore(app_pool)
    requests = [prediction_request(label=str(i)) for i in range(20)]
    await append(store, *requests)
    blocker = await asyncpg.connect(database.owner_dsn)
    runner = runner_for(database.app_dsn, batch_size=7)
    try:
        async with blocker.transaction():
            # The worker's first batch writes its inputs, then blocks on predictions: mid-batch.
            await blocker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
            await runner.start()
            await eventually(lambda: waiting_on_lock(owner))
            runner._task.cancel()  # type: ignore[union-attr]
            with pytest.raises(asyncio.CancelledError):
                await runner._task  # type: ignore[misc]
        assert await tracked_position_of(owner) == 0
        assert await table_counts(owner) == (0, 0, 0)
    finally:
        await blocker.close()
    second = runner_for(database.app_dsn, batch_size=7)
    await second.start()
    try:
        await caught_up(owner)
        assert await table_counts(owner) == (20, 20, 0)
        positions = [r[0] for r in await owner.fetch("SELECT position FROM predictions ORDER BY position")]
        assert positions == list(range(2, 41, 2))
    finally:
        await second.stop()


async def test_two_workers_exactly_one_active_and_failover_on_stop(database, app_pool, owner):
    store = EventStore(app_pool)
    first, second = runner_for(database.app_dsn), runner_for(database.app_dsn)
    await first.start()
    await eventually(lambda: is_active(first))
    await second.start()
    try:
        await append(store, prediction_request())
        await caught_up(owner)
        await asyncio.sleep(0.3)  # several lock polls
        assert first.is_active and not second.is_active and await lock_holders(owner) == 1
        await first.stop()
        took = await eventually(lambda: is_active(second), timeout_s=15)
        assert took < 15
        await append(store, prediction_request())
        await caught_up(owner)
        assert await table_counts(owner) == (2, 2, 0)
        assert first.events_applied == 2 and second.events_applied == 2
    finally:
        await first.stop()
        await second.stop()


async def test_a_deposed_workers_late_write_is_refused(database, app_pool, owner):
    store = EventStore(app_pool)
    await append(store, prediction_request(), prediction_request())
    writer = ReadModelWriter()
    deposed = await asyncpg.connect(database.app_dsn)
    successor = await asyncpg.connect(database.app_dsn)
    try:
        # Both saw position 0; the successor applies first.
        position, count, _ = await project_batch(successor, writer, name="read_model", expected=0, batch_size=100)
        assert (position, count) == (4, 4)
        with pytest.raises(TrackingMoved):
            await project_batch(deposed, writer, name="read_model", expected=0, batch_size=100)
        assert await table_counts(owner) == (2, 2, 0) and await tracked_position_of(owner) == 4
        # The compare-and-set itself refuses a stale position, whatever came before it.
        async with deposed.transaction():
            status = await deposed.execute(
                "UPDATE projection_tracking SET position = 99 WHERE name = 'read_model' AND position = 0"
            )
        assert status == "UPDATE 0"
    finally:
        await deposed.close()
        await successor.close()


async def test_notify_wakes_the_worker_promptly(database, app_pool, owner):
    store = EventStore(app_pool)
    runner = runner_for(database.app_dsn, poll_interval_s=30)
    await runner.start()
    try:
        await eventually(lambda: is_active(runner))
        await asyncio.sleep(0.1)  # past the first (empty) batch: now waiting for a notification
        await append(store, prediction_request())
        took = await eventually(lambda: _tracked_position_is(owner, 2), timeout_s=5, interval_s=0.005)
        assert took < 1.0
    finally:
        await runner.stop()


async def test_a_coalescing_worker_is_not_woken_by_the_commits_it_gathers(database, app_pool, owner):
    """While commits gather after a batch, the worker does not listen: a NOTIFY per commit would
    cost its backend and its process a wake-up each for nothing. It listens again before it
    reads, so what committed meanwhile is applied by the next step, and later commits wake it."""
    store = EventStore(app_pool)
    runner = runner_for(database.app_dsn, poll_interval_s=30, coalesce_s=0.5)
    await runner.start()
    try:
        await eventually(lambda: is_active(runner))
        await asyncio.sleep(0.1)  # past the first (empty) batch: now waiting for a notification
        await append(store, prediction_request())
        await eventually(lambda: _tracked_position_is(owner, 2), timeout_s=5, interval_s=0.005)
        await asyncio.sleep(0.05)  # coalescing now
        before = runner.notifications
        for _ in range(10):
            await append(store, prediction_request())
        assert runner.notifications - before <= 1  # without the UNLISTEN: one per commit
        await eventually(lambda: _tracked_position_is(owner, 22), timeout_s=5)
        await asyncio.sleep(0.6)  # the next coalescing window ends with nothing to read
        await append(store, prediction_request())  # a later commit still wakes it
        took = await eventually(lambda: _tracked_position_is(owner, 24), timeout_s=5, interval_s=0.005)
        assert took < 1.0 and runner.notifications > before
    finally:
        await runner.stop()


async def test_an_uploads_batch_plans_once_and_only_probes_unique_indexes(database, app_pool):
    """A batch of uploads only runs with generic plans (made once, without the batch's values: an
    unnest of a parameter is estimated at 10 rows, of a known array at its length), and made on
    empty read tables they still probe the unique indexes instead of scanning `inputs` or
    `predictions`. A batch with labels keeps the session's custom plans."""
    store = EventStore(app_pool)
    connection = await asyncpg.connect(database.owner_dsn, server_settings=worker_server_settings(READ_MODEL))
    plans = await log_every_plan(connection)
    writer = ReadModelWriter()
    try:
        requests = [prediction_request() for _ in range(3)]
        position = await append(store, *requests)
        assert (await project_batch(connection, writer, name=READ_MODEL, expected=0, batch_size=100))[:2] == (position, 6)
        outcomes = [plan for plan in plans if 'INSERT INTO "public".predictions' in plan]
        cells = [plan for plan in plans if ".quality_cells AS q" in plan and "NULL::int AS truth" in plan]
        assert len(outcomes) == 1 and len(cells) == 1
        assert "Index Scan using inputs_stream_id_key on inputs" in outcomes[0]
        assert "Index Scan using predictions_pkey on predictions" in cells[0]
        assert " rows=10 " in outcomes[0]  # generic: three outcomes, estimated as an unknown array
        written = [plan for plan in plans if "public." in plan or '"public".' in plan]
        assert not [plan for plan in written if "Seq Scan" in plan]

        plans.clear()
        label = AppendRequest(stream_id=requests[0].stream_id, expected_version=2,
                              events=[GroundTruthRecorded(label=3, source="test")])
        position = await append(store, label, prediction_request())
        assert (await project_batch(connection, writer, name=READ_MODEL, expected=6, batch_size=100))[1] == 3
        outcomes = [plan for plan in plans if 'INSERT INTO "public".predictions' in plan]
        assert len(outcomes) == 1 and " rows=10 " not in outcomes[0]  # custom: planned for its one outcome
    finally:
        await connection.close()


async def _tracked_position_is(connection, position: int) -> bool:
    return await tracked_position_of(connection) == position


async def test_polling_catches_up_when_notifications_are_missed(database, app_pool, owner):
    runner = runner_for(database.app_dsn, poll_interval_s=0.2)
    await runner.start()
    try:
        await eventually(lambda: is_active(runner))
        # Appended without a NOTIFY: only the poll can find it.
        position = await append_raw(owner, "ModelRegistered", encode_event(model_registration().events[0]))
        await eventually(lambda: _tracked_position_is(owner, position), timeout_s=3)
    finally:
        await runner.stop()


async def test_the_worker_reconnects_when_the_database_goes_away_and_comes_back(database, app_pool, owner):
    proxy = TcpProxy(database.app_dsn)
    await proxy.start()
    store = EventStore(app_pool)
    runner = runner_for(proxy.dsn, poll_interval_s=0.2, connect_timeout_s=1)
    await runner.start()
    try:
        await eventually(lambda: is_active(runner))
        await proxy.stop()
        await append(store, prediction_request())  # notified while the worker is cut off
        await eventually(lambda: _not_active(runner))
        await asyncio.sleep(0.3)  # a few failed reconnects
        await proxy.start()
        await caught_up(owner, timeout_s=5)
        assert runner.is_active and runner.restarts >= 1
        assert await table_counts(owner) == (1, 1, 0)
    finally:
        await runner.stop()
        await proxy.stop()


async def _not_active(runner: ProjectionRunner) -> bool:
    return not runner.is_active


async def test_stop_drains_the_batch_in_hand(database, app_pool, owner):
    store = EventStore(app_pool)
    await append(store, *[prediction_request() for _ in range(10)])
    blocker = await asyncpg.connect(database.owner_dsn)
    runner = runner_for(database.app_dsn)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE")
            await runner.start()
            await eventually(lambda: waiting_on_lock(owner))
            stopping = asyncio.create_task(runner.stop())
            await asyncio.sleep(0.2)
            assert not stopping.done()  # waiting for its batch
        await asyncio.wait_for(stopping, 5)
        assert await tracked_position_of(owner) == await head_of(owner) == 20
        assert await table_counts(owner) == (10, 10, 0)
    finally:
        await blocker.close()
