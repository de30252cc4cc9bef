"""The landing page: this node's last hour minute by minute, the log's last day hour by hour."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from litestar import Request, get
from litestar.response import Template

from projections import quality, queries
from service import charts
from service.bootstrap import ServicesDependency
from service.console.session import page, viewer
from service.routes import wait_for_projection


@get("/ui/", include_in_schema=False)
async def overview_page(request: Request, services: ServicesDependency) -> Template:
    """The landing page: this node's last hour minute by minute, the log's last day hour by hour."""
    who = viewer(request, services)
    minutes = services.metrics.recent.last_hour()
    labels = [datetime.fromtimestamp(m.start_s, timezone.utc).strftime("%H:%M") for m in minutes]
    node = {
        "throughput": charts.lines(
            "Uploads per minute (this node)", "Uploads answered by this node in each of the last 60 minutes",
            labels, {"uploads": [m.uploads for m in minutes], "5xx": [m.server_errors for m in minutes]}),
        "latency": charts.lines(
            "Upload latency, ms (this node)", "Median and 99th percentile upload latency per minute",
            labels, {"p50": [m.upload_p50_ms for m in minutes], "p99": [m.upload_p99_ms for m in minutes]}),
        "uploads": sum(m.uploads for m in minutes), "requests": sum(m.requests for m in minutes),
        "client_errors": sum(m.client_errors for m in minutes),
        "server_errors": sum(m.server_errors for m in minutes), "overloaded": sum(m.overloaded for m in minutes),
    }
    now = datetime.now(timezone.utc)
    until = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    since = until - timedelta(hours=24)
    hours = [since + timedelta(hours=h) for h in range(24)]
    made, failed, used = [0] * 24, [0] * 24, []
    async with services.reading() as connection:
        await wait_for_projection(connection, services.settings.read_your_writes_timeout_s)
        lag = await queries.lag(connection)
        position = await queries.tracked_position(connection)
        for entry in await quality.models(connection):
            if entry.last_used is None or entry.last_used < since:
                continue
            buckets = await quality.bucket_counts(connection, entry.sha256, entry.num_classes, position=position,
                                                  current=True, since=since, until=until, bucket="hour")
            for b in buckets:
                slot = hours.index(b.start.replace(tzinfo=timezone.utc))
                made[slot] += b.counts.predictions
                failed[slot] += b.counts.failed
            total = quality.total(buckets, entry.num_classes)
            used.append({"model": entry, "classes": total.predicted_class_counts,
                         "peak": max(total.predicted_class_counts, default=0), "made": total.predictions,
                         "failed": total.failed})
    day = charts.stacked_bars("Predictions per hour (every node)", "Made and failed predictions in each of the last 24 hours",
                              [h.strftime("%H:00") for h in hours], list(zip(made, failed, strict=True)),
                              ["made", "failed"])
    return page("overview.html", request, who, node=node, day=day, used=used, lag=lag, position=position,
                made=sum(made), failed=sum(failed))


