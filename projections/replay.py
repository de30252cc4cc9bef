"""`just replay`: events as NDJSON, for auditors, in global order, in the same line format as
`GET /events` (domain/event_lines.py)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from db.store import read_events
from domain.event_lines import event_line, ndjson


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
        write(ndjson(event_line(event.chained(), event.hash) for event in page))
        written += len(page)
        after = page[-1].position
    return written
