"""Labels through the real store and group commit: concurrency, failed and erased predictions."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from db.group_commit import GroupCommitter
from db.store import AppendRequest, EventStore
from domain.events import GroundTruthRecorded, ModelRegistered
from domain.rejections import Rejected
from domain.streams import model_stream_id
from tests.factories import MODEL, prediction_request
from tests.projection_support import append, failed_request
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
