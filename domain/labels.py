"""Ground truth for past predictions: what may be recorded, and what a stream says is current. Pure.

Labels are events in the prediction's own stream. A correction is a newer `GroundTruthRecorded`;
`GroundTruthWithdrawn` ends the current label. Nothing is overwritten, so the label that was
current at any earlier position can be told from the stream alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import msgspec

from domain.events import (
    Event,
    GroundTruthRecorded,
    GroundTruthWithdrawn,
    LabelBatchItem,
    LabelBatchRecorded,
    PredictionFailed,
    PredictionMade,
    PredictionRequested,
)
from domain.rejections import Rejected, RejectionCode

MAX_SOURCE_CHARS = 200
MAX_NOTE_CHARS = 2000
MAX_REASON_CHARS = 500


class LabelTarget(msgspec.Struct, frozen=True, kw_only=True):
    """What labelling needs to know of a prediction, read from its stream."""

    status: str  # "made" | "failed"
    model_sha256: str
    num_classes: int | None  # known from a made prediction's output; None for a failed one
    likely_class: int | None
    version: int  # the stream's current version: a label is appended as the next one
    current_label: int | None


class LabelEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a prediction's label history, oldest first."""

    kind: str  # "recorded" | "withdrawn"
    stream_version: int
    label: int | None
    source: str | None
    note: str | None
    reason: str | None
    actor: str | None


def classes_of(output_kind: str, output_width: int) -> int:
    """A vector model has one class per output; a scalar (sigmoid) one has two: 0 and 1."""
    return output_width if output_kind == "vector" and output_width > 1 else 2


def label_target(events: Sequence[Event], *, version: int | None = None) -> LabelTarget | None:
    """None unless the events are a prediction's stream with its outcome. `events` is the whole
    stream; or, with `version` (the stream's), only its beginning: the current label is then not
    known (None), which recording a label does not need."""
    if len(events) < 2 or not isinstance(events[0], PredictionRequested):
        return None
    outcome = events[1]
    if isinstance(outcome, PredictionMade):
        status, num_classes, likely = "made", classes_of("vector", len(outcome.output)), outcome.likely_class
    elif isinstance(outcome, PredictionFailed):
        status, num_classes, likely = "failed", None, None
    else:
        return None
    current: int | None = None
    for event in events[2:]:
        if isinstance(event, GroundTruthRecorded):
            current = event.label
        elif isinstance(event, GroundTruthWithdrawn):
            current = None
    return LabelTarget(
        status=status, model_sha256=events[0].model.sha256, num_classes=num_classes, likely_class=likely,
        version=len(events) if version is None else version, current_label=current,
    )


def target_of(status: str, model_sha256: str, likely_class: int | None, output_width: int | None,
              version: int) -> LabelTarget:
    """A prediction's target from what the read tables recorded of its outcome (its current label
    unknown: recording a label does not need it)."""
    return LabelTarget(
        status=status, model_sha256=model_sha256, likely_class=likely_class, version=version, current_label=None,
        num_classes=classes_of("vector", output_width) if status == "made" and output_width else None,
    )


def record_label(
    target: LabelTarget, num_classes: int, label: object, source: object, note: object = None,
    actor: str | None = None,
) -> GroundTruthRecorded:
    """The event that labels `target`; raises `Rejected` for a label the model could not have
    given (outside 0 … num_classes − 1) or malformed text."""
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < num_classes:
        raise Rejected("invalid_label", f"the label must be a class of the model: an integer 0 … {num_classes - 1}")
    return GroundTruthRecorded(
        label=label,
        source=_text("invalid_label_source", "source", source, MAX_SOURCE_CHARS),
        note=None if note is None else _text("invalid_label_note", "note", note, MAX_NOTE_CHARS),
        actor=actor,
    )


def withdraw_label(target: LabelTarget, reason: object, actor: str | None = None) -> GroundTruthWithdrawn:
    if target.current_label is None:
        raise Rejected("no_current_label", "the prediction has no current label to withdraw")
    return GroundTruthWithdrawn(reason=_text("invalid_withdraw_reason", "reason", reason, MAX_REASON_CHARS), actor=actor)


def label_history(events: Sequence[Event]) -> list[LabelEntry]:
    """The label events of a prediction's stream, oldest first (stream versions count from 1)."""
    history = []
    for version, event in enumerate(events, start=1):
        if isinstance(event, GroundTruthRecorded):
            history.append(LabelEntry(kind="recorded", stream_version=version, label=event.label, source=event.source,
                                      note=event.note, reason=None, actor=event.actor))
        elif isinstance(event, GroundTruthWithdrawn):
            history.append(LabelEntry(kind="withdrawn", stream_version=version, label=None, source=None, note=None,
                                      reason=event.reason, actor=event.actor))
    return history


def is_correct(status: str, likely_class: int | None, label: int | None) -> bool | None:
    """Whether a made prediction agrees with its current label; None when either is missing (a
    failed prediction is counted apart, never as wrong)."""
    if status != "made" or likely_class is None or label is None:
        return None
    return likely_class == label


def _text(code: RejectionCode, name: str, value: object, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Rejected(code, f"`{name}` must be a non-empty text")
    if len(value) > limit or "\x00" in value:
        raise Rejected(code, f"`{name}` must be at most {limit} characters, without NUL")
    return value


MAX_BULK_ITEMS = 10_000
# A bulk request's outcome is recorded as LabelBatchRecorded events of at most this many items
# each (≈ 300 bytes an item at worst), so every event stays far below the 65,535 canonical bytes a
# transparency-log entry holds; a 10,000-item request is 100 events in the request's own stream.
BATCH_EVENT_ITEMS = 100


def batch_events(items: list[LabelBatchItem], actor: str | None) -> list[LabelBatchRecorded]:
    """The request's LabelBatchRecorded events, in item order (one, empty, for no items)."""
    chunks = [items[i : i + BATCH_EVENT_ITEMS] for i in range(0, len(items), BATCH_EVENT_ITEMS)] or [[]]
    return [LabelBatchRecorded(items=chunk, actor=actor) for chunk in chunks]


class LabelItem(msgspec.Struct, frozen=True, kw_only=True):
    """One item of a bulk label request, as it arrived (validated by `parse_item`)."""

    prediction_id: uuid.UUID
    label: object
    source: object
    note: object = None


def parse_item(value: object, default_source: str | None) -> LabelItem:
    """`{"prediction_id": …, "label": …, "source"?: …, "note"?: …}` -> a LabelItem; the label and
    texts are checked later, against the prediction. Raises `Rejected` (`invalid_label_item`)."""
    if not isinstance(value, dict):
        raise Rejected("invalid_label_item", "an item is a JSON object with prediction_id and label")
    unknown = set(value) - {"prediction_id", "label", "source", "note"}
    if unknown:
        raise Rejected("invalid_label_item", f"unknown fields {sorted(unknown)}")
    if "label" not in value:
        raise Rejected("invalid_label_item", "the item has no label")
    try:
        prediction_id = uuid.UUID(str(value["prediction_id"]))
    except (KeyError, ValueError):
        raise Rejected("invalid_label_item", "prediction_id must be a UUID") from None
    return LabelItem(prediction_id=prediction_id, label=value["label"],
                     source=value.get("source", default_source), note=value.get("note"))
