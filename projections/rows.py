"""Events → read-model rows. Pure: no I/O.

The worker inserts these rows and the read side turns rows back into views; the read-your-writes
path turns a stream's events into the very same rows, so both give the same view field for field.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Protocol

import msgspec
from asyncpg.pgproto.pgproto import (
    UUID as FastUUID,  # the parser asyncpg itself uses for uuid
)

from domain.events import (
    BlobErased,
    GroundTruthRecorded,
    GroundTruthWithdrawn,
    ModelRegistered,
    PredictionFailed,
    PredictionMade,
    PredictionRequested,
    UnknownEvent,
    decode_event,
)

_encoder = msgspec.json.Encoder()


class EventLike(Protocol):
    """What a projection reads of an event (`db.store.StoredEvent` has it)."""

    position: int
    stream_id: uuid.UUID
    event_type: str
    schema_version: int
    data: str
    recorded_at: datetime


# The same as a plain row (position, stream_id, event_type, schema_version, data, recorded_at):
# what a bulk replay fetches, used as fetched (no object per event).
EventFields = tuple[int, uuid.UUID, str, int, str, datetime]


def fields_of(event: EventLike) -> EventFields:
    return (event.position, event.stream_id, event.event_type, event.schema_version, event.data, event.recorded_at)


class InputRow(msgspec.Struct, frozen=True):
    input_id: uuid.UUID
    stream_id: uuid.UUID
    position: int
    blob_sha256: str
    filename: str | None
    content_type: str | None
    size_bytes: int
    image_format: str
    image_mode: str
    image_width: int
    image_height: int
    image_frames: int
    tensor_sha256: str
    preprocessing: str  # JSON text (stored as jsonb)
    idempotency_key: str | None
    recorded_at: datetime


class PredictionRow(msgspec.Struct, frozen=True):
    """An outcome. Its input is the request of the same stream (resolved when it is stored)."""

    prediction_id: uuid.UUID  # the stream id
    position: int
    status: str  # 'made' | 'failed'
    output: list[float] | None
    likely_class: int | None
    model_name: str
    model_version: str
    model_sha256: str
    device: str
    batch_size: int | None
    batch_index: int | None
    error_code: str | None
    error_message: str | None
    recorded_at: datetime


class ErasureRow(msgspec.Struct, frozen=True):
    blob_sha256: str
    position: int
    recorded_at: datetime


class LabelRow(msgspec.Struct, frozen=True):
    """A label event: `label` None for a withdrawal."""

    position: int
    prediction_id: uuid.UUID  # the stream id
    kind: str  # 'recorded' | 'withdrawn'
    label: int | None
    source: str | None
    note: str | None
    reason: str | None
    actor: str | None
    recorded_at: datetime


Row = InputRow | PredictionRow | ErasureRow | LabelRow


class SkippedEvent(Exception):
    """An event this projection cannot apply: reported and stepped over, never retried."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def row_from_event(event: EventLike) -> Row | None:
    """The row an event contributes, None for events this projection ignores.

    Raises `SkippedEvent` for an event that cannot be read (unknown type, bad data).
    """
    return row_from_fields(*fields_of(event))


def row_from_fields(
    position: int, stream_id: uuid.UUID, event_type: str, schema_version: int, data: str, recorded_at: datetime
) -> Row | None:
    try:
        decoded = decode_event(event_type, schema_version, data)
    except UnknownEvent as error:
        raise SkippedEvent("unknown_event", str(error)) from None
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as error:
        raise SkippedEvent("undecodable", str(error)) from None

    if isinstance(decoded, PredictionRequested):
        try:
            # asyncpg's parser (a uuid.UUID, 4x faster than uuid.UUID's): the same rule decides
            # what a valid id is here and when the row is stored.
            input_id = FastUUID(decoded.input_id)
        except (ValueError, TypeError):
            raise SkippedEvent("undecodable", "input_id is not a UUID") from None
        return InputRow(
            input_id=input_id,
            stream_id=stream_id,
            position=position,
            blob_sha256=decoded.blob_sha256,
            filename=decoded.filename,
            content_type=decoded.content_type,
            size_bytes=decoded.size_bytes,
            image_format=decoded.image.format,
            image_mode=decoded.image.mode,
            image_width=decoded.image.width,
            image_height=decoded.image.height,
            image_frames=decoded.image.frames,
            tensor_sha256=decoded.tensor_sha256,
            preprocessing=_encoder.encode(decoded.preprocessing).decode(),
            idempotency_key=decoded.idempotency_key,
            recorded_at=recorded_at,
        )
    if isinstance(decoded, PredictionMade):
        return PredictionRow(
            prediction_id=stream_id,
            position=position,
            status="made",
            output=list(decoded.output),
            likely_class=decoded.likely_class,
            model_name=decoded.model.name,
            model_version=decoded.model.version,
            model_sha256=decoded.model.sha256,
            device=decoded.device,
            batch_size=decoded.batch_size,
            batch_index=decoded.batch_index,
            error_code=None,
            error_message=None,
            recorded_at=recorded_at,
        )
    if isinstance(decoded, PredictionFailed):
        return PredictionRow(
            prediction_id=stream_id,
            position=position,
            status="failed",
            output=None,
            likely_class=None,
            model_name=decoded.model.name,
            model_version=decoded.model.version,
            model_sha256=decoded.model.sha256,
            device=decoded.device,
            batch_size=None,
            batch_index=None,
            error_code=decoded.error_code,
            error_message=decoded.message,
            recorded_at=recorded_at,
        )
    if isinstance(decoded, BlobErased):
        return ErasureRow(blob_sha256=decoded.blob_sha256, position=position, recorded_at=recorded_at)
    if isinstance(decoded, GroundTruthRecorded):
        return LabelRow(position=position, prediction_id=stream_id, kind="recorded", label=decoded.label,
                        source=decoded.source, note=decoded.note, reason=None, actor=decoded.actor,
                        recorded_at=recorded_at)
    if isinstance(decoded, GroundTruthWithdrawn):
        return LabelRow(position=position, prediction_id=stream_id, kind="withdrawn", label=None, source=None,
                        note=None, reason=decoded.reason, actor=decoded.actor, recorded_at=recorded_at)
    if isinstance(decoded, ModelRegistered):
        return None
    return None  # a known type this projection has no use for
