"""The API's response types (msgspec Structs, so the OpenAPI schema is exact) and their builders.

Every answer is built from events or from read tables that are themselves built from events, so a
rebuild of the read tables gives byte-identical answers.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import msgspec

from db.store import StoredEvent
from domain.chain import canonical_bytes
from domain.event_lines import EventLine, event_line
from domain.merkle import leaf_hash
from domain.events import PredictionFailed, PredictionMade, PredictionRequested


class ModelOut(msgspec.Struct, frozen=True):
    name: str
    version: str
    sha256: str
    device: str | None = None


class ReceiptEvent(msgspec.Struct, frozen=True):
    position: int
    stream_version: int
    type: str
    hash: str  # hex: the hash chain's link
    leaf_index: int  # position - 1: the event's leaf in the Merkle tree
    leaf_hash: str  # base64 SHA-256(0x00 ‖ canonical bytes), as tlog proofs spell hashes
    inclusion_proof: list[str] | None = None  # with Prefer: wait=checkpoint, against `checkpoint`


class ChainHead(msgspec.Struct, frozen=True):
    position: int
    hash: str


class Receipt(msgspec.Struct, frozen=True):
    """Proof of what was recorded: check it later with `just verify --receipt FILE`."""

    log_id: str
    stream_id: str
    events: list[ReceiptEvent]
    head: ChainHead
    checkpoint: str | None = None  # with Prefer: wait=checkpoint: the signed note that includes the events


class PredictionCreated(msgspec.Struct, frozen=True):
    filename: str | None
    contenttype: str | None
    prediction: list[float]
    likely_class: int
    input_id: str
    prediction_id: str
    blob_sha256: str
    model: ModelOut
    receipt: Receipt
    created_at: datetime


class ErrorOut(msgspec.Struct, frozen=True):
    code: str
    message: str


class InputOut(msgspec.Struct, frozen=True):
    input_id: str
    filename: str | None
    contenttype: str | None
    size_bytes: int
    blob_sha256: str
    format: str
    mode: str
    width: int
    height: int
    tensor_sha256: str
    erased: bool


class PredictionOut(msgspec.Struct, frozen=True):
    prediction_id: str
    input_id: str
    status: str  # "made" | "failed"
    filename: str | None
    contenttype: str | None
    prediction: list[float] | None
    likely_class: int | None
    model: ModelOut
    input: InputOut
    error: ErrorOut | None
    position: int
    created_at: datetime
    label: int | None  # the current ground truth (GET /prediction/{id}/labels has the history)
    correct: bool | None  # likely_class == label; None when failed or unlabelled
    image: str | None = None  # data URI of the original bytes (single GET only); None once erased


class PredictionPage(msgspec.Struct, frozen=True):
    items: list[PredictionOut]
    next_cursor: str | None


class ModelDescription(msgspec.Struct, frozen=True):
    name: str
    version: str
    sha256: str
    input_shape: list[int]
    output_kind: str
    num_classes: int
    device: str
    frameworks: dict[str, str]
    preprocessing: dict[str, Any]


def event_out(event: StoredEvent) -> EventLine:
    return event_line(event.chained(), event.hash)


def receipt(log_id: str, events: list[StoredEvent], head_position: int, head_hash: bytes) -> Receipt:
    return Receipt(
        log_id=log_id,
        stream_id=str(events[0].stream_id),
        events=[
            ReceiptEvent(position=e.position, stream_version=e.stream_version, type=e.event_type, hash=e.hash.hex(),
                         leaf_index=e.position - 1,
                         leaf_hash=base64.b64encode(leaf_hash(canonical_bytes(e.chained()))).decode())
            for e in events
        ],
        head=ChainHead(position=head_position, hash=head_hash.hex()),
    )


def created(events: list[StoredEvent], the_receipt: Receipt) -> PredictionCreated | tuple[PredictionRequested, PredictionFailed]:
    """The 201 body for a made prediction; for a failed one, its two events (answered as a 500)."""
    requested, outcome = (event.decode() for event in events[:2])
    assert isinstance(requested, PredictionRequested)
    if isinstance(outcome, PredictionFailed):
        return requested, outcome
    assert isinstance(outcome, PredictionMade)
    return PredictionCreated(
        filename=requested.filename,
        contenttype=requested.content_type,
        prediction=outcome.output,
        likely_class=outcome.likely_class,
        input_id=requested.input_id,
        prediction_id=str(events[0].stream_id),
        blob_sha256=requested.blob_sha256,
        model=ModelOut(**msgspec.structs.asdict(outcome.model), device=outcome.device),
        receipt=the_receipt,
        created_at=events[1].recorded_at,
    )


def data_uri(content_type: str, content: bytes) -> str:
    return f"data:{content_type};base64,{base64.b64encode(content).decode()}"
