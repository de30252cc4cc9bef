"""The log: its head, the Merkle tree and recent signed checkpoints, lag and erasures."""

from __future__ import annotations

from datetime import datetime, timezone

from litestar import Request, get
from litestar.response import Template

from projections import queries, tree_store
from service.bootstrap import ServicesDependency
from service.checkpoint_wait import b64
from service.console.session import page, viewer


@get("/ui/log", include_in_schema=False)
async def log_page(request: Request, services: ServicesDependency) -> Template:
    who = viewer(request, services)
    async with services.reading() as connection:
        head = await connection.fetchrow("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
        lag = await queries.lag(connection)
        tree = await tree_store.tree_state(connection)
        checkpoints = await tree_store.recent_checkpoints(connection, 20)
        erasures = await connection.fetchval("SELECT count(*) FROM events WHERE event_type = 'BlobErased'")
        now_us = await connection.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
    signed = [{"size": c.tree_size, "root": b64(c.root_hash), "chain_head": c.chain_head.hex(),
               "age_s": (now_us - c.signed_at_us) / 1e6,
               "at": datetime.fromtimestamp(c.signed_at_us / 1e6, timezone.utc)} for c in checkpoints]
    return page("log.html", request, who, head=head, lag=lag, tree=tree, checkpoints=signed,
                erasures=erasures)


