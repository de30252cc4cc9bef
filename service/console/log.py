"""The log: its head, the Merkle tree, recent signed checkpoints and how long events waited for one,
projection lag, erasures, the last verification (and a button for another), and the event feed
itself, in order, filtered by type and position."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from litestar import Request, get
from litestar.params import Parameter
from litestar.response import Template

from db.store import EVENT_COLUMNS, stored_event
from domain.events import EVENT_TYPES
from projections import queries, tree_store
from service.bootstrap import ServicesDependency
from service.checkpoint_wait import b64
from service.console.session import page, viewer
from service.responses import event_out

FEED_PAGE = 50
# The feed's type filter scans positions in order: at most this many per page, so a rare type on a
# large log answers quickly (with "nothing here, look further") instead of scanning to the end.
FEED_SCAN = 100_000
PREDICTION_STREAM_TYPES = {"PredictionRequested", "PredictionMade", "PredictionFailed", "GroundTruthRecorded",
                           "GroundTruthWithdrawn"}


@get("/ui/log", include_in_schema=False)
async def log_page(request: Request, services: ServicesDependency) -> Template:
    who = viewer(request, services)
    async with services.reading() as connection:
        head = await connection.fetchrow("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
        lag = await queries.lag(connection)
        tree = await tree_store.tree_state(connection)
        checkpoints = await tree_store.recent_checkpoints(connection, 20)
        # A checkpoint of size N covers positions 1..N: its delay is how long the newest of them waited.
        committed = dict(await connection.fetch(
            "SELECT position, (extract(epoch FROM recorded_at) * 1000000)::bigint FROM events "
            "WHERE position = ANY($1::bigint[])", [c.tree_size for c in checkpoints]))
        erasures = await connection.fetchval("SELECT count(*) FROM events WHERE event_type = 'BlobErased'")
        now_us = await connection.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
    signed = [{"size": c.tree_size, "root": b64(c.root_hash), "chain_head": c.chain_head.hex(),
               "age_s": (now_us - c.signed_at_us) / 1e6,
               "delay_s": (c.signed_at_us - committed[c.tree_size]) / 1e6 if c.tree_size in committed else None,
               "at": datetime.fromtimestamp(c.signed_at_us / 1e6, timezone.utc)} for c in checkpoints]
    delays = sorted(c["delay_s"] for c in signed if c["delay_s"] is not None)
    unsigned = (head["position"] - checkpoints[0].tree_size) if head and checkpoints else (head["position"] if head else 0)
    verifications, newest = [], None
    if who.can("audit"):
        verifications = await services.audit_jobs.recent(kind="verify", finished=True, limit=5)
        newest = next(iter(await services.audit_jobs.recent(kind="verify", limit=1)), None)
    return page("log.html", request, who, head=head, lag=lag, tree=tree, checkpoints=signed, erasures=erasures,
                delay_median_s=delays[len(delays) // 2] if delays else None, unsigned=unsigned,
                verifications=verifications, job=newest, slot="verify-job", refused=None)


@get("/ui/log/events", include_in_schema=False)
async def feed_page(
    request: Request, services: ServicesDependency,
    after: Annotated[int | None, Parameter(ge=0, le=2**63 - 1, required=False)] = None,
    event_type: Annotated[str | None, Parameter(query="type", required=False)] = None,
) -> Template:
    """The event feed, in log order, as an auditor replays it: by default the latest page."""
    who = viewer(request, services, "audit")
    if event_type and event_type not in EVENT_TYPES:
        event_type = None
    async with services.reading() as connection:
        head = await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")
        start = max(0, head - FEED_PAGE) if after is None else min(after, head)
        rows = await connection.fetch(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 AND position <= $1 + $2 "
            "AND ($3::text IS NULL OR event_type = $3) ORDER BY position LIMIT $4",
            start, FEED_SCAN, event_type or None, FEED_PAGE)
    events = [event_out(stored_event(row)) for row in rows]
    full = len(events) == FEED_PAGE
    scanned_to = events[-1].position if full else min(head, start + FEED_SCAN)
    return page("feed.html", request, who, events=events, head=head, start=start, scanned_to=scanned_to,
                event_type=event_type or "", types=sorted(EVENT_TYPES), prediction_types=PREDICTION_STREAM_TYPES,
                earlier=max(0, start - FEED_PAGE) if start > 0 else None,
                later=scanned_to if scanned_to < head else None)
