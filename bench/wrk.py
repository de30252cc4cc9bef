"""One wrk run against one target, with CPU, /metrics and projection lag measured around it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.cpu import CLOCK_TICKS, backend_pids, http_processes, machine_ticks, process_ticks, settle, ticks
from bench.lag import LagSampler
from bench.processes import Target
from bench.scrape import inside_numbers, scrape

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "tests" / "fixtures" / "digits"
LUA = REPO / "bench" / "upload.lua"


@dataclass
class Run:
    target: str
    connections: int
    mode: str
    duration_s: float
    requests: int
    created: int
    non_201: int
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]
    prediction_ids: list[str] = field(repr=False, default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    inside: dict[str, float] = field(default_factory=dict)
    warmup_created: int = 0
    warmup_ids: list[str] = field(repr=False, default_factory=list)
    warmup_errors: int = 0
    settle_s: float = 0.0
    round: int = 1
    lag: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def errors(self) -> int:
        return self.non_201 + sum(self.socket_errors.values())

    def summary(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("prediction_ids", "warmup_ids")}
        out["rps"] = self.rps
        return out


def digits_manifest(folder: Path) -> Path:
    """The file bench/upload.lua reads: one digit PNG's path per line."""
    files = sorted(DIGITS.glob("*.png"))
    if not files:
        raise SystemExit(f"no digit PNGs in {DIGITS}")
    manifest = folder / "digits.txt"
    manifest.write_text("".join(f"{path}\n" for path in files))
    return manifest


async def wrk(url: str, connections: int, seconds: float, mode: str, manifest: Path, out: Path,
              ok_status: int = 201) -> dict[str, Any]:
    env = {**os.environ, "BENCH_FILES": str(manifest), "BENCH_MODE": mode, "BENCH_OUT": str(out),
           "BENCH_OK_STATUS": str(ok_status)}
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(LUA), url,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0 or not out.exists():
        raise RuntimeError(f"wrk failed ({process.returncode}): {output.decode(errors='replace')}")
    data = json.loads(out.read_text())
    out.unlink()
    return data


class Bench:
    def __init__(self, args: argparse.Namespace, results: Path, admin: asyncpg.Connection) -> None:
        self.args = args
        self.results = results
        self.admin = admin
        self.manifest = digits_manifest(results)
        self.runs: list[Run] = []
        self.server_pids: list[int] = []  # all servers under test: idle before each measured run

    async def load(self, target: Target, connections: int, mode: str = "multipart", *,
                   lag: LagSampler | None = None, duration: float | None = None,
                   during: Any = None) -> Run:
        duration = duration or self.args.duration
        scratch = self.results / f"wrk-{uuid.uuid4().hex[:8]}.json"
        warm = await wrk(target.url, connections, self.args.warmup, mode, self.manifest, scratch, target.ok_status)
        settle_s = await settle(self.server_pids or [target.pid])
        # /metrics is per process: with several workers its deltas would mix processes.
        single = len(http_processes(target.pid)) == 1
        metrics_before = scrape(target.url) if target.name == "ours" and single else {}
        pids = await backend_pids(self.admin, target.database) if target.database else []
        pg_before = {pid: ticks(f"/proc/{pid}/stat") for pid in pids}
        proc_before, loop_before = process_ticks(target.pid)
        busy_before, total_before = machine_ticks()
        started = time.perf_counter()
        if lag is not None:
            await lag.start()
        extra = asyncio.create_task(during()) if during is not None else None
        data = await wrk(target.url, connections, duration, mode, self.manifest, scratch, target.ok_status)
        wall = time.perf_counter() - started
        if extra is not None:
            await extra
        proc_after, loop_after = process_ticks(target.pid)
        busy_after, total_after = machine_ticks()
        pids = await backend_pids(self.admin, target.database) if target.database else []
        pg_ticks = sum(ticks(f"/proc/{pid}/stat") - pg_before.get(pid, 0) for pid in pids)
        if lag is not None:
            await lag.stop()
        metrics_after = scrape(target.url) if target.name == "ours" and single else {}

        latency = data["latency_us"]
        run = Run(
            target=target.name,
            connections=connections,
            mode=mode,
            duration_s=data["duration_us"] / 1e6,
            requests=data["requests"],
            created=data["created"],
            non_201=data["non_201"],
            statuses=data["statuses"],
            socket_errors=data["errors"],
            latency_ms={
                "mean": latency["mean"] / 1e3, "stdev": latency["stdev"] / 1e3, "max": latency["max"] / 1e3,
                **{f"p{key.rstrip('0').rstrip('.') if '.' in key else key}": value / 1e3
                   for key, value in latency["percentiles"].items()},
            },
            prediction_ids=data["prediction_ids"],
            warmup_created=warm["created"],
            warmup_ids=warm["prediction_ids"],
            warmup_errors=warm["non_201"] + sum(warm["errors"].values()),
            settle_s=settle_s,
        )
        seconds = wall
        run.cpu = {
            "process_pct": 100 * (proc_after - proc_before) / CLOCK_TICKS / seconds,
            "loop_thread_pct": 100 * (loop_after - loop_before) / CLOCK_TICKS / seconds,
            "postgres_pct": 100 * pg_ticks / CLOCK_TICKS / seconds,
            "machine_busy_pct": 100 * os.cpu_count() * (busy_after - busy_before) / max(1, total_after - total_before),
        }
        if run.requests:
            run.cpu["process_us_per_request"] = 1e6 * (proc_after - proc_before) / CLOCK_TICKS / run.requests
            run.cpu["loop_us_per_request"] = 1e6 * (loop_after - loop_before) / CLOCK_TICKS / run.requests
            run.cpu["postgres_us_per_request"] = 1e6 * pg_ticks / CLOCK_TICKS / run.requests
        if metrics_before and metrics_after:
            run.inside = inside_numbers(metrics_before, metrics_after)
        self.runs.append(run)
        print(f"  {target.name:>9} c={connections:<3} {mode:<9} {run.rps:9.1f} req/s  "
              f"p50 {run.latency_ms['p50']:8.2f} ms  p99 {run.latency_ms['p99']:8.2f} ms  "
              f"errors {run.errors}  loop CPU {run.cpu['loop_thread_pct']:.0f}%  "
              f"process CPU {run.cpu['process_pct']:.0f}%  PG CPU {run.cpu['postgres_pct']:.0f}%", flush=True)
        return run
