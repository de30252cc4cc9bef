"""Scraping the service's /metrics: histogram sums and counts, and what a run's deltas say inside.

Each histogram's `_sum` and `_count` are kept summed over its labels (`name_sum`) and also per
label set (`name_sum{a="x",b="y"}`, labels as the service renders them), so one route or one stage
can be told apart from the others."""

from __future__ import annotations

import collections
import re

import httpx

_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(url: str) -> dict[str, float]:
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    values: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            if name.endswith(("_sum", "_count")) and 'le="' not in (labels or ""):
                values[name] += float(value)
                if labels:
                    values[f"{name}{labels}"] += float(value)
    return dict(values)


def inside_numbers(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def mean(name: str, labels: str = "") -> float:
        count = delta(f"{name}_count{labels}")
        return delta(f"{name}_sum{labels}") / count if count else 0.0

    upload = '{method="POST",route="/prediction"}'  # the route template, as Litestar names it

    return {
        "batches": delta("inference_batch_size_count"),
        "mean_batch": mean("inference_batch_size"),
        "mean_inference_ms": 1e3 * mean("inference_batch_seconds"),
        "mean_queue_wait_ms": 1e3 * mean("inference_queue_wait_seconds"),
        "commits": delta("event_commit_group_size_count"),
        "mean_commit_group": mean("event_commit_group_size"),
        "mean_commit_ms": 1e3 * mean("event_commit_seconds"),
        # per upload: the server's whole request (Litestar's middleware in), then its own stages
        "uploads": delta(f"http_request_duration_seconds_count{upload}"),
        "mean_http_ms": 1e3 * mean("http_request_duration_seconds", upload),
        **{f"mean_{stage}_stage_ms": 1e3 * mean("prediction_stage_seconds", f'{{stage="{stage}"}}')
           for stage in ("decode", "inference", "record")},
    }
