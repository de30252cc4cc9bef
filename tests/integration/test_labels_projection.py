"""Labels in the read model: the current label and its history, filters, rebuild and verify."""

from __future__ import annotations

import msgspec
import pytest

from db.store import AppendRequest, EventStore
from domain.events import GroundTruthRecorded, GroundTruthWithdrawn
from projections.queries import get_prediction, list_predictions, prediction_view_from_events
from projections.rebuild import rebuild
from projections.verify import verify
from projections.worker import ProjectionRunner
from tests.factories import prediction_request
from tests.projection_support import append, caught_up, failed_request

pytestmark = pytest.mark.timeout(60)


def labelled(stream_id, version: int, *events) -> AppendRequest:
    return AppendRequest(stream_id=stream_id, expected_version=version, events=list(events))


def rec(label: int, source: str = "batch") -> GroundTruthRecorded:
    return GroundTruthRecorded(label=label, source=source, actor="tester")


async def project(database, owner, batch_size: int = 1000) -> None:
    runner = ProjectionRunner(database.app_dsn, poll_interval_s=0.2, lock_poll_s=0.1, batch_size=batch_size)
    await runner.start()
    try:
        await caught_up(owner)
    finally:
        await runner.stop()


async def a_labelled_log(app_pool):
    """Five predictions (likely class 9): one right, one wrong, one corrected, one withdrawn, one
    failed and labelled; the labels in several appends, some in the same append as their outcome."""
    store = EventStore(app_pool)
    right, wrong, corrected, withdrawn, unlabelled = (prediction_request(label=str(i)) for i in range(5))
    failed = failed_request()
    await append(store, right, wrong, corrected, withdrawn, unlabelled, failed)
    await append(store, labelled(right.stream_id, 2, rec(9)), labelled(wrong.stream_id, 2, rec(4)),
                 labelled(corrected.stream_id, 2, rec(1), rec(2)), labelled(withdrawn.stream_id, 2, rec(9)),
                 labelled(failed.stream_id, 2, rec(3)))
    await append(store, labelled(corrected.stream_id, 4, rec(9, "review")),
                 labelled(withdrawn.stream_id, 3, GroundTruthWithdrawn(reason="blurred")))
    return right, wrong, corrected, withdrawn, unlabelled, failed


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
async def test_the_projection_keeps_the_current_label_and_every_step(database, app_pool, owner, batch_size):
    right, wrong, corrected, withdrawn, unlabelled, failed = await a_labelled_log(app_pool)
    await project(database, owner, batch_size)
    views = {name: await get_prediction(app_pool, request.stream_id) for name, request in
             dict(right=right, wrong=wrong, corrected=corrected, withdrawn=withdrawn, unlabelled=unlabelled,
                  failed=failed).items()}
    assert {name: (v.label, v.correct) for name, v in views.items()} == {
        "right": (9, True), "wrong": (4, False), "corrected": (9, True), "withdrawn": (None, None),
        "unlabelled": (None, None), "failed": (3, None),
    }
    history = await owner.fetch(
        "SELECT kind, label, source, superseded_at, position FROM labels WHERE prediction_id = $1 ORDER BY position",
        corrected.stream_id,
    )
    assert [(r["kind"], r["label"], r["source"]) for r in history] == [
        ("recorded", 1, "batch"), ("recorded", 2, "batch"), ("recorded", 9, "review"),
    ]
    assert [r["superseded_at"] for r in history] == [history[1]["position"], history[2]["position"], None]
    # the view a stream gives equals the table's
    for request in (right, corrected, withdrawn, failed):
        events = await EventStore(app_pool).read_stream(request.stream_id)
        assert prediction_view_from_events(events) == await get_prediction(app_pool, request.stream_id)


async def test_the_list_filters_by_labelled_and_correct(database, app_pool, owner):
    right, wrong, corrected, withdrawn, unlabelled, failed = await a_labelled_log(app_pool)
    await project(database, owner)

    async def ids(**filters) -> set:
        views, _ = await list_predictions(app_pool, limit=50, **filters)
        return {view.prediction_id for view in views}

    assert await ids(labelled=True) == {right.stream_id, wrong.stream_id, corrected.stream_id, failed.stream_id}
    assert await ids(labelled=False) == {withdrawn.stream_id, unlabelled.stream_id}
    assert await ids(correct=True) == {right.stream_id, corrected.stream_id}
    assert await ids(correct=False) == {wrong.stream_id}


async def test_rebuild_is_byte_identical_with_labels_and_verify_catches_a_tampered_label(database, app_pool, owner):
    await a_labelled_log(app_pool)
    await project(database, owner, batch_size=2)

    async def tables() -> bytes:
        rows = []
        for table, order in (("predictions", "position"), ("labels", "position"),
                             ("quality_cells", "model_sha256, hour, status, likely_class, truth, bin")):
            rows.append([tuple(r) for r in await owner.fetch(f"SELECT * FROM {table} ORDER BY {order}")])
        return msgspec.json.encode(rows, enc_hook=str)

    before = await tables()
    await rebuild(database.owner_dsn, batch_size=3)
    assert await tables() == before
    report = await verify(database.owner_dsn)
    assert report.ok, report.describe()
    assert report.rows["labels"] == 8

    await owner.execute("UPDATE quality_cells SET n = n + 1 WHERE truth = 4")
    report = await verify(database.owner_dsn)
    assert not report.ok and "quality_cells" in report.describe() and "n" == report.difference.column
    await owner.execute("UPDATE quality_cells SET n = n - 1 WHERE truth = 4")
    assert (await verify(database.owner_dsn)).ok

    await owner.execute("UPDATE labels SET label = 5 WHERE label = 4")
    report = await verify(database.owner_dsn)
    assert not report.ok and "labels" in report.describe()


async def test_just_quality_prints_the_table_and_the_confusion_matrix(database, app_pool, owner, capsys):
    from cli.quality import show
    from domain.events import ModelRegistered
    from domain.streams import model_stream_id
    from tests.factories import MODEL

    registered = ModelRegistered(model=MODEL, size_bytes=1, input_shape=[28, 28, 1], output_kind="vector",
                                 num_classes=10, runtime={})
    await append(EventStore(app_pool), AppendRequest(stream_id=model_stream_id(MODEL.sha256), expected_version=0,
                                                     events=[registered]))
    await a_labelled_log(app_pool)
    await project(database, owner)
    assert await show(database.owner_dsn, MODEL.sha256[:8]) == 0
    out = capsys.readouterr().out
    # right (9→9), wrong (true 4, predicted 9), corrected (now 9→9): 3 labelled made, 2 correct
    assert "labelled 3" in out and "accuracy 0.667" in out and "failed 1" in out
    matrix = out.split("confusion (rows: true label, columns: predicted class)")[1].strip().splitlines()[1:]
    assert [int(n) for n in matrix[4].split()[1:]] == [0] * 9 + [1]  # true 4, predicted 9
    assert [int(n) for n in matrix[9].split()[1:]] == [0] * 9 + [2]
    assert await show(database.owner_dsn, "ffff") == 1
