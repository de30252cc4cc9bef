"""The console's server-drawn charts and its per-minute activity ring."""

from __future__ import annotations

import pytest

from service import charts
from service.activity import BOUNDS, RecentActivity


def test_lines_leave_gaps_for_missing_values_and_scale_fractions_to_the_full_height():
    chart = charts.lines("t", "d", ["a", "b", "c", "d"], {"acc": [1.0, None, 0.0, 0.5]}, top=1.0, percent=True)
    (line,) = chart.lines
    assert line.path.count("M") == 2 and line.path.count("L") == 1  # the gap starts a new subpath
    top_y, bottom_y = charts.TOP, charts.HEIGHT - charts.BOTTOM
    assert [y for _, y in line.dots] == [top_y, bottom_y, (top_y + bottom_y) / 2]
    assert [t.label for t in chart.y_ticks] == ["0%", "25%", "50%", "75%", "100%"]
    assert not chart.empty and charts.lines("t", "d", ["a"], {"x": [None]}).empty


def test_stacked_bars_stack_each_series_on_the_one_below_and_round_the_axis_up():
    chart = charts.stacked_bars("t", "d", ["h1", "h2"], [(30, 10), (0, 5)], ["made", "failed"])
    assert chart.y_ticks[-1].label == "50"  # 40 rounds up to 50
    made, failed, late = chart.bars
    assert made.y + made.height == pytest.approx(charts.HEIGHT - charts.BOTTOM)
    assert failed.y + failed.height == pytest.approx(made.y, abs=0.11)
    assert (made.series, failed.series, late.series) == (0, 1, 1) and late.title == "h2: failed 5"


def test_a_reliability_diagram_places_bins_by_confidence_and_accuracy():
    chart = charts.reliability("t", "d", [(None, None), (0.5, 0.5), (1.0, 1.0)])
    (line,) = chart.lines
    assert len(line.dots) == 2 and line.dots[-1] == (charts.WIDTH - charts.RIGHT, charts.TOP)
    assert chart.diagonal.endswith(f"L{float(charts.WIDTH - charts.RIGHT)},{float(charts.TOP)}")


def test_the_activity_ring_counts_per_minute_and_forgets_an_hour_later():
    now = [3600.0 * 1000]
    recent = RecentActivity(clock=lambda: now[0])
    for ms in (1, 1, 1, 100):
        recent.observe("/prediction", 201, ms / 1000)
    recent.observe("/prediction", 503, 0.002)
    recent.observe("/predictions/", 404, 0.001)
    last = recent.last_hour()[-1]
    assert (last.requests, last.uploads, last.server_errors, last.overloaded, last.client_errors) == (6, 5, 1, 1, 1)
    assert 1 <= last.upload_p50_ms <= 1.19 and 100 <= last.upload_p99_ms <= 119
    now[0] += 60
    assert recent.last_hour()[-2] == last and recent.last_hour()[-1].requests == 0
    now[0] += 3600
    assert all(m.requests == 0 for m in recent.last_hour())
    recent.observe("/prediction", 201, 10 * BOUNDS[-1])  # beyond the last bound: still counted
    assert recent.last_hour()[-1].upload_p99_ms == round(BOUNDS[-1] * 1000, 2)
