"""The events of the audit log: msgspec Structs in one tagged union, with schema versions.

Events are never edited to migrate them. A struct that changes shape gets a new schema version in
``SCHEMA_VERSIONS`` and an upcaster from the previous version in ``UPCASTERS``; rows written at an
older version are upcast when read (``decode_event``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

import msgspec


class ModelRef(msgspec.Struct, frozen=True, kw_only=True):
    """Which model: the digest pins the exact artifact, name and version are for people."""

    name: str
    version: str
    sha256: str


class ImageFacts(msgspec.Struct, frozen=True, kw_only=True):
    format: str
    mode: str
    width: int
    height: int
    frames: int = 1


class PredictionRequested(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A valid upload was accepted: what the model was asked to look at."""

    input_id: str
    blob_sha256: str
    size_bytes: int
    filename: str | None
    content_type: str | None
    image: ImageFacts
    preprocessing: dict[str, Any]
    tensor_sha256: str
    model: ModelRef
    idempotency_key: str | None = None


class PredictionMade(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The model's answer for the requested input, and what it takes to reproduce it."""

    output: list[float]
    likely_class: int
    model: ModelRef
    device: str
    batch_size: int
    batch_index: int
    runtime: dict[str, str]
    inference_ms: float
    queue_wait_ms: float


class PredictionFailed(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Inference failed for this input alone (an error, or a non-finite output)."""

    error_code: str
    message: str
    model: ModelRef
    device: str


class ModelRegistered(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A model artifact the service served, kept by digest so old predictions stay reproducible."""

    model: ModelRef
    size_bytes: int
    input_shape: list[int]
    output_kind: str
    num_classes: int
    runtime: dict[str, str]


class BlobErased(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """An original upload was deleted (retention or erasure); the chain keeps its digest."""

    blob_sha256: str
    reason: str


class GroundTruthRecorded(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """What the right answer for this prediction was, as someone established it later. A
    correction is simply a newer one: the latest recorded and not withdrawn label is current."""

    label: int
    source: str  # where the label comes from, e.g. the labelling batch
    note: str | None = None
    actor: str | None = None  # the API key's name when keys are configured


class GroundTruthWithdrawn(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """The current label no longer holds; the prediction is unlabelled until a new one comes."""

    reason: str
    actor: str | None = None


class LabelBatchItem(msgspec.Struct, frozen=True, kw_only=True):
    index: int  # in the request
    prediction_id: str | None  # None: the item did not name one that parses
    stream_version: int | None = None  # accepted: where its GroundTruthRecorded is
    code: str | None = None  # refused: why (a problem type's code)
    detail: str | None = None


class LabelBatchRecorded(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """A bulk label request, in a stream of its own, appended in the same transaction as the
    labels it accepted: what became of each item, so a retry with the same Idempotency-Key gets
    the first answer and the import itself is on the record."""

    items: list[LabelBatchItem]
    actor: str | None = None


Event = Union[
    PredictionRequested,
    PredictionMade,
    PredictionFailed,
    ModelRegistered,
    BlobErased,
    GroundTruthRecorded,
    GroundTruthWithdrawn,
    LabelBatchRecorded,
]

EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in Event.__args__}  # type: ignore[attr-defined]

SCHEMA_VERSIONS: dict[str, int] = {name: 1 for name in EVENT_TYPES}

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
# (event type, from schema version) -> function giving the data at the next version.
UPCASTERS: dict[tuple[str, int], Upcaster] = {}

_encoder = msgspec.json.Encoder()
_decoders: dict[str, msgspec.json.Decoder[Any]] = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}


def event_type(event: Event) -> str:
    return type(event).__name__


def encode_event(event: Event) -> str:
    return _encoder.encode(event).decode()


def encode_metadata(metadata: dict[str, Any]) -> str:
    return _encoder.encode(metadata).decode()


class UnknownEvent(Exception):
    """A row whose type or schema version this code cannot read."""


def decode_event(
    type_name: str,
    schema_version: int,
    data: str | bytes,
    *,
    versions: dict[str, int] = SCHEMA_VERSIONS,
    upcasters: dict[tuple[str, int], Upcaster] = UPCASTERS,
) -> Event:
    cls = EVENT_TYPES.get(type_name)
    current = versions.get(type_name)
    if cls is None or current is None:
        raise UnknownEvent(f"unknown event type {type_name!r}")
    if schema_version == current:
        return _decoders[type_name].decode(data)
    if schema_version > current:
        raise UnknownEvent(f"{type_name} schema version {schema_version} is newer than this code ({current})")
    fields = msgspec.json.decode(data)
    for version in range(schema_version, current):
        upcast = upcasters.get((type_name, version))
        if upcast is None:
            raise UnknownEvent(f"no upcaster for {type_name} from schema version {version}")
        fields = upcast(fields)
    return msgspec.convert(fields, type=cls)
