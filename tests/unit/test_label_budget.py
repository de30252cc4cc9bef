"""Uploads first: bulk labels take turns, and a share of the time while uploads arrive."""

from __future__ import annotations

import asyncio
import time

import pytest

from usecases.label_budget import IngestionBudget

pytestmark = pytest.mark.timeout(20)


async def _turns(budget: IngestionBudget, count: int, hold_s: float) -> list[tuple[float, float]]:
    """Start `count` bulk requests at once, each holding its turn for `hold_s`; their spans."""
    spans: list[tuple[float, float]] = []

    async def one() -> None:
        async with budget.turn():
            began = time.monotonic()
            await asyncio.sleep(hold_s)
            spans.append((began, time.monotonic()))

    await asyncio.gather(*(one() for _ in range(count)))
    return sorted(spans)


async def test_without_uploads_two_go_at_once_at_full_speed():
    spans = await _turns(IngestionBudget(0.1, lambda: False), 4, 0.05)
    assert spans[1][0] < spans[0][1]  # the second overlapped the first
    assert spans[2][0] >= spans[0][1] - 0.005  # never three at once
    assert spans[-1][1] - spans[0][0] < 0.2  # no pauses: 2 rounds of 50 ms


async def test_while_uploads_arrive_one_at_a_time_within_its_share():
    waits: list[float] = []
    budget = IngestionBudget(0.25, lambda: True, on_wait=waits.append)
    spans = await _turns(budget, 3, 0.05)
    for (_, ended), (began, _) in zip(spans, spans[1:]):
        assert began - ended >= 0.15 - 0.01  # a 50 ms turn at a quarter of the time: 150 ms apart
    busy = sum(end - start for start, end in spans[:-1])  # each turn and the pause after it
    assert busy / (spans[-1][0] - spans[0][0]) <= 0.25 + 0.02
    assert len(waits) == 3 and max(waits) >= 0.3


async def test_a_paused_request_goes_as_soon_as_uploads_stop():
    uploading = {"now": True}
    budget = IngestionBudget(0.01, lambda: uploading["now"])
    await _turns(budget, 1, 0.05)  # the next turn would wait about 5 s while uploads go on

    async def stop_uploads() -> None:
        await asyncio.sleep(0.1)
        uploading["now"] = False

    asked = time.monotonic()
    stopper = asyncio.create_task(stop_uploads())
    await _turns(budget, 1, 0.0)
    await stopper
    assert 0.09 < time.monotonic() - asked < 0.5


def test_a_share_outside_zero_to_one_is_refused():
    for share in (0, -0.1, 1.5):
        with pytest.raises(ValueError):
            IngestionBudget(share, lambda: False)
