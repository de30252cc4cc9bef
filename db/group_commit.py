"""Group commit: every append that queues while a transaction runs goes into the next one.

A single writer task owns the append path of this process. It never lingers: when idle it commits
the first request at once; under load each transaction carries everything that queued meanwhile
(up to `max_group`), so the lock, the round trips, the fsync and the NOTIFY are paid once per group.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from db.store import (
    AppendOutcome,
    AppendRejected,
    AppendRequest,
    DatabaseUnavailable,
    EventStore,
)

log = logging.getLogger(__name__)


class GroupCommitter:
    def __init__(
        self,
        store: EventStore,
        *,
        max_group: int = 256,
        on_group: Callable[[int, float], None] | None = None,
    ) -> None:
        self._store = store
        self._max_group = max_group
        self._queue: asyncio.Queue[tuple[AppendRequest, asyncio.Future[AppendOutcome]]] = asyncio.Queue()
        self._on_group = on_group
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def append(self, request: AppendRequest) -> AppendOutcome:
        if self._closing:
            return DatabaseUnavailable("the service is shutting down")
        future: asyncio.Future[AppendOutcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((request, future))
        # Not shielded: the writer task owns the commit, so a caller that goes away cancels only
        # its own wait (the writer skips a done future), and a shield would cost every answer
        # one more turn of the event loop.
        return await future

    async def close(self) -> None:
        """Commit everything already queued, then stop."""
        self._closing = True
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._queue.get()]
            while len(group) < self._max_group and not self._queue.empty():
                group.append(self._queue.get_nowait())
            started = loop.time()
            try:
                outcomes = await self._store.append([request for request, _ in group])
            except Exception as error:  # a bug, not a database state: fail the group, keep serving
                log.exception("append of a group of %d failed", len(group))
                outcomes = [AppendRejected(f"append failed: {error!r}")] * len(group)
            if self._on_group is not None:
                self._on_group(len(group), loop.time() - started)
            for (_, future), outcome in zip(group, outcomes):
                if not future.done():
                    future.set_result(outcome)
                self._queue.task_done()
