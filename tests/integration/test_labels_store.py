"""Labels through the real store and group commit: concurrency, failed and erased predictions."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from db.group_commit import GroupCommitter
from db.store import AppendRequest, EventStore, IdempotencyKeyReused
from domain.events import GroundTruthRecorded, ModelRegistered
from domain.rejections import Rejected
from domain.streams import model_stream_id
from tests.factories import MODEL, prediction_request
from domain.labels import label_target, target_of
from tests.projection_support import append, caught_up, failed_request, runner_for
from usecases.erase import erase
from usecases.errors import NotFound
from usecases.labels import LabelService

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def labels(app_pool):
    store = EventStore(app_pool)
    committer = GroupCommitter(store)
    committer.start()
    yield LabelService(store, committer), store
    await committer.close()


def registration(num_classes: int = 10) -> AppendRequest:
    event = ModelRegistered(model=MODEL, size_bytes=1, input_shape=[28, 28, 1], output_kind="vector",
                            num_classes=num_classes, runtime={})
    return AppendRequest(stream_id=model_stream_id(MODEL.sha256), expected_version=0, events=[event])


async def test_two_labels_at_once_both_land_in_order_and_the_later_is_current(labels):
    service, store = labels
    request = prediction_request()
    await append(store, request)
    first, second = await asyncio.gather(
        service.record(request.stream_id, label=1, source="a", metadata={}),
        service.record(request.stream_id, label=2, source="b", metadata={}),
    )
    versions = sorted(r.events[0].stream_version for r in (first, second))
    assert versions == [3, 4]
    stream = [e.decode() for e in await store.read_stream(request.stream_id)]
    assert [e.stream_version for e in await store.read_stream(request.stream_id)] == [1, 2, 3, 4]
    last = stream[-1]
    assert isinstance(last, GroundTruthRecorded)
    history = await service.history(request.stream_id)
    assert [h.stream_version for h in history] == [3, 4] and history[-1].label == last.label
    # What bulk labelling reads: where the stream is, and only its request and outcome.
    version, first = (await store.read_stream_starts([request.stream_id, uuid.uuid4()]))[request.stream_id]
    assert version == 4 and first == stream[:2]


async def test_many_concurrent_labels_for_one_prediction_all_land(labels):
    service, store = labels
    request = prediction_request()
    await append(store, request)
    await asyncio.gather(*(service.record(request.stream_id, label=i % 10, source=f"s{i}", metadata={})
                           for i in range(12)))
    assert [e.stream_version for e in await store.read_stream(request.stream_id)] == list(range(1, 15))


async def test_withdraw_then_relabel(labels):
    service, store = labels
    request = prediction_request()
    await append(store, request)
    await service.record(request.stream_id, label=4, source="a", metadata={})
    await service.withdraw(request.stream_id, reason="wrong crop", metadata={})
    with pytest.raises(Rejected) as caught:
        await service.withdraw(request.stream_id, reason="again", metadata={})
    assert caught.value.code == "no_current_label"
    await service.record(request.stream_id, label=5, source="b", metadata={})
    assert [(h.kind, h.label) for h in await service.history(request.stream_id)] == [
        ("recorded", 4), ("withdrawn", None), ("recorded", 5),
    ]


async def test_a_failed_prediction_is_labelled_within_its_models_classes(labels):
    service, store = labels
    failed = failed_request()
    await append(store, failed, registration(num_classes=3))
    await service.record(failed.stream_id, label=2, source="a", metadata={})
    with pytest.raises(Rejected):
        await service.record(failed.stream_id, label=3, source="a", metadata={})


async def test_a_failed_prediction_of_an_unregistered_model_cannot_be_validated(labels):
    service, store = labels
    failed = failed_request()
    await append(store, failed)
    with pytest.raises(NotFound):
        await service.record(failed.stream_id, label=0, source="a", metadata={})


async def test_a_prediction_whose_input_was_erased_can_be_labelled(labels, database):
    service, store = labels
    request = prediction_request()
    await append(store, request)
    await erase(database.owner_dsn, request.events[0].blob_sha256, "right to erasure")
    assert await store.read_blob(bytes.fromhex(request.events[0].blob_sha256)) is None
    await service.record(request.stream_id, label=9, source="a", metadata={})
    assert (await service.history(request.stream_id))[-1].label == 9


async def test_unknown_or_non_prediction_streams_are_not_found(labels):
    service, store = labels
    with pytest.raises(NotFound):
        await service.record(uuid.uuid4(), label=1, source="a", metadata={})
    await append(store, registration())
    with pytest.raises(NotFound):
        await service.record(model_stream_id(MODEL.sha256), label=1, source="a", metadata={})


async def test_bulk_reads_projected_predictions_from_the_read_table_and_the_rest_from_the_log(labels, database):
    """What the read table says of a prediction is what its stream says (the version is the log's
    own); a prediction the projection has not applied yet is read from the log, not refused."""
    service, store = labels
    made, failed, labelled = prediction_request(), failed_request(), prediction_request()
    await append(store, registration(num_classes=10), made, failed, labelled)
    await service.record(labelled.stream_id, label=3, source="before", metadata={})
    runner = runner_for(database.app_dsn)
    await runner.start()
    try:
        await caught_up(store.pool)
    finally:
        await runner.stop()
    late = prediction_request()  # committed after the projection stopped
    await append(store, late)

    projected = [made.stream_id, failed.stream_id, labelled.stream_id]
    facts = await store.prediction_facts([*projected, late.stream_id, uuid.uuid4()])
    assert facts.keys() == set(projected)
    starts = await store.read_stream_starts(projected)
    for stream in projected:
        version, first = starts[stream]
        from_log = label_target(first, version=version)
        assert target_of(*facts[stream]) == from_log, stream
    assert facts[labelled.stream_id][4] == 3

    outcome = await service.record_many(
        [{"prediction_id": str(stream), "label": 1, "source": "bulk"} for stream in [*projected, late.stream_id]],
        metadata={})
    assert [item.stream_version for item in outcome.items] == [3, 3, 4, 3]
    assert all(item.code is None for item in outcome.items)


async def test_bulk_10000_items_with_3_bad_ones_commit_9997_in_one_transaction(labels, owner):
    service, store = labels
    requests = [prediction_request(label=str(i)) for i in range(9_998)]
    for start in range(0, len(requests), 2_000):
        await append(store, *requests[start:start + 2_000])
    items: list[object] = [{"prediction_id": str(r.stream_id), "label": i % 10, "source": "bulk"}
                           for i, r in enumerate(requests)]
    items[17] = {"prediction_id": str(uuid.uuid4()), "label": 1, "source": "bulk"}  # unknown prediction
    items[4_242] = {"prediction_id": str(requests[4_242].stream_id), "label": 10}  # not a class (and no source)
    items.append({"label": 3})  # no prediction_id: malformed
    items.append({"prediction_id": str(requests[0].stream_id), "label": 5, "source": "again"})  # a correction
    assert len(items) == 10_000
    before = await owner.fetchval("SELECT max(position) FROM events")

    outcome = await service.record_many(items, default_source="default", metadata={})

    refused = {item.index: item for item in outcome.items if item.stream_version is None}
    assert sorted(refused) == [17, 4_242, 9_998]
    assert refused[17].code == "prediction_not_found" and refused[4_242].code == "invalid_label"
    assert refused[9_998].code == "invalid_label_item" and refused[9_998].prediction_id is None
    assert len(outcome.events) == 9_997
    assert outcome.events[9_999].stream_version == 4 and outcome.events[0].stream_version == 3  # two labels, in order
    appended = await owner.fetchval("SELECT count(*) FROM events WHERE position > $1", before)
    assert appended == 9_997 + 100  # the labels and the request's own LabelBatchRecorded events, 100 items each
    recorded_at = await owner.fetch("SELECT DISTINCT recorded_at FROM events WHERE position > $1", before)
    assert len(recorded_at) == 1  # one transaction: one clock reading under the lock
    batches = await owner.fetch("SELECT stream_id, stream_version, octet_length(data::text) + octet_length(metadata::text)"
                                " AS size FROM events WHERE position > $1 AND event_type = 'LabelBatchRecorded'"
                                " ORDER BY position", before)
    assert len({b["stream_id"] for b in batches}) == 1 and [b["stream_version"] for b in batches] == list(range(1, 101))
    assert max(b["size"] for b in batches) < 20_000  # each far inside a transparency-log entry (65,535 bytes)


async def test_bulk_with_an_idempotency_key_answers_the_same_and_appends_nothing_the_second_time(labels, owner):
    service, store = labels
    requests = [prediction_request(label=str(i)) for i in range(20)]
    await append(store, *requests)
    items = [{"prediction_id": str(r.stream_id), "label": 2} for r in requests] + [{"label": 1}]
    first = await service.record_many(items, default_source="s", idempotency_key="k-1", fingerprint=b"f" * 32, metadata={})
    head = await owner.fetchval("SELECT max(position) FROM events")
    again = await service.record_many(items, default_source="s", idempotency_key="k-1", fingerprint=b"f" * 32, metadata={})
    assert await owner.fetchval("SELECT max(position) FROM events") == head
    assert again.replayed and not first.replayed
    assert again.items == first.items and again.batch == first.batch
    assert {i: (e.position, e.hash) for i, e in again.events.items()} == {i: (e.position, e.hash) for i, e in first.events.items()}
    with pytest.raises(IdempotencyKeyReused):
        await service.record_many(items[:3], idempotency_key="k-1", fingerprint=b"g" * 32, metadata={})


async def test_concurrent_twins_with_one_key_append_once(labels, owner):
    service, store = labels
    requests = [prediction_request(label=str(i)) for i in range(30)]
    await append(store, *requests)
    items = [{"prediction_id": str(r.stream_id), "label": 4, "source": "s"} for r in requests]
    before = await owner.fetchval("SELECT max(position) FROM events")
    results = await asyncio.gather(*(service.record_many(items, idempotency_key="twin", fingerprint=b"x" * 32,
                                                         metadata={}) for _ in range(4)))
    assert await owner.fetchval("SELECT count(*) FROM events WHERE position > $1", before) == 31
    assert len({r.batch.position for r in results}) == 1 and sum(not r.replayed for r in results) == 1


async def test_bulk_and_single_labels_for_the_same_predictions_at_once_all_land(labels, owner):
    service, store = labels
    requests = [prediction_request(label=str(i)) for i in range(10)]
    await append(store, *requests)
    items = [{"prediction_id": str(r.stream_id), "label": 1, "source": "bulk"} for r in requests]
    singles = [service.record(r.stream_id, label=2, source="single", metadata={}) for r in requests]
    bulk, *_ = await asyncio.gather(service.record_many(items, metadata={}), *singles)
    assert all(item.stream_version is not None for item in bulk.items)
    for request in requests:
        assert [e.stream_version for e in await store.read_stream(request.stream_id)] == [1, 2, 3, 4]
