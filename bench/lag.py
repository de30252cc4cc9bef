"""Projection lag: the projection's tracked position and the head sampled every 10 ms during a run, and each event's lag."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import asyncpg


class LagSampler:
    """Samples (database clock, tracked position, head) every `interval_s` on its own connection."""

    def __init__(self, dsn: str, interval_s: float = 0.010) -> None:
        self.dsn = dsn
        self.interval_s = interval_s
        self.samples: list[tuple[datetime, int, int]] = []
        self.first_position = 0
        self.last_position = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._connection: asyncpg.Connection | None = None

    _SQL = """SELECT clock_timestamp() AS at,
                     (SELECT position FROM projection_tracking WHERE name = 'read_model') AS tracked,
                     (SELECT coalesce(max(position), 0) FROM events) AS head"""

    async def start(self) -> None:
        self._connection = await asyncpg.connect(self.dsn)
        row = await self._connection.fetchrow(self._SQL)
        self.first_position = row["head"]
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        assert self._connection is not None
        deadline = None
        while True:
            row = await self._connection.fetchrow(self._SQL)
            self.samples.append((row["at"], row["tracked"], row["head"]))
            if self._stopping.is_set():
                if deadline is None:  # the load has ended: the last event is the head now
                    self.last_position = row["head"]
                    deadline = time.monotonic() + 30
                if row["tracked"] >= self.last_position or time.monotonic() > deadline:
                    return
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Stop at the end of the load, but keep sampling until the projection has caught up."""
        assert self._task is not None
        self._stopping.set()
        await self._task

    async def per_event_lag_ms(self) -> list[float]:
        assert self._connection is not None
        rows = await self._connection.fetch(
            "SELECT position, recorded_at FROM events WHERE position > $1 AND position <= $2 ORDER BY position",
            self.first_position, self.last_position,
        )
        await self._connection.close()
        lags: list[float] = []
        index = 0
        for row in rows:
            while index < len(self.samples) and self.samples[index][1] < row["position"]:
                index += 1
            if index == len(self.samples):
                break  # not projected before sampling stopped (reported as missing)
            lags.append((self.samples[index][0] - row["recorded_at"]).total_seconds() * 1e3)
        self.unobserved = len(rows) - len(lags)
        return lags


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def lag_summary(sampler: LagSampler) -> dict[str, Any]:
    lags = await sampler.per_event_lag_ms()
    behind = [head - tracked for _, tracked, head in sampler.samples]
    if not lags:
        return {}
    return {
        "events": len(lags), "samples": len(sampler.samples), "unobserved": sampler.unobserved,
        "p50_ms": percentile(lags, 0.5), "p90_ms": percentile(lags, 0.9), "p99_ms": percentile(lags, 0.99),
        "max_ms": max(lags), "behind_p50": percentile(behind, 0.5), "behind_p99": percentile(behind, 0.99),
        "behind_max": max(behind, default=0),
    }


_INTEGRATION_DELAY = """
SELECT count(*) AS events,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY delay) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY delay) AS p99,
       max(delay) AS max,
       count(*) FILTER (WHERE delay IS NULL) AS unsigned
FROM (
    SELECT extract(epoch FROM (SELECT c.signed_at FROM tlog_checkpoints AS c WHERE c.tree_size >= e.position
                               ORDER BY c.tree_size LIMIT 1) - e.recorded_at)::float8 AS delay
    FROM events AS e WHERE e.stream_id = ANY($1::uuid[])
) AS d
"""


async def integration_delay(owner_dsn: str, prediction_ids: list[str]) -> dict[str, Any]:
    """Commit to inside a signed checkpoint, per event of the predictions a run acknowledged: from
    `recorded_at` (taken under the append lock) to the `signed_at` of the first checkpoint whose
    tree holds the event, both on the database's clock. Measured after the run, from the tables."""
    if not prediction_ids:
        return {}
    connection = await asyncpg.connect(owner_dsn)
    try:
        row = await connection.fetchrow(_INTEGRATION_DELAY, prediction_ids)
        checkpoints = await connection.fetchval("SELECT count(*) FROM tlog_checkpoints")
    finally:
        await connection.close()
    if not row["events"]:
        return {}
    return {"events": row["events"], "p50_ms": (row["p50"] or 0) * 1e3, "p99_ms": (row["p99"] or 0) * 1e3,
            "max_ms": (row["max"] or 0) * 1e3, "unsigned": row["unsigned"], "checkpoints": checkpoints}
