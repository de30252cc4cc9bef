"""Which event may follow which in a stream, and how stream ids are derived. Pure.

A prediction's stream is ``PredictionRequested``, then exactly one of ``PredictionMade`` /
``PredictionFailed``, then any number of ``GroundTruthRecorded`` (labels and their corrections)
and ``GroundTruthWithdrawn`` (only while a label is current). A bulk label request's
``LabelBatchRecorded`` has a stream of its own. Model registrations and blob erasures live in streams of
their own, derived from the digest they are about, so a second registration of the same artifact
is a version conflict rather than a duplicate.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from domain.events import (
    BlobErased,
    Event,
    GroundTruthRecorded,
    GroundTruthWithdrawn,
    LabelBatchRecorded,
    ModelRegistered,
    PredictionFailed,
    PredictionMade,
    PredictionRequested,
)

_NAMESPACE = uuid.UUID("6f0d8a52-3c1e-4d38-9a57-5b0e54d1c0a1")

_OUTCOMES = (PredictionMade, PredictionFailed)


class StreamRuleViolation(ValueError):
    """The events would break the rules of their stream."""


def model_stream_id(model_sha256: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"model:{model_sha256}")


def erasure_stream_id(blob_sha256: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"erasure:{blob_sha256}")


def check_stream(existing: Sequence[Event], new: Sequence[Event]) -> None:
    """Raise ``StreamRuleViolation`` unless ``existing + new`` is a valid (prefix of a) stream."""
    events = [*existing, *new]
    if not events:
        return
    first = events[0]
    if isinstance(first, PredictionRequested):
        if len(events) >= 2 and not isinstance(events[1], _OUTCOMES):
            raise StreamRuleViolation(
                f"a prediction request may only be followed by PredictionMade or PredictionFailed, "
                f"not {type(events[1]).__name__}"
            )
        labelled = False
        for event in events[2:]:
            if isinstance(event, GroundTruthRecorded):
                labelled = True
            elif isinstance(event, GroundTruthWithdrawn):
                if not labelled:
                    raise StreamRuleViolation("a label can only be withdrawn while one is current")
                labelled = False
            else:
                raise StreamRuleViolation(
                    f"after its outcome a prediction stream holds only labels, not {type(event).__name__}"
                )
        return
    if isinstance(first, (ModelRegistered, BlobErased, LabelBatchRecorded)):
        if len(events) > 1:
            raise StreamRuleViolation(f"a {type(first).__name__} stream holds exactly one event")
        return
    raise StreamRuleViolation(f"a stream cannot start with {type(first).__name__}")
