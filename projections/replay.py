"""Events as NDJSON, for auditors: one line per event, in global order.

`data` and `metadata` are the exact stored JSON texts (as JSON strings), so a reader can recompute
every hash with the canonical form in `domain/chain.py` (recorded_at is RFC 3339 in UTC with
microseconds, exactly the stored instant).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime

import asyncpg
import msgspec

from db.store import StoredEvent
from projections.read_model import read_events


class ReplayLine(msgspec.Struct, frozen=True):
    position: int
    stream_id: uuid.UUID
    stream_version: int
    type: str
    schema_version: int
    recorded_at: datetime
    data: str
    metadata: str
    hash: str


_encoder = msgspec.json.Encoder()


def ndjson_line(event: StoredEvent) -> bytes:
    line = ReplayLine(
        position=event.position,
        stream_id=event.stream_id,
        stream_version=event.stream_version,
        type=event.event_type,
        schema_version=event.schema_version,
        recorded_at=event.recorded_at,
        data=event.data,
        metadata=event.metadata,
        hash=event.hash.hex(),
    )
    return _encoder.encode(line) + b"\n"


async def replay(
    connection: asyncpg.Connection,
    write: Callable[[bytes], object],
    *,
    after: int = 0,
    limit: int | None = None,
    page_size: int = 10_000,
) -> int:
    """Write the events after `after` (at most `limit`) as NDJSON; returns how many."""
    written = 0
    while limit is None or written < limit:
        wanted = page_size if limit is None else min(page_size, limit - written)
        page = await read_events(connection, after, wanted)
        if not page:
            break
        write(b"".join(ndjson_line(event) for event in page))
        written += len(page)
        after = page[-1].position
    return written
