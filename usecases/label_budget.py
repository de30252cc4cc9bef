"""Uploads first: how much of a process's time bulk labels may take while uploads are served.

A 10,000-item bulk request costs about half a second of the event loop and of the append lock.
On a machine whose cores the uploads already fill, that time is taken from uploads, so a labelling
tool posting at full speed cut upload throughput to a fifth. Labels are not urgent (they arrive
hours to weeks after the predictions they judge); uploads are the production path. So bulk
requests take turns: while uploads are arriving, one at a time per process, each followed by a
pause that holds bulk labels to `share` of the time; when no upload has arrived lately, at full
speed. A paused request is re-checked often, so it goes as soon as uploads stop. A paused request
costs nothing but its open connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

RECHECK_S = 0.05  # how soon a paused bulk request notices that uploads stopped


class IngestionBudget:
    """`concurrency` bulk requests at once while no upload arrives (two: one is checked while the
    other commits); while uploads arrive, one at a time, each followed by a pause so that bulk
    labels take at most `share` of the time."""

    def __init__(
        self,
        share: float,
        uploads_busy: Callable[[], bool],
        *,
        concurrency: int = 2,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError("the share of time for bulk labels must be in (0, 1]")
        self._share = share
        self._uploads_busy = uploads_busy
        self._concurrency = concurrency
        self._clock = clock
        self._on_wait = on_wait
        self._active = 0
        self._ended = asyncio.Event()
        self._next_turn_at = float("-inf")  # while uploads arrive, no bulk request starts before this

    def _may_start(self) -> bool:
        if not self._uploads_busy() or self._share == 1:
            return self._active < self._concurrency
        return self._active == 0 and self._clock() >= self._next_turn_at

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold this while a bulk request is planned and appended."""
        asked = self._clock()
        while not self._may_start():
            self._ended.clear()
            try:
                await asyncio.wait_for(self._ended.wait(), RECHECK_S)
            except TimeoutError:
                pass
        self._active += 1
        began = self._clock()
        if self._on_wait is not None:
            self._on_wait(began - asked)
        try:
            yield
        finally:
            self._active -= 1
            ended = self._clock()
            self._next_turn_at = max(self._next_turn_at, ended + (ended - began) * (1 - self._share) / self._share)
            self._ended.set()


def unlimited() -> IngestionBudget:
    """No pacing (share 1): for a process without uploads, or a test."""
    return IngestionBudget(1.0, lambda: False)
