"""Ground truth in the domain: which labels a prediction may get, what is current, the stream rules."""

from __future__ import annotations

import pytest

from domain.events import GroundTruthRecorded, GroundTruthWithdrawn, PredictionFailed
from domain.labels import classes_of, is_correct, label_history, label_target, record_label, withdraw_label
from domain.rejections import Rejected
from domain.streams import StreamRuleViolation, check_stream
from tests.factories import MODEL, prediction_request


def stream(*labels):
    requested, made = prediction_request().events
    return [requested, made, *labels]


def test_a_made_prediction_is_labelled_with_a_class_of_its_output():
    target = label_target(stream())
    assert target is not None and target.num_classes == 10 and target.version == 2 and target.current_label is None
    event = record_label(target, 10, 3, "batch-7", "looks like a 3", actor="alice")
    assert event == GroundTruthRecorded(label=3, source="batch-7", note="looks like a 3", actor="alice")


@pytest.mark.parametrize("label", [-1, 10, 3.0, "3", True, None])
def test_a_label_outside_the_models_classes_is_refused(label):
    with pytest.raises(Rejected) as caught:
        record_label(label_target(stream()), 10, label, "batch")
    assert caught.value.code == "invalid_label"


@pytest.mark.parametrize("source", ["", "   ", None, 7, "x" * 201, "a\x00b"])
def test_a_label_needs_a_source(source):
    with pytest.raises(Rejected) as caught:
        record_label(label_target(stream()), 10, 1, source)
    assert caught.value.code == "invalid_label_source"


def test_a_scalar_model_has_two_classes():
    assert classes_of("scalar", 1) == 2 and classes_of("vector", 10) == 10


def test_corrections_and_withdrawals_decide_what_is_current():
    one, two = GroundTruthRecorded(label=1, source="a"), GroundTruthRecorded(label=2, source="b")
    gone = GroundTruthWithdrawn(reason="wrong image")
    assert label_target(stream(one)).current_label == 1
    assert label_target(stream(one, two)).current_label == 2
    assert label_target(stream(one, two, gone)).current_label is None
    assert label_target(stream(one, gone, two)).version == 5
    history = label_history(stream(one, gone, two))
    assert [(h.kind, h.stream_version, h.label) for h in history] == [
        ("recorded", 3, 1), ("withdrawn", 4, None), ("recorded", 5, 2),
    ]


def test_withdrawing_needs_a_current_label_and_a_reason():
    with pytest.raises(Rejected) as caught:
        withdraw_label(label_target(stream()), "no reason to")
    assert caught.value.code == "no_current_label"
    labelled = label_target(stream(GroundTruthRecorded(label=1, source="a")))
    with pytest.raises(Rejected) as caught:
        withdraw_label(labelled, "")
    assert caught.value.code == "invalid_withdraw_reason"
    assert withdraw_label(labelled, "mislabelled", actor="bob") == GroundTruthWithdrawn(reason="mislabelled", actor="bob")


def test_a_failed_prediction_is_a_target_whose_classes_come_from_its_model():
    requested = prediction_request().events[0]
    failed = PredictionFailed(error_code="non_finite_output", message="NaN", model=MODEL, device="cpu")
    target = label_target([requested, failed])
    assert target is not None and target.status == "failed" and target.num_classes is None
    assert target.model_sha256 == MODEL.sha256


def test_only_a_prediction_with_its_outcome_can_be_labelled():
    requested, _ = prediction_request().events
    assert label_target([]) is None and label_target([requested]) is None


def test_correct_only_for_made_predictions_with_a_current_label():
    assert is_correct("made", 3, 3) is True and is_correct("made", 3, 4) is False
    assert is_correct("made", 3, None) is None and is_correct("failed", None, 3) is None


def test_stream_rules_allow_labels_after_the_outcome_only():
    requested, made = prediction_request().events
    label, gone = GroundTruthRecorded(label=1, source="a"), GroundTruthWithdrawn(reason="r")
    check_stream([requested, made], [label, gone, label, label])
    for bad in ([requested, label], [requested, made, gone], [requested, made, label, gone, gone], [requested, made, requested]):
        with pytest.raises(StreamRuleViolation):
            check_stream([], bad)


def test_a_bulk_outcome_is_recorded_in_events_of_at_most_100_items_in_order():
    from domain.events import LabelBatchItem
    from domain.labels import BATCH_EVENT_ITEMS, batch_events

    items = [LabelBatchItem(index=i, prediction_id=None, code="invalid_label_item", detail="x" * 200)
             for i in range(250)]
    events = batch_events(items, "importer")
    assert [len(e.items) for e in events] == [BATCH_EVENT_ITEMS, BATCH_EVENT_ITEMS, 50]
    assert [item.index for e in events for item in e.items] == list(range(250))
    assert all(e.actor == "importer" for e in events)
    assert [len(e.items) for e in batch_events([], None)] == [0]
