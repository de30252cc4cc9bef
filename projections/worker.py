"""Elected followers of the log: one active per name across all processes, supervised. The
projection runner is one; the Merkle tree integrator (projections/tree.py) is the other.

Each runner keeps one dedicated, long-lived connection (never a pooled one: a pool runs
`UNLISTEN *` on release). On it the runner waits for a session-level advisory lock (a standby
polls for it), LISTENs for the event store's NOTIFY, and applies batches. A notification wakes it
at once; a poll every `poll_interval_s` covers notifications lost while it was disconnected. Any
failure closes the connection, which also releases the lock, and reconnects after a growing
backoff; a standby elsewhere may take over meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from db.store import NOTIFY_CHANNEL
from projections.read_model import (
    LIVE_SCHEMA,
    READ_MODEL,
    TRACKING_TABLE,
    ReadModelWriter,
    TrackingMoved,
    project_batch,
)

log = logging.getLogger(__name__)

OnApplied = Callable[[int, int], Awaitable[None] | None]  # (tracked position, events in the batch)


def projection_lock_key(name: str) -> int:
    """The advisory lock key electing the active worker of one projection (signed 64-bit)."""
    return int.from_bytes(hashlib.sha256(f"projection:{name}".encode()).digest()[:8], "big", signed=True)


WORKER_SESSION_PREFIX = "projection:"


def worker_server_settings(name: str, node: str | None = None) -> dict[str, str]:
    return {
        # `projection:<name>[@<node>]`: which node holds which election is visible in
        # pg_stat_activity, and so in every node's readiness (`elected_workers`).
        "application_name": (f"{WORKER_SESSION_PREFIX}{name}" + (f"@{node}" if node else ""))[:63],
        # A worker whose host vanished (no FIN) must lose its session, and so the lock, within
        # seconds: TCP keepalives (ignored on Unix sockets, where a dead peer is seen at once) ...
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
        # ... and a frozen worker mid-transaction must not hold its batch's locks forever.
        "idle_in_transaction_session_timeout": "30000",
        # A rebuild's swap holds the tracking row briefly; wait for it, but not forever.
        "lock_timeout": "30000",
        # Never keep a generic plan chosen while the read tables were empty (see append_settings);
        # project_batch asks for generic plans in a batch whose statements are all index probes.
        "plan_cache_mode": "force_custom_plan",
    }


async def elected_workers(connection: asyncpg.Connection) -> dict[str, str]:
    """{elected worker: where it runs} for every follower holding its lock now, whichever node.

    Where: the session's node name, else its client address and port. A session sees the
    details of sessions of its own role, which every follower uses.
    """
    rows = await connection.fetch(
        """
        SELECT DISTINCT a.application_name, host(a.client_addr) AS address, a.client_port
        FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
        WHERE l.locktype = 'advisory' AND l.granted AND a.application_name LIKE $1
        """,
        WORKER_SESSION_PREFIX + "%",
    )
    found = {}
    for row in rows:
        name, _, node = row["application_name"].removeprefix(WORKER_SESSION_PREFIX).partition("@")
        found[name] = node or (f"{row['address']}:{row['client_port']}" if row["address"] else "local socket")
    return found


class ElectedFollower:
    """Follows the log while it holds its advisory lock: one active per name across all processes.

    `start()` returns at once; `stop()` drains (the step in hand is finished and committed) and
    releases the lock. `is_active` is true while this follower holds the lock. Subclasses say
    where they are (`_resume`) and what one step does (`_step`); the election, LISTEN, polling,
    reconnection with backoff and draining are the same for every follower.
    """

    def __init__(
        self,
        dsn: str,
        *,
        name: str,
        poll_interval_s: float = 1.0,
        batch_size: int = 1000,
        on_applied: OnApplied | None = None,
        lock_poll_s: float = 1.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 60.0,
        drain_timeout_s: float = 30.0,
        coalesce_s: float = 0.0,
        node: str | None = None,
    ) -> None:
        self._dsn = dsn
        self._poll_interval_s = poll_interval_s
        self._batch_size = batch_size
        self._on_applied = on_applied
        self.name = name
        self._lock_poll_s = lock_poll_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._coalesce_s = coalesce_s
        self._node = node
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._active = False
        self.position: int | None = None  # where this follower is, as of its last step
        self.events_applied = 0
        self.notifications = 0  # NOTIFYs received (none while coalescing)
        self.restarts = 0

    @property
    def is_active(self) -> bool:
        return self._active

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._stopping.clear()
            self._task = asyncio.create_task(self._supervise(), name=f"follower:{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), self._drain_timeout_s)
        except TimeoutError:
            log.warning("%s did not drain in %.0f s; cancelling it", self.name, self._drain_timeout_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stopped()

    # ---- what a follower does ------------------------------------------------------------------

    async def _resume(self, connection: asyncpg.Connection) -> int:
        """Where to continue from, once elected (the lock is held)."""
        raise NotImplementedError

    async def _step(self, connection: asyncpg.Connection, position: int) -> tuple[int, int]:
        """Apply what follows `position` (at most one batch); (new position, events applied)."""
        raise NotImplementedError

    def _idle_wait_s(self) -> float:
        """How long to wait for a notification when there is nothing to apply."""
        return self._poll_interval_s

    async def _stopped(self) -> None:
        """After the drain: a last word (a final signature, say)."""

    # ---- supervision -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = self._backoff_initial_s
        while not self._stopping.is_set():
            connection: asyncpg.Connection | None = None
            try:
                connection = await asyncpg.connect(
                    self._dsn,
                    timeout=self._connect_timeout_s,
                    command_timeout=self._command_timeout_s,
                    server_settings=worker_server_settings(self.name, self._node),
                )
                connection.add_termination_listener(lambda _connection: self._wake.set())
                await self._serve(connection)
                backoff = self._backoff_initial_s
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - supervised: any failure restarts the worker
                self.restarts += 1
                log.warning("%s worker failed (%s: %s); restarting in %.1f s",
                            self.name, type(error).__name__, error, backoff)
            finally:
                self._active = False
                if connection is not None:
                    await _close(connection)
            if not self._stopping.is_set():
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max_s)

    async def _serve(self, connection: asyncpg.Connection) -> None:
        key = projection_lock_key(self.name)
        while not await connection.fetchval("SELECT pg_try_advisory_lock($1)", key):
            if await self._sleep(self._lock_poll_s):
                return
        self._active = True
        log.info("%s: this worker is active", self.name)
        await connection.add_listener(NOTIFY_CHANNEL, self._notified)
        position = await self._resume(connection)
        self.position = position
        while not self._stopping.is_set():
            if connection.is_closed():
                raise ConnectionError("the worker's connection closed")
            # Cleared before reading, so a notification that lands during the batch is not lost.
            self._wake.clear()
            position, count = await self._step(connection, position)
            self.position = position
            if count:
                self.events_applied += count
                await self._report(position, count)
                if count == self._batch_size:
                    continue  # more may be waiting: no need for a wake-up
                # Under load every group commit notifies: let a few commits gather so a batch
                # carries many events instead of paying per-batch costs for each commit. Not
                # listening meanwhile: each notification would cost this session's backend and
                # this process a wake-up for nothing (the next step reads whatever committed).
                # Listening again before that step reads, so no commit after it goes unnoticed.
                if self._coalesce_s > 0:
                    await connection.remove_listener(NOTIFY_CHANNEL, self._notified)
                    stopping = await self._sleep(self._coalesce_s)
                    await connection.add_listener(NOTIFY_CHANNEL, self._notified)
                    if stopping:
                        break
                    continue
            await self._wait_for_work()

    # ---- waiting --------------------------------------------------------------------------

    def _notified(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        self._wake.set()

    async def _wait_for_work(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._idle_wait_s())

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped meanwhile; true when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _report(self, position: int, count: int) -> None:
        if self._on_applied is None:
            return
        try:
            result = self._on_applied(position, count)
            if inspect.isawaitable(result):
                await result
        except Exception:  # noqa: BLE001 - a broken observer must not stop the follower
            log.exception("%s: on_applied failed", self.name)


class ProjectionRunner(ElectedFollower):
    """Keeps the read model up to date while it holds its projection's lock."""

    def __init__(self, dsn: str, *, name: str = READ_MODEL, **options) -> None:
        super().__init__(dsn, name=name, **options)
        self._writer = ReadModelWriter(LIVE_SCHEMA)
        self.events_skipped = 0

    async def _resume(self, connection: asyncpg.Connection) -> int:
        position = await connection.fetchval(f"SELECT position FROM {TRACKING_TABLE} WHERE name = $1", self.name)
        if position is None:
            # Not created here: starting from 0 over populated tables would refuse every event
            # as a duplicate. The migration creates it; an operator who removed it must decide.
            raise RuntimeError(f"no tracking row named {self.name!r} in {TRACKING_TABLE}")
        return position

    async def _step(self, connection: asyncpg.Connection, position: int) -> tuple[int, int]:
        while True:
            try:
                position, count, errors = await project_batch(
                    connection, self._writer, name=self.name, expected=position, batch_size=self._batch_size
                )
            except TrackingMoved as moved:  # a rebuild swapped the tables in: go on from its position
                log.warning("projection %s: %s; continuing from there", self.name, moved)
                position = await self._resume(connection)
                continue
            self.events_skipped += len(errors)
            return position, count


async def _close(connection: asyncpg.Connection) -> None:
    if connection.is_closed():
        return
    try:
        await asyncio.wait_for(connection.close(), 2.0)
    except Exception:  # noqa: BLE001 - the server may be gone already
        connection.terminate()
