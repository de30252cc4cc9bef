"""After the load: every acknowledged prediction is in the event table, and how fast the log rebuilds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench.wrk import Run

REPO = Path(__file__).resolve().parent.parent


async def durability(owner_dsn: str, app_dsn: str, runs: list[Run]) -> dict[str, Any]:
    ours = [run for run in runs if run.target.startswith("ours")]
    acknowledged = [pid for run in ours for pid in (*run.warmup_ids, *run.prediction_ids)]
    counted_201 = sum(run.created + run.warmup_created for run in ours)
    connection = await asyncpg.connect(owner_dsn)
    try:
        made = await connection.fetchval("SELECT count(*) FROM events WHERE event_type = 'PredictionMade'")
        failed = await connection.fetchval("SELECT count(*) FROM events WHERE event_type = 'PredictionFailed'")
        found = await connection.fetchval(
            "SELECT count(*) FROM events WHERE event_type = 'PredictionMade' AND stream_id = ANY($1::uuid[])",
            acknowledged,
        )
        events = await connection.fetchval("SELECT count(*) FROM events")
    finally:
        await connection.close()
    app = await asyncpg.connect(app_dsn)  # the service's role, without the pool's explicit settings
    try:
        settings = {row["name"]: row["setting"] for row in await app.fetch(
            "SELECT name, setting FROM pg_settings WHERE name IN ('synchronous_commit', 'fsync', 'wal_sync_method', "
            "'full_page_writes')")}
        server_version = await app.fetchval("SHOW server_version")
    finally:
        await app.close()
    in_flight_bound = sum(2 * run.connections for run in ours)  # cut off by wrk's end (warm-up + run)
    return {
        "acknowledged_201": counted_201,
        "acknowledged_ids": len(acknowledged),
        "acknowledged_ids_in_table": found,
        "prediction_made_events": made,
        "prediction_failed_events": failed,
        "events": events,
        "answered_after_wrk_stopped": made - counted_201,
        "in_flight_bound": in_flight_bound,
        "server_settings": settings,
        "server_version": server_version,
        "ok": found == len(acknowledged) == counted_201 and 0 <= made - counted_201 <= in_flight_bound,
    }


def rebuild_speed(owner_dsn: str) -> dict[str, Any]:
    env = {**os.environ, "DATABASE_URL": owner_dsn, "PYTHONPATH": str(REPO), "LOG_LEVEL": "WARNING"}
    env.pop("APP_DATABASE_URL", None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", "rebuild"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    match = re.search(r"rebuilt (\d+) events .*? in ([\d.]+) s \(([\d,]+|inf) events/s\)", done.stdout)
    result: dict[str, Any] = {"wall_s": wall, "returncode": done.returncode, "output": done.stdout.strip()}
    if match:
        result.update(events=int(match.group(1)), build_s=float(match.group(2)),
                      events_per_s=float(match.group(3).replace(",", "")) if match.group(3) != "inf" else None)
    else:
        result["error"] = (done.stdout + done.stderr)[-2000:]
    return result
