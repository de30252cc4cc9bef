"""Reads from a streaming replica that are never older than the primary was when they arrived.

The rule: a read first learns the primary's WAL write position (`pg_current_wal_lsn()`), then
waits, at most `max_wait_s`, until the replica has replayed past it. Every transaction whose
COMMIT was acknowledged before the read arrived (by any node: the commit record was flushed, so
it lies before that position) is then visible on the replica. So a client that got a 2xx from
one node reads its write back through any other node, with no token to carry.

Concurrent reads share one position query: every read that arrived before the query was sent
may use its answer (a later one could not). A replica that cannot be reached, or is still
behind when the wait ends, is left alone for `retry_s`: reads go to the primary meanwhile, so a
paused or stopped standby costs latency for one read per `retry_s`, never stale answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from db.store import CONNECTION_ERRORS

log = logging.getLogger(__name__)

# NULL on a server that is not in recovery: a DATABASE_READ_URL that names the primary itself is
# always fresh.
_CAUGHT_UP = "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::pg_lsn, NOT pg_is_in_recovery())"
_REPLICA_STATE = """
SELECT pg_is_in_recovery() AS standby,
       greatest(pg_wal_lsn_diff($1::pg_lsn, pg_last_wal_replay_lsn()), 0)::float8 AS lag_bytes,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS replay_paused,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replayed_commit_age_s
"""


class ReadRouter:
    """Hands out connections for queries: the replica's once it has caught up, else the primary's."""

    def __init__(
        self,
        primary: asyncpg.Pool,
        replica: asyncpg.Pool | None,
        *,
        max_wait_s: float,
        retry_s: float,
        acquire_timeout_s: float,
        on_read: Callable[[str], None] | None = None,
    ) -> None:
        self._primary = primary
        self._replica = replica
        self._max_wait_s = max_wait_s
        self._retry_s = retry_s
        self._acquire_timeout_s = acquire_timeout_s
        self._on_read = on_read or (lambda _server: None)
        self._avoid_until = 0.0
        self.avoided_because: str | None = None  # why reads go to the primary now, for readiness
        self._pending: asyncio.Future[int] | None = None  # the next position query, not sent yet
        self._fetches: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection on which every commit acknowledged before this call is visible.

        Connection errors propagate (the caller maps them); one on the replica also makes the
        next reads go to the primary.
        """
        replica = await self._caught_up_replica()
        if replica is None:
            async with self._primary.acquire(timeout=self._acquire_timeout_s) as connection:
                self._on_read("primary")
                yield connection
            return
        assert self._replica is not None
        try:
            self._on_read("replica")
            yield replica
        except CONNECTION_ERRORS as error:
            self._avoid(f"lost: {type(error).__name__}: {error}")
            raise
        finally:
            await self._replica.release(replica)

    async def _caught_up_replica(self) -> asyncpg.Connection | None:
        if self._replica is None or time.monotonic() < self._avoid_until:
            return None
        target = await self._primary_position()
        try:
            connection = await self._replica.acquire(timeout=self._acquire_timeout_s)
        except CONNECTION_ERRORS as error:
            self._avoid(f"unreachable: {type(error).__name__}: {error}")
            return None
        try:
            fresh = await self._wait_for_replay(connection, target)
        except BaseException as error:  # a cancelled request must give the connection back too
            await self._replica.release(connection)
            if not isinstance(error, CONNECTION_ERRORS):
                raise
            self._avoid(f"unreachable: {type(error).__name__}: {error}")
            return None
        if fresh:
            self.avoided_because = None
            return connection
        await self._replica.release(connection)
        self._avoid(f"more than {self._max_wait_s:g} s behind the primary")
        return None

    async def _wait_for_replay(self, connection: asyncpg.Connection, target: int) -> bool:
        deadline = time.monotonic() + self._max_wait_s
        delay = 0.001
        while not await connection.fetchval(_CAUGHT_UP, target):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.02)
        return True

    def _avoid(self, reason: str) -> None:
        if self.avoided_because is None:
            log.warning("reading from the primary for %.0f s: the replica is %s", self._retry_s, reason)
        self.avoided_because = reason
        self._avoid_until = time.monotonic() + self._retry_s

    # ---- the primary's position, one query for every read that arrived before it was sent --------

    async def _primary_position(self) -> int:
        future = self._pending
        if future is None:
            future = self._pending = asyncio.get_running_loop().create_future()
            future.add_done_callback(_retrieve)
            task = asyncio.create_task(self._fetch_position(future), name="primary-wal-position")
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)
        return await asyncio.shield(future)

    async def _fetch_position(self, future: asyncio.Future[int]) -> None:
        try:
            async with self._primary.acquire(timeout=self._acquire_timeout_s) as connection:
                # From here on a new read must wait for a later query: this one is being sent.
                if self._pending is future:
                    self._pending = None
                position = await connection.fetchval("SELECT pg_current_wal_lsn()")
        except BaseException as error:  # noqa: BLE001 - every waiter gets the failure
            if self._pending is future:
                self._pending = None
            future.set_exception(error)
            if not isinstance(error, Exception):
                raise
        else:
            future.set_result(position)

    # ---- readiness --------------------------------------------------------------------------

    async def status(self) -> dict[str, Any] | None:
        """The replica's state as the readiness body reports it (None: no replica configured)."""
        if self._replica is None:
            return None
        reads_from = "primary" if time.monotonic() < self._avoid_until else "replica"
        async with self._primary.acquire(timeout=self._acquire_timeout_s) as connection:
            position = await connection.fetchval("SELECT pg_current_wal_lsn()")
        try:
            async with self._replica.acquire(timeout=self._acquire_timeout_s) as connection:
                row = await connection.fetchrow(_REPLICA_STATE, position)
        except CONNECTION_ERRORS as error:
            return {"reachable": False, "error": f"{type(error).__name__}: {error}", "reads_from": "primary"}
        behind = row["standby"] and (row["lag_bytes"] or 0) > 0
        return {
            "reachable": True,
            "standby": row["standby"],
            "lag_bytes": int(row["lag_bytes"] or 0),
            # How old the last commit it replayed is, while it is behind (0 once caught up).
            "lag_seconds": round(row["replayed_commit_age_s"] or 0.0, 3) if behind else 0.0,
            "replay_paused": row["replay_paused"],
            "reads_from": reads_from,
            "why_primary": self.avoided_because if reads_from == "primary" else None,
        }


def _retrieve(future: asyncio.Future[int]) -> None:
    """Mark a failed position query's error as seen even when every waiter was cancelled."""
    if not future.cancelled():
        future.exception()
