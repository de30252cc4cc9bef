"""One event as auditors receive it, in one format wherever it is served: `GET /events` and
`just replay` (NDJSON, one event per line) and `GET /prediction/{id}/events` (a JSON array). Pure.

Every hashed column is there, `data` and `metadata` as the exact stored JSON texts, so a reader
recomputes each hash with the canonical form in domain/chain.py from the line alone;
`recorded_at_us` is the hashed spelling of `recorded_at`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from domain.chain import ChainedRecord, from_microseconds


class EventLine(msgspec.Struct, frozen=True):
    position: int
    stream_id: str
    stream_version: int
    type: str
    schema_version: int
    recorded_at: datetime
    recorded_at_us: int
    data: str
    metadata: str
    hash: str  # hex sha256(previous hash ‖ canonical bytes)


def event_line(record: ChainedRecord, hash: bytes) -> EventLine:
    return EventLine(
        position=record.position,
        stream_id=record.stream_id,
        stream_version=record.stream_version,
        type=record.event_type,
        schema_version=record.schema_version,
        recorded_at=from_microseconds(record.recorded_at_us),
        recorded_at_us=record.recorded_at_us,
        data=record.data,
        metadata=record.metadata,
        hash=hash.hex(),
    )


_encoder = msgspec.json.Encoder()


def ndjson(lines: Iterable[EventLine]) -> bytes:
    """The lines as NDJSON: one JSON object and a newline each."""
    buffer = bytearray()
    for line in lines:
        _encoder.encode_into(line, buffer, len(buffer))
        buffer += b"\n"
    return bytes(buffer)
