"""The last hour of this process's HTTP traffic, minute by minute, for the console's overview.

Prometheus histograms are cumulative since start; a person looking at the console wants "how is
it doing now". This keeps 60 one-minute slots (a ring: a slot is cleared when its minute comes
round again) with counts by outcome and a coarse latency histogram of uploads, so percentiles per
minute cost a few microseconds to record and nothing to keep. Per process: a cluster's overview
shows the node that answered (the events themselves are counted from the database).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

MINUTES = 60
# Upper bounds of the latency buckets, in seconds (about 19% apart, 0.5 ms to 60 s).
BOUNDS = [0.0005 * 1.19 ** i for i in range(68)]
UPLOAD_ROUTES = frozenset({"/prediction", "/ui/upload"})  # route templates, as Litestar names them


class _Slot:
    __slots__ = ("minute", "requests", "uploads", "client_errors", "server_errors", "overloaded", "latency")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.requests = self.uploads = self.client_errors = self.server_errors = self.overloaded = 0
        self.latency = [0] * (len(BOUNDS) + 1)


@dataclass(frozen=True)
class Minute:
    start_s: int  # epoch seconds of the minute's start
    requests: int
    uploads: int
    client_errors: int
    server_errors: int  # 5xx, 503s included
    overloaded: int     # 503s
    upload_p50_ms: float | None
    upload_p99_ms: float | None


class RecentActivity:
    def __init__(self, clock=time.time) -> None:
        self._clock = clock
        self._slots: list[_Slot | None] = [None] * MINUTES

    def observe(self, route: str, status: int, seconds: float) -> None:
        minute = int(self._clock()) // 60
        slot = self._slots[minute % MINUTES]
        if slot is None or slot.minute != minute:
            slot = self._slots[minute % MINUTES] = _Slot(minute)
        slot.requests += 1
        if status >= 500:
            slot.server_errors += 1
            slot.overloaded += status == 503
        elif status >= 400:
            slot.client_errors += 1
        if route in UPLOAD_ROUTES:
            slot.uploads += 1
            slot.latency[bisect.bisect_left(BOUNDS, seconds)] += 1

    def last_hour(self) -> list[Minute]:
        """The 60 minutes up to now, oldest first (a minute without traffic is all zeros)."""
        now = int(self._clock()) // 60
        minutes = []
        for minute in range(now - MINUTES + 1, now + 1):
            slot = self._slots[minute % MINUTES]
            if slot is None or slot.minute != minute:
                slot = _Slot(minute)
            minutes.append(Minute(
                start_s=minute * 60, requests=slot.requests, uploads=slot.uploads,
                client_errors=slot.client_errors, server_errors=slot.server_errors, overloaded=slot.overloaded,
                upload_p50_ms=_percentile(slot.latency, 0.50), upload_p99_ms=_percentile(slot.latency, 0.99),
            ))
        return minutes


def _percentile(histogram: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-quantile (an overestimate by at most 19%)."""
    total = sum(histogram)
    if not total:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return round(BOUNDS[min(index, len(BOUNDS) - 1)] * 1000, 2)
    return None  # unreachable: the counts sum to total
