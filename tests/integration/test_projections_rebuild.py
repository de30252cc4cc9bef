"""Read side, rebuild, verify and replay against PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid

import asyncpg
import msgspec
import pytest

from db.store import AppendRequest, EventStore
from domain.chain import ChainedRecord, link, to_microseconds
from harness.live import ROOT
from projections.queries import (
    get_prediction,
    lag,
    list_predictions,
    prediction_view_from_events,
    wait_until_projected,
)
from projections.rebuild import rebuild
from projections.verify import verify
from projections.worker import ProjectionRunner
from tests.factories import prediction_request
from tests.projection_support import (
    append,
    append_raw,
    caught_up,
    digest_of,
    erasure,
    eventually,
    failed_request,
    model_registration,
)

ODD_FLOATS = [-0.0, 0.0, 5e-324, 1e-300, 0.1 + 0.2, 1 / 3, 2.0**-1074 * 3, 0.9999999999999999, 1e308, 0.5]


def odd_request() -> AppendRequest:
    """A prediction whose output needs every bit of a double, -0.0 included."""
    request = prediction_request(label="odd")
    request.events[1] = msgspec.structs.replace(request.events[1], output=ODD_FLOATS, likely_class=8)
    return request


def runner_for(dsn: str, **options) -> ProjectionRunner:
    options.setdefault("poll_interval_s", 0.2)
    options.setdefault("lock_poll_s", 0.1)
    return ProjectionRunner(dsn, **options)


async def all_answers(pool) -> bytes:
    """Every list page and every single prediction, encoded as the API would."""
    pages, cursor = [], None
    while True:
        items, cursor = await list_predictions(pool, limit=7, before_position=cursor)
        pages.append(items)
        if cursor is None:
            break
    singles = [await get_prediction(pool, item.prediction_id) for page in pages for item in page]
    return msgspec.json.encode([pages, singles])


async def test_view_from_events_equals_the_projected_view(database, app_pool, owner):
    store = EventStore(app_pool)
    made, failed, odd = prediction_request(label="m"), failed_request(label="f"), odd_request()
    await append(store, made, failed, odd)
    runner = runner_for(database.app_dsn)
    await runner.start()
    try:
        await caught_up(owner)
        for request in (made, failed, odd):
            projected = await get_prediction(app_pool, request.stream_id)
            from_events = prediction_view_from_events(await store.read_stream(request.stream_id))
            assert projected is not None and from_events == projected
            assert msgspec.json.encode(from_events) == msgspec.json.encode(projected)
        odd_view = await get_prediction(app_pool, odd.stream_id)
        assert [x.hex() for x in odd_view.output] == [x.hex() for x in ODD_FLOATS]  # bit for bit, -0.0 too
        # Erasure is in a stream of its own: the caller tells it.
        await append(store, erasure(digest_of(made)))
        await caught_up(owner)
        erased = await get_prediction(app_pool, made.stream_id)
        assert erased.erased and prediction_view_from_events(await store.read_stream(made.stream_id),
                                                             erased=True) == erased
        # A stream without its outcome gives no view.
        assert prediction_view_from_events((await store.read_stream(made.stream_id))[:1]) is None
    finally:
        await runner.stop()


async def test_lag_and_the_bounded_wait_for_the_projection(database, app_pool, owner):
    store = EventStore(app_pool)
    assert await lag(app_pool) == (await lag(app_pool)).__class__(events=0, seconds=0.0)
    head = await append(store, prediction_request(), prediction_request())
    await asyncio.sleep(0.05)
    behind = await lag(app_pool)
    assert behind.events == head == 4 and behind.seconds >= 0.05
    assert not await wait_until_projected(app_pool, head, 0.1)
    runner = runner_for(database.app_dsn)
    await runner.start()
    try:
        assert await wait_until_projected(app_pool, head, 5)
        current = await lag(app_pool)
        assert current.events == 0 and current.seconds == 0.0
    finally:
        await runner.stop()


async def test_rebuild_under_concurrent_reads_and_writes_equals_a_fresh_replay(database, app_pool, owner):
    store = EventStore(app_pool)
    history = [prediction_request(label=str(i)) if i % 5 else failed_request(label=str(i)) for i in range(150)]
    await append(store, model_registration(), *history[:100])
    await append(store, erasure(digest_of(history[3])), *history[100:], odd_request())
    await append_raw(owner, "SomethingNew", "{}")
    runner = runner_for(database.app_dsn, batch_size=50)
    await runner.start()
    await caught_up(owner)
    before = await all_answers(app_pool)
    known = [request.stream_id for request in history]

    stop = asyncio.Event()
    reads, read_failures, written = 0, [], []

    async def reader() -> None:
        nonlocal reads
        index = 0
        while not stop.is_set():
            try:
                view = await get_prediction(app_pool, known[index % len(known)])
                assert view is not None and view.prediction_id == known[index % len(known)]
                items, _ = await list_predictions(app_pool, limit=20)
                assert len(items) == 20
                reads += 1
            except Exception as error:  # noqa: BLE001 - collected: every GET must keep answering
                read_failures.append(error)
            index += 1
            await asyncio.sleep(0)

    async def writer() -> None:
        while not stop.is_set():
            request = prediction_request()
            await append(store, request)
            written.append(request.stream_id)
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
    try:
        reads_before = reads
        report = await rebuild(database.owner_dsn, batch_size=20)
        assert reads > reads_before and report.events >= 303 and report.skipped == 1
        # While writes go on: verify compares within one snapshot.
        checked = await verify(database.owner_dsn)
        assert checked.ok, checked.problem
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    try:
        assert read_failures == []
        assert written, "the writer kept appending during the rebuild"
        await caught_up(owner)
        # The live worker carried on into the new tables: nothing lost, nothing doubled.
        assert await owner.fetchval("SELECT count(*) FROM predictions") == 151 + len(written)
        checked = await verify(database.owner_dsn)
        assert checked.ok, checked.problem
        after = await all_answers(app_pool)
        # The old answers are unchanged byte for byte (newer predictions only come first).
        old_ids = set(known)
        assert _restricted(after, old_ids | {None}) == _restricted(before, old_ids | {None})
        owners = await owner.fetch(
            "SELECT schemaname, tableowner FROM pg_tables WHERE tablename IN ('inputs', 'predictions', 'projection_errors')"
        )
        assert len(owners) == 3 and all(r["schemaname"] == "public" and r["tableowner"] != "audit_app" for r in owners)
        assert await owner.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'read_model_%'") == 0
    finally:
        await runner.stop()


def _restricted(encoded: bytes, ids: set) -> list:
    """The single-prediction answers for the given ids, in order."""
    _, singles = json.loads(encoded)
    return [item for item in singles if item and uuid.UUID(item["prediction_id"]) in ids]


async def test_rebuild_reproduces_byte_identical_answers(database, app_pool, owner):
    store = EventStore(app_pool)
    await append(store, *[prediction_request(label=str(i)) for i in range(30)], failed_request(), odd_request())
    runner = runner_for(database.app_dsn)
    await runner.start()
    try:
        await caught_up(owner)
        before = await all_answers(app_pool)
        await rebuild(database.owner_dsn, batch_size=7)
        assert await all_answers(app_pool) == before
    finally:
        await runner.stop()


async def projected(database, app_pool, owner, *requests) -> None:
    await append(EventStore(app_pool), *requests)
    runner = runner_for(database.app_dsn)
    await runner.start()
    try:
        await caught_up(owner)
    finally:
        await runner.stop()


async def test_verify_passes_and_detects_an_edited_read_table_row(database, app_pool, owner):
    requests = [prediction_request(label=str(i)) for i in range(5)]
    odd = odd_request()
    await projected(database, app_pool, owner, *requests, odd)
    report = await verify(database.owner_dsn)
    assert report.ok and report.tracked == report.head_position == 12
    assert report.rows == {"inputs": 6, "predictions": 6, "labels": 0, "quality_cells": 2, "projection_errors": 0}

    await owner.execute("UPDATE predictions SET likely_class = 3 WHERE prediction_id = $1", requests[2].stream_id)
    report = await verify(database.owner_dsn)
    assert not report.ok and report.difference is not None
    assert (report.difference.table, report.difference.column) == ("predictions", "likely_class")
    assert str(requests[2].stream_id) in report.difference.key
    assert (report.difference.live, report.difference.replayed) == ("3", "9")

    await owner.execute("UPDATE predictions SET likely_class = 9 WHERE prediction_id = $1", requests[2].stream_id)
    assert (await verify(database.owner_dsn)).ok
    # 0.0 = -0.0 as numbers; verify compares exact spellings.
    await owner.execute("UPDATE predictions SET output[1] = 0.0 WHERE prediction_id = $1", odd.stream_id)
    assert await owner.fetchval("SELECT output[1] = '-0'::float8 FROM predictions WHERE prediction_id = $1",
                                odd.stream_id)
    report = await verify(database.owner_dsn)
    assert not report.ok and report.difference.column == "output" and report.difference.replayed.startswith("{-0,")
    await owner.execute("UPDATE predictions SET output[1] = '-0' WHERE prediction_id = $1", odd.stream_id)
    assert (await verify(database.owner_dsn)).ok
    await owner.execute("DELETE FROM predictions WHERE prediction_id = $1", requests[0].stream_id)
    report = await verify(database.owner_dsn)
    assert not report.ok and report.difference.column is None and "replay only" in report.problem


async def _edit_event(owner, position: int, data_sql: str) -> None:
    """What a superuser can do: switch the append-only triggers off and rewrite an event."""
    async with owner.transaction():
        await owner.execute("ALTER TABLE events DISABLE TRIGGER events_refuse_update_delete")
        await owner.execute(f"UPDATE events SET data = {data_sql} WHERE position = $1", position)
        await owner.execute("ALTER TABLE events ENABLE TRIGGER events_refuse_update_delete")


async def test_verify_detects_an_edited_event(database, app_pool, owner):
    await projected(database, app_pool, owner, *[prediction_request() for _ in range(3)])
    await _edit_event(owner, 4, "replace(data::text, '\"likely_class\":9', '\"likely_class\":4')::json")
    report = await verify(database.owner_dsn)
    assert not report.ok and report.chain_break == 4 and "position 4" in report.problem


async def test_verify_detects_an_added_json_key(database, app_pool, owner):
    await projected(database, app_pool, owner, *[prediction_request() for _ in range(3)])
    await _edit_event(owner, 5, "(rtrim(data::text, '}') || ',\"extra\":1}')::json")
    assert "extra" in await owner.fetchval("SELECT data::text FROM events WHERE position = 5")
    report = await verify(database.owner_dsn)
    assert not report.ok and report.chain_break == 5


def _cli(database, *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "DATABASE_URL": database.owner_dsn, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=environment,
                          capture_output=True, timeout=30)


async def test_the_cli_replays_verifies_and_rebuilds(database, app_pool, owner):
    await projected(database, app_pool, owner, prediction_request(), failed_request(), model_registration())

    replayed = _cli(database, "replay", "--after", "1", "--limit", "3")
    assert replayed.returncode == 0, replayed.stderr.decode()
    lines = [json.loads(line) for line in replayed.stdout.decode().splitlines()]
    assert [line["position"] for line in lines] == [2, 3, 4]
    stored = {row["position"]: row for row in await owner.fetch("SELECT *, data::text AS d, metadata::text AS m FROM events")}
    previous = bytes(stored[1]["hash"])
    for line in lines:
        row = stored[line["position"]]
        assert (line["data"], line["metadata"], line["type"]) == (row["d"], row["m"], row["event_type"])
        # An auditor's own check of the chain from the NDJSON alone.
        from datetime import datetime

        record = ChainedRecord(
            position=line["position"], stream_id=line["stream_id"], stream_version=line["stream_version"],
            event_type=line["type"], schema_version=line["schema_version"],
            recorded_at_us=to_microseconds(datetime.fromisoformat(line["recorded_at"])),
            data=line["data"], metadata=line["metadata"],
        )
        previous = link(previous, record)
        assert previous.hex() == line["hash"]

    checked = _cli(database, "verify")
    assert checked.returncode == 0 and b"OK" in checked.stdout, checked.stderr.decode()
    rebuilt = _cli(database, "rebuild")
    assert rebuilt.returncode == 0 and b"rebuilt 5 events" in rebuilt.stdout, rebuilt.stderr.decode()
    await owner.execute("UPDATE inputs SET filename = 'evil.png'")
    broken = _cli(database, "verify")
    assert broken.returncode == 1 and b"inputs" in broken.stdout and b"filename" in broken.stdout


@pytest.mark.parametrize("limit", [1, 3, 100])
async def test_list_pages_cover_everything_once(database, app_pool, owner, limit):
    requests = [prediction_request(label=str(i)) for i in range(9)]
    await projected(database, app_pool, owner, *requests)
    seen, cursor = [], None
    while True:
        items, cursor = await list_predictions(app_pool, limit=limit, before_position=cursor)
        seen.extend(item.prediction_id for item in items)
        if cursor is None:
            break
    assert seen == [request.stream_id for request in reversed(requests)]


async def test_a_made_event_of_another_schema_shape_is_not_mistaken(database, app_pool, owner):
    """Unknown fields in an event (a newer writer) are ignored the same way on both paths."""
    store = EventStore(app_pool)
    request = prediction_request()
    await append(store, AppendRequest(stream_id=request.stream_id, expected_version=0, events=request.events[:1],
                                      metadata={}, blobs=request.blobs))
    made = json.loads(msgspec.json.encode(request.events[1]))
    await append_raw(owner, "PredictionMade", json.dumps({**made, "new_field": [1, 2]}), stream_id=request.stream_id,
                     stream_version=2)
    runner = runner_for(database.app_dsn)
    await runner.start()
    try:
        await caught_up(owner)
        view = await get_prediction(app_pool, request.stream_id)
        assert view is not None and view == prediction_view_from_events(await store.read_stream(request.stream_id))
        assert view.status == "made" and view.output == made["output"] and view.likely_class == made["likely_class"]
        assert await owner.fetchval("SELECT count(*) FROM projection_errors") == 0
    finally:
        await runner.stop()


async def test_bulk_replay_equals_the_live_path_on_a_hostile_log(database, app_pool, owner):
    """Rebuild and verify take a COPY fast path; on every kind of bad event they must still give
    exactly what the live worker gave (verify compares the two, errors included)."""
    store = EventStore(app_pool)
    good = [prediction_request(label=str(i)) for i in range(6)]
    nul = prediction_request(label="nul")
    nul.events[0] = msgspec.structs.replace(nul.events[0], filename="a\x00b.png")
    await append(store, *good[:2], nul, *good[2:4])
    made = msgspec.json.encode(good[0].events[1]).decode()
    requested = msgspec.json.encode(good[1].events[0]).decode()
    await append_raw(owner, "PredictionMade", made, stream_id=good[0].stream_id, stream_version=3)  # 2nd outcome
    await append_raw(owner, "PredictionMade", made)  # an outcome without a request
    dup_input = json.loads(requested)  # a request reusing another input's id
    await append_raw(owner, "PredictionRequested", json.dumps(dup_input))
    await append_raw(owner, "PredictionRequested", json.dumps({**dup_input, "input_id": str(uuid.uuid4())}),
                     stream_id=good[2].stream_id, stream_version=3)  # a second request in a stream
    await append(store, *good[4:], erasure(digest_of(good[4])))
    runner = runner_for(database.app_dsn, batch_size=4)
    await runner.start()
    try:
        await caught_up(owner)
        errors = await owner.fetchval("SELECT count(*) FROM projection_errors")
        assert errors == 6  # NUL request and its outcome, 2nd outcome, orphan, duplicate id, 2nd request
        before = await all_answers(app_pool)
        for batch_size in (3, 1000):
            report = await verify(database.owner_dsn, page_size=batch_size)
            assert report.ok, report.problem
            assert report.skipped_events == 6
            await rebuild(database.owner_dsn, batch_size=batch_size)
            assert await all_answers(app_pool) == before
            assert await owner.fetchval("SELECT count(*) FROM projection_errors") == 6
    finally:
        await runner.stop()


async def test_the_swap_waits_briefly_and_retries_while_a_long_reader_holds_the_tables(database, app_pool, owner):
    await projected(database, app_pool, owner, *[prediction_request() for _ in range(3)])
    reader = await asyncpg.connect(database.app_dsn)
    try:
        transaction = reader.transaction()
        await transaction.start()
        await reader.fetch("SELECT * FROM predictions")  # holds its lock until the transaction ends
        rebuilding = asyncio.create_task(rebuild(database.owner_dsn, lock_timeout_s=0.1))
        await asyncio.sleep(0.4)
        # Meanwhile other readers are held up by a waiting swap for at most its lock timeout.
        started = asyncio.get_running_loop().time()
        assert len((await list_predictions(app_pool, limit=10))[0]) == 3
        assert asyncio.get_running_loop().time() - started < 1.0
        assert not rebuilding.done()
        await transaction.rollback()
        report = await asyncio.wait_for(rebuilding, 10)
        assert report.swap_attempts >= 2
        assert (await verify(database.owner_dsn)).ok
    finally:
        await reader.close()


async def test_the_swap_takes_the_read_tables_in_the_readers_order(database, app_pool, owner):
    """A reader that holds `predictions` (the first table of its join) and then needs `inputs`
    must not deadlock with a swap waiting for `predictions`."""
    await projected(database, app_pool, owner, *(prediction_request(label=str(i)) for i in range(5)))
    reader = await asyncpg.connect(database.app_dsn)
    try:
        async with reader.transaction():
            await reader.fetchval("SELECT count(*) FROM public.predictions")  # holds AccessShare
            swap = asyncio.create_task(rebuild(database.owner_dsn, lock_timeout_s=5.0))

            async def swap_is_waiting() -> bool:
                return bool(await owner.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'relation'"
                    " AND relation = 'public.predictions'::regclass"
                ))

            await eventually(swap_is_waiting, timeout_s=10)
            # With the swap holding `inputs` already, this would be a deadlock (one side killed).
            assert await reader.fetchval("SELECT count(*) FROM public.inputs") == 5
        report = await asyncio.wait_for(swap, 20)
        assert report.events >= 10
    finally:
        await reader.close()
