"""`just bench`: the service end to end under real HTTP load, beside its ceilings and a naive reference.

    python bench/run.py [--duration 12] [--warmup 3] [--rounds 2] [--connections 1,16,64] [--profile]
                        [--no-write]

One run, on throwaway databases (DATABASE_URL's server when set, else a private embedded
PostgreSQL in a temporary folder), prints and writes to BENCHMARKS.md (between its
`bench:begin`/`bench:end` markers; the prose around them is kept):

1. `POST /prediction/` with the digit PNGs in tests/fixtures/digits from wrk (bench/upload.lua:
   multipart, rotating through the files; `--timeout 30s`): req/s and p50/p90/p99 at each
   connection count, plus the raw-body form (Content-Type: image/png) at the highest count.
2. The naive reference (bench/reference_app.py: per-request `model.predict`, two commits with
   psycopg) at the same loads, and the ratio ours/reference.
3. The ceilings: the model alone by batch size (bench/model_ceiling.py) and the HTTP stack on the
   same uploads without inference or storage (bench/http_ceiling_app.py).
4. Projection lag per event during the highest-load run (the checkpoint is sampled every 10 ms;
   an event's lag is the first sample whose checkpoint covers it minus its `recorded_at`, both
   on the database's clock), and `python -m cli rebuild` on the database the run produced.
5. Durability: every prediction_id wrk got a 201 for is a `PredictionMade` in the event table.

The three servers run side by side and the loads are interleaved (ours, reference, ceiling at
each connection count), so each ratio compares runs made within a minute of each other on this
noisy machine. Before each measured run the bench waits until every server is idle (each may still
be answering requests wrk abandoned). Every row is run `--rounds` times (default 2) and its best
round is reported: other work on the machine only ever slows a run down.

`--profile` adds one more highest-load run on the service under py-spy (a flame graph and the
top frames, into bench/results/). Exit status: 1 when a run had errors or an acknowledged
prediction is missing from the event table; targets missed are reported, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from db.dsn import with_database  # noqa: E402
from harness.databases import Server  # noqa: E402
from harness.live import LiveService, free_port  # noqa: E402
from projections.read_model import quote_ident  # noqa: E402

DIGITS = REPO / "tests" / "fixtures" / "digits"
LUA = REPO / "bench" / "upload.lua"
BENCHMARKS = REPO / "BENCHMARKS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

TARGETS = {  # DESIGN §6, as ratios from the same run
    "ratio_vs_reference": 60.0,
    "fraction_of_http_ceiling": 0.30,
    "p99_over_mean": 2.0,
    "p99_ms_at_16": 25.0,
    "p50_ms_at_1": 3.0,
    "lag_p99_ms": 250.0,
}


# ---- processes -----------------------------------------------------------------------------


class Target:
    """A server under load: its name, URL and the pid whose CPU we read."""

    def __init__(self, name: str, url: str, pid: int, database: str | None) -> None:
        self.name, self.url, self.pid, self.database = name, url, pid, database


class Subprocess:
    """A bench-only server (reference, HTTP ceiling) on a free port; stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [*argv, "--port", str(self.port)], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} was not ready within {timeout_s} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


# ---- CPU accounting from /proc ---------------------------------------------------------------


def _ticks(stat_path: str) -> int:
    try:
        with open(stat_path) as handle:
            fields = handle.read().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (uvicorn's worker processes when WORKERS > 1)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    pending.extend(int(child) for child in handle.read().split())
        except OSError:
            pass
    return found


def http_processes(pid: int) -> list[int]:
    """The tree without the projection worker that `python -m cli serve` starts as its child."""
    def is_projection_worker(candidate: int) -> bool:
        try:
            with open(f"/proc/{candidate}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            return False
        return b"cli" in argv and b"project" in argv
    return [p for p in process_tree(pid) if not is_projection_worker(p)]


def process_ticks(pid: int) -> tuple[int, int]:
    """(whole process tree, main threads of the HTTP processes) CPU ticks: each of those main
    threads runs an asyncio event loop serving requests."""
    return (sum(_ticks(f"/proc/{p}/stat") for p in process_tree(pid)),
            sum(_ticks(f"/proc/{p}/task/{p}/stat") for p in http_processes(pid)))


def machine_ticks() -> tuple[int, int]:
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def processes_idle(pids: list[int], window_s: float = 0.3, max_share: float = 0.05) -> bool:
    before = [process_ticks(pid)[0] for pid in pids]
    time.sleep(window_s)
    after = [process_ticks(pid)[0] for pid in pids]
    return all((b - a) / CLOCK_TICKS / window_s <= max_share for a, b in zip(before, after))


async def settle(pids: list[int], timeout_s: float = 60.0) -> float:
    """Wait until every server is idle: each may still be answering the requests wrk abandoned
    when its last run ended (the reference takes seconds to drain 64 of them)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await asyncio.to_thread(processes_idle, pids):
            break
    return time.monotonic() - started


async def backend_pids(admin: asyncpg.Connection, database: str) -> list[int]:
    rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", database)
    return [row["pid"] for row in rows]


# ---- /metrics --------------------------------------------------------------------------------

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
    return dict(values)


# ---- one wrk run -----------------------------------------------------------------------------


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


async def wrk(url: str, connections: int, seconds: float, mode: str, manifest: Path, out: Path) -> dict[str, Any]:
    env = {**os.environ, "BENCH_FILES": str(manifest), "BENCH_MODE": mode, "BENCH_OUT": str(out)}
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
        self.manifest = results / "digits.txt"
        files = sorted(DIGITS.glob("*.png"))
        if not files:
            raise SystemExit(f"no digit PNGs in {DIGITS}")
        self.manifest.write_text("".join(f"{path}\n" for path in files))
        self.runs: list[Run] = []
        self.server_pids: list[int] = []  # all servers under test: idle before each measured run

    async def load(self, target: Target, connections: int, mode: str = "multipart", *,
                   lag: LagSampler | None = None, duration: float | None = None,
                   during: Any = None) -> Run:
        duration = duration or self.args.duration
        scratch = self.results / f"wrk-{uuid.uuid4().hex[:8]}.json"
        warm = await wrk(target.url, connections, self.args.warmup, mode, self.manifest, scratch)
        settle_s = await settle(self.server_pids or [target.pid])
        # /metrics is per process: with several workers its deltas would mix processes.
        single = len(http_processes(target.pid)) == 1
        metrics_before = scrape(target.url) if target.name == "ours" and single else {}
        pids = await backend_pids(self.admin, target.database) if target.database else []
        pg_before = {pid: _ticks(f"/proc/{pid}/stat") for pid in pids}
        proc_before, loop_before = process_ticks(target.pid)
        busy_before, total_before = machine_ticks()
        started = time.perf_counter()
        if lag is not None:
            await lag.start()
        extra = asyncio.create_task(during()) if during is not None else None
        data = await wrk(target.url, connections, duration, mode, self.manifest, scratch)
        wall = time.perf_counter() - started
        if extra is not None:
            await extra
        proc_after, loop_after = process_ticks(target.pid)
        busy_after, total_after = machine_ticks()
        pids = await backend_pids(self.admin, target.database) if target.database else []
        pg_ticks = sum(_ticks(f"/proc/{pid}/stat") - pg_before.get(pid, 0) for pid in pids)
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


def inside_numbers(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def mean(name: str) -> float:
        count = delta(f"{name}_count")
        return delta(f"{name}_sum") / count if count else 0.0

    return {
        "batches": delta("inference_batch_size_count"),
        "mean_batch": mean("inference_batch_size"),
        "mean_inference_ms": 1e3 * mean("inference_batch_seconds"),
        "mean_queue_wait_ms": 1e3 * mean("inference_queue_wait_seconds"),
        "commits": delta("event_commit_group_size_count"),
        "mean_commit_group": mean("event_commit_group_size"),
        "mean_commit_ms": 1e3 * mean("event_commit_seconds"),
    }


# ---- projection lag --------------------------------------------------------------------------


class LagSampler:
    """Samples (database clock, checkpoint, head) every `interval_s` on its own connection."""

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
                     (SELECT position FROM projection_checkpoints WHERE name = 'read_model') AS checkpoint,
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
            self.samples.append((row["at"], row["checkpoint"], row["head"]))
            if self._stopping.is_set():
                if deadline is None:  # the load has ended: the last event is the head now
                    self.last_position = row["head"]
                    deadline = time.monotonic() + 30
                if row["checkpoint"] >= self.last_position or time.monotonic() > deadline:
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


# ---- everything else -------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model_name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model_name,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "wrk": wrk_version.strip(),
    }


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


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


def ensure_bench_group() -> None:
    """psycopg comes from the `bench` dependency group; an exact `uv sync` elsewhere (`just test`
    in the same checkout) removes it, so sync it again right before the reference starts."""
    uv = shutil.which("uv")
    if uv is not None:
        subprocess.run([uv, "sync", "--frozen", "--inexact", "--group", "bench", "--quiet"], cwd=REPO, check=True)


def py_spy() -> list[str]:
    found = shutil.which("py-spy")
    if found:
        return [found]
    uv = shutil.which("uv")
    if uv:
        return [uv, "tool", "run", "py-spy"]
    raise SystemExit("--profile needs py-spy (`pip install py-spy`) or uv")


async def profile(bench: Bench, target: Target, connections: int) -> dict[str, Any]:
    """One more run under py-spy: a flame graph, then raw stacks for the top frames."""
    spy = py_spy()
    svg = bench.results / f"profile-{connections}.svg"
    raw = bench.results / f"profile-{connections}.txt"
    window = max(8, int(bench.args.duration))

    async def record() -> None:
        for output, fmt in ((svg, "flamegraph"), (raw, "raw")):
            process = await asyncio.create_subprocess_exec(
                *spy, "record", "--pid", str(target.pid), "--duration", str(window // 2), "--rate", "250",
                "--nonblocking", "--threads", "--subprocesses", "--format", fmt, "--output", str(output),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            await process.wait()

    run = await bench.load(target, connections, duration=window + 2, during=record)
    run.target = "ours (profiled)"
    return {"svg": str(svg), "raw": str(raw), "run": run.summary(), **top_frames(raw)}


def top_frames(raw: Path, limit: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's collapsed stacks, for the event loop thread."""
    if not raw.exists():
        return {"error": "py-spy wrote no samples"}
    threads: collections.Counter[str] = collections.Counter()
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    loop_samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[0].startswith("process "):  # --subprocesses prefixes the process (its command
            while frames and not frames[0].startswith("thread "):  # line may hold a ";")
                frames = frames[1:]
            if not frames:
                continue
        thread = frames[0]
        threads[thread] += count
        if "MainThread" not in thread:
            continue
        loop_samples += count
        self_counts[_short(frames[-1])] += count
        for frame in {_short(frame) for frame in frames[1:]} - _ROOT_FRAMES:
            inclusive[frame] += count
    return {
        "threads": dict(threads.most_common()),
        "loop_samples": loop_samples,
        "self": [(frame, count / loop_samples) for frame, count in self_counts.most_common(limit)] if loop_samples else [],
        "inclusive": [(frame, count / loop_samples) for frame, count in inclusive.most_common(limit)] if loop_samples else [],
    }


_ROOT_FRAMES = {  # the chain every loop sample starts with: says nothing
    "_run_module_as_main (<frozen runpy>)", "_run_code (<frozen runpy>)", "<module> (service/__main__.py)",
    "main (service/__main__.py)", "run (uvicorn/main.py)", "Server.run (uvicorn/server.py)",
    "asyncio_run (uvicorn/_compat.py)", "Runner.run (asyncio/runners.py)",
    "RequestResponseCycle.run_asgi (http/httptools_impl.py)",
    "ProxyHeadersMiddleware.__call__ (middleware/proxy_headers.py)",
    # a worker process of WORKERS > 1
    "<module> (<string>)", "spawn_main (multiprocessing/spawn.py)", "_main (multiprocessing/spawn.py)",
    "BaseProcess._bootstrap (multiprocessing/process.py)", "BaseProcess.run (multiprocessing/process.py)",
    "subprocess_started (uvicorn/_subprocess.py)", "Process.target (supervisors/multiprocess.py)",
}


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    parts = Path(path).parts
    where = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({where})"


# ---- reporting -------------------------------------------------------------------------------


async def lag_summary(sampler: LagSampler) -> dict[str, Any]:
    lags = await sampler.per_event_lag_ms()
    behind = [head - checkpoint for _, checkpoint, head in sampler.samples]
    if not lags:
        return {}
    return {
        "events": len(lags), "samples": len(sampler.samples), "unobserved": sampler.unobserved,
        "p50_ms": percentile(lags, 0.5), "p90_ms": percentile(lags, 0.9), "p99_ms": percentile(lags, 0.99),
        "max_ms": max(lags), "behind_p50": percentile(behind, 0.5), "behind_p99": percentile(behind, 0.99),
        "behind_max": max(behind, default=0),
    }


def best_runs(runs: list[Run]) -> list[Run]:
    """Per target, connection count and body: the round with the most req/s (noise from other
    work on the machine only ever slows a run down), in the order the rows were first run."""
    best: dict[tuple[str, int, str], Run] = {}
    for run in runs:
        key = (run.target, run.connections, run.mode)
        if key not in best or run.rps > best[key].rps:
            best[key] = run
    return list(best.values())


def no_errors(runs: list[Run]) -> tuple[str, str, bool]:
    errors = sum(run.errors + run.warmup_errors for run in runs)
    return ("no errors (non-2xx or socket) in any run, warm-ups included", str(errors), errors == 0)


def find(runs: list[Run], target: str, connections: int, mode: str = "multipart") -> Run | None:
    for run in runs:
        if run.target == target and run.connections == connections and run.mode == mode:
            return run
    return None


def checks(runs: list[Run], lag: dict[str, Any], top: int) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    ours, ref, ceiling = find(runs, "ours", top), find(runs, "reference", top), find(runs, "ceiling", top)
    if ours and ref and ref.rps:
        ratio = ours.rps / ref.rps
        out.append((f"c={top}: ours/reference req/s ≥ {TARGETS['ratio_vs_reference']:g}×", f"{ratio:.0f}×",
                    ratio >= TARGETS["ratio_vs_reference"]))
    if ours and ceiling and ceiling.rps:
        fraction = ours.rps / ceiling.rps
        out.append((f"c={top}: ours ≥ {TARGETS['fraction_of_http_ceiling']:.0%} of the HTTP-stack ceiling",
                    f"{fraction:.0%}", fraction >= TARGETS["fraction_of_http_ceiling"]))
    if ours:
        ratio = ours.latency_ms["p99"] / ours.latency_ms["mean"]
        out.append((f"c={top}: p99 ≤ {TARGETS['p99_over_mean']:g}× mean latency",
                    f"p99 {ours.latency_ms['p99']:.1f} ms = {ratio:.2f}× mean {ours.latency_ms['mean']:.1f} ms",
                    ratio <= TARGETS["p99_over_mean"]))
    if (run := find(runs, "ours", 16)) is not None:
        out.append((f"c=16: p99 ≤ {TARGETS['p99_ms_at_16']:g} ms", f"{run.latency_ms['p99']:.1f} ms",
                    run.latency_ms["p99"] <= TARGETS["p99_ms_at_16"]))
    if (run := find(runs, "ours", 1)) is not None:
        out.append((f"c=1: p50 ≤ {TARGETS['p50_ms_at_1']:g} ms", f"{run.latency_ms['p50']:.2f} ms",
                    run.latency_ms["p50"] <= TARGETS["p50_ms_at_1"]))
    if lag.get("p99_ms") is not None:
        out.append((f"c={top}: projection lag p99 ≤ {TARGETS['lag_p99_ms']:g} ms", f"{lag['p99_ms']:.0f} ms",
                    lag["p99_ms"] <= TARGETS["lag_p99_ms"]))
    out.append(no_errors(runs))
    return out


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def report(result: dict[str, Any]) -> str:
    runs: list[Run] = result["runs"]
    m, top = result["machine"], max(result["connections"])
    lines: list[str] = []
    add = lines.append
    server = result["durability"].get("server_version", "?")
    add(f"Run of {m['date']} at commit `{m['commit']}` on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), "
        f"Linux {m['kernel']}, Python {m['python']}, PostgreSQL {server} ({result['database']}), {m['wrk']}. "
        f"wrk: 1 thread, `--timeout 30s`, {result['warmup']:g} s warm-up then {result['duration']:g} s per row, "
        f"{result['rounds']} round(s); the three servers ran side by side and the rows were interleaved; each row "
        f"reports its best round. The service ran with its defaults (`WORKERS={result['workers']}`). Latencies in ms.")
    add("")
    add("### Headline: the service against the naive reference and the HTTP-stack ceiling")
    add("")
    add("| connections | ours req/s | reference req/s | **ours / reference** | HTTP ceiling req/s | ours / ceiling | "
        "ours / model ceiling at batch = connections |")
    add("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    model_rows = {row["batch"]: row for row in result["model"]["sizes"]}
    for c in result["connections"]:
        ours, ref, ceiling = find(runs, "ours", c), find(runs, "reference", c), find(runs, "ceiling", c)
        if not ours:
            continue
        model_row = model_rows.get(c) or model_rows[max(model_rows)]
        add(f"| {c} | {ours.rps:,.0f} | {ref.rps:,.1f} | **{ours.rps / ref.rps:,.0f}×** | {ceiling.rps:,.0f} | "
            f"{ours.rps / ceiling.rps:.0%} | {ours.rps / model_row['images_per_s']:.0%} "
            f"(of {model_row['images_per_s']:,.0f}/s) |" if ref and ceiling and ref.rps else
            f"| {c} | {ours.rps:,.0f} | – | – | – | – | – |")
    raw_ours, raw_ceiling = find(runs, "ours", top, "raw"), find(runs, "ceiling", top, "raw")
    if raw_ours and raw_ceiling:
        add(f"| {top}, raw body | {raw_ours.rps:,.0f} | – | – | {raw_ceiling.rps:,.0f} | "
            f"{raw_ours.rps / raw_ceiling.rps:.0%} | – |")
    add("")
    add("### Every run")
    add("")
    add("The round in bold is the one reported above and below (the most req/s of its row).")
    add("")
    add("| target | conn. | body | round | req/s | p50 | p90 | p99 | mean | max | 201s | errors |")
    add("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in sorted(result["all_runs"], key=lambda r: (r.mode, r.connections, r.target, r.round)):
        lat = run.latency_ms
        errors = f"{run.non_201} non-2xx, {sum(run.socket_errors.values())} socket"
        mark = "**" if run in runs else ""
        add(f"| {run.target} | {run.connections} | {run.mode} | {mark}{run.round}{mark} | {run.rps:,.1f} | {fmt_ms(lat['p50'])} | "
            f"{fmt_ms(lat['p90'])} | {fmt_ms(lat['p99'])} | {fmt_ms(lat['mean'])} | {fmt_ms(lat['max'])} | "
            f"{run.created:,} | {errors} |")
    add("")
    add("### Targets (DESIGN §6)")
    add("")
    add("| target | measured | |")
    add("| --- | --- | --- |")
    for name, measured, ok in result["checks"]:
        add(f"| {name} | {measured} | {'met' if ok else '**missed**'} |")
    add("")
    add("### Where the CPU went during each run")
    add("")
    add("CPU from /proc (100% = one core; the machine has "
        f"{m['cores']}): the target's processes (with its uvicorn workers and, for the service, its "
        "projection worker process), the main threads of the HTTP processes (the asyncio event loops), "
        "the PostgreSQL "
        "backends of its database, and the whole machine (wrk included). Batch and commit-group sizes "
        "from the service's /metrics.")
    add("")
    add("| target | conn. | body | process CPU | event loop | loop µs/req | PostgreSQL | PG µs/req | machine busy | "
        "mean batch | mean commit group | mean commit ms |")
    add("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        cpu, inside = run.cpu, run.inside
        add(f"| {run.target} | {run.connections} | {run.mode} | {cpu['process_pct']:.0f}% | {cpu['loop_thread_pct']:.0f}% | "
            f"{cpu.get('loop_us_per_request', 0):,.0f} | {cpu['postgres_pct']:.0f}% | "
            f"{cpu.get('postgres_us_per_request', 0):,.0f} | {cpu['machine_busy_pct']:.0f}% | "
            + (f"{inside['mean_batch']:.1f} | {inside['mean_commit_group']:.1f} | {inside['mean_commit_ms']:.2f} |"
               if inside else "– | – | – |"))
    add("")
    add("### Ceilings")
    add("")
    model = result["model"]
    add(f"Model alone (`KerasModel.predict_batch`, the service's serving function, TensorFlow "
        f"{model['tensorflow']}, {model['intra_op_threads']} intra-op thread, {model['model']['device']}):")
    add("")
    add("| batch | ms/call (median) | ms/call (p90) | images/s |")
    add("| ---: | ---: | ---: | ---: |")
    for row in model["sizes"]:
        add(f"| {row['batch']} | {row['median_s'] * 1e3:.3f} | {row['p90_s'] * 1e3:.3f} | {row['images_per_s']:,.0f} |")
    add("")
    add("HTTP stack: bench/http_ceiling_app.py, the same Litestar/uvicorn settings, middleware and body "
        "reading as the service, answering 201 without inference or storage (rows `ceiling` above).")
    add("")
    lag = result["lag"]
    add(f"### Projection lag during the c={top} run")
    add("")
    if lag.get("events"):
        add(f"Per event, over {lag['events']:,} events: p50 {lag['p50_ms']:.0f} ms, p90 {lag['p90_ms']:.0f} ms, "
            f"p99 {lag['p99_ms']:.0f} ms, max {lag['max_ms']:.0f} ms (from `recorded_at`, taken under the append "
            f"lock before COMMIT, to the first 10 ms sample of `projection_checkpoints` that covers the event; "
            f"{lag['samples']:,} samples). Events behind (head − checkpoint) in the samples: "
            f"p50 {lag['behind_p50']:.0f}, p99 {lag['behind_p99']:.0f}, max {lag['behind_max']:.0f}."
            + (f" {lag['unobserved']} events were not projected within 30 s of the end." if lag.get("unobserved") else ""))
    else:
        add("Not measured.")
    add("")
    rebuild = result["rebuild"]
    add("### Rebuild")
    add("")
    if rebuild.get("events_per_s"):
        add(f"`python -m cli rebuild` on the database this run produced: {rebuild['events']:,} events "
            f"rebuilt in {rebuild['build_s']:.2f} s, **{rebuild['events_per_s']:,.0f} events/s** "
            f"({rebuild['wall_s']:.1f} s for the whole command, start-up included).")
    else:
        add(f"`python -m cli rebuild` failed: {rebuild.get('error', rebuild.get('output'))!r}")
    add("")
    d = result["durability"]
    add("### Durability check")
    add("")
    add(f"{d['acknowledged_201']:,} 201s were counted by wrk's `response()` hook (warm-ups included); "
        f"{d['acknowledged_ids_in_table']:,} of their {d['acknowledged_ids']:,} prediction ids are "
        f"`PredictionMade` events; the table holds {d['prediction_made_events']:,} `PredictionMade` "
        f"({d['answered_after_wrk_stopped']} answered after wrk stopped waiting, at most "
        f"{d['in_flight_bound']} could be) and {d['prediction_failed_events']} `PredictionFailed`. "
        f"Server settings as the service's role sees them: "
        + ", ".join(f"`{k}={v}`" for k, v in sorted(d["server_settings"].items()))
        + f" (the append pool sets `synchronous_commit=on` itself). **{'OK' if d['ok'] else 'FAILED'}**.")
    if result.get("profile"):
        p = result["profile"]
        add("")
        add(f"### Profile (py-spy, c={top}, event-loop thread)")
        add("")
        threads = p.get("threads", {})
        total = sum(threads.values()) or 1
        add(f"Flame graph: `{Path(p['svg']).relative_to(REPO)}` (not committed). py-spy samples by thread "
            "(active samples only): " + ", ".join(f"{name.split(': ')[-1]} {count / total:.0%}"
                                                   for name, count in list(threads.items())[:6])
            + f". Share of the event-loop thread's {p.get('loop_samples', 0):,} samples (inclusive, then self):")
        add("")
        add("| frame | inclusive | | frame | self |")
        add("| --- | ---: | --- | --- | ---: |")
        for (inc, inc_share), (own, own_share) in zip(p.get("inclusive", [])[:20], p.get("self", [])[:20]):
            add(f"| `{inc}` | {inc_share:.0%} | | `{own}` | {own_share:.0%} |")
    return "\n".join(lines)


def write_benchmarks(section: str) -> None:
    block = f"{BEGIN}\n{section}\n{END}"
    if BENCHMARKS.exists():
        text = BENCHMARKS.read_text()
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            BENCHMARKS.write_text(head + block + tail)
            return
        BENCHMARKS.write_text(text.rstrip() + "\n\n## Latest run\n\n" + block + "\n")
        return
    BENCHMARKS.write_text("# Benchmarks\n\n`just bench` rewrites the section between the markers.\n\n"
                          "## Latest run\n\n" + block + "\n")


# ---- main ------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (`apt-get install -y wrk`; `just bench` does it)")
    connections = [int(c) for c in args.connections.split(",")]
    top = max(connections)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    results = REPO / "bench" / "results" / stamp
    results.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(f"bench {info['date']} at {info['commit']}: {info['cpu']}, {info['cores']} cores; results in {results}",
          flush=True)

    print("model ceiling (nothing else running)...", flush=True)
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "model_ceiling.py"), "--sizes",
         ",".join(str(size) for size in (1, 2, 4, 8, 16, 32, 64, 128) if size <= max(top, 1))],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=300,
    )
    if done.returncode != 0:
        raise SystemExit(f"model ceiling failed: {done.stderr[-3000:]}")
    model = json.loads(done.stdout.strip().splitlines()[-1])
    for row in model["sizes"]:
        print(f"  batch {row['batch']:>3}: {row['median_s'] * 1e3:7.3f} ms/call, {row['images_per_s']:9,.0f} images/s")

    server = await asyncio.to_thread(Server)
    database_kind = "DATABASE_URL's server" if os.environ.get("DATABASE_URL") else "embedded, throwaway"
    ours_db = None
    reference_name = f"audit_ref_{uuid.uuid4().hex[:10]}"
    services: list[Any] = []
    admin = await asyncpg.connect(server.admin_dsn)
    status = 0
    try:
        await server.make_template()
        ours_db = await server.create()
        await admin.execute(f"CREATE DATABASE {quote_ident(reference_name)}")
        reference_dsn = with_database(server.admin_dsn, reference_name)

        print("starting the service, the reference and the HTTP ceiling...", flush=True)
        ours = LiveService(ours_db.owner_dsn, results / "service.log", LOG_LEVEL="WARNING")
        services.append(ours)
        ensure_bench_group()
        reference = Subprocess("reference", [sys.executable, str(REPO / "bench" / "reference_app.py")],
                               results / "reference.log", {"REFERENCE_DATABASE_URL": reference_dsn})
        services.append(reference)
        ceiling = Subprocess("ceiling", [sys.executable, str(REPO / "bench" / "http_ceiling_app.py")],
                             results / "ceiling.log")
        services.append(ceiling)
        await asyncio.gather(asyncio.to_thread(ours.start, 180.0), asyncio.to_thread(reference.wait_ready),
                             asyncio.to_thread(ceiling.wait_ready))
        assert ours.process is not None
        targets = {
            "ours": Target("ours", ours.url, ours.process.pid, ours_db.name),
            "reference": Target("reference", reference.url, reference.process.pid, reference_name),
            "ceiling": Target("ceiling", ceiling.url, ceiling.process.pid, None),
        }
        bench = Bench(args, results, admin)
        bench.server_pids = [target.pid for target in targets.values()]
        print(f"load: {args.warmup:g} s warm-up + {args.duration:g} s per row, wrk -t1 --timeout 30s", flush=True)
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} of {args.rounds}", flush=True)
            plan = [(name, c, "multipart") for c in connections for name in ("ours", "reference", "ceiling")]
            plan += [("ours", top, "raw"), ("ceiling", top, "raw")]
            for name, c, mode in plan:
                sampler = LagSampler(ours_db.owner_dsn) if (name, c, mode) == ("ours", top, "multipart") else None
                run = await bench.load(targets[name], c, mode, lag=sampler)
                run.round = round_
                if sampler is not None:
                    run.lag = await lag_summary(sampler)
                    print(f"  projection lag: p50 {run.lag.get('p50_ms', float('nan')):.0f} ms, "
                          f"p99 {run.lag.get('p99_ms', float('nan')):.0f} ms over {run.lag.get('events', 0):,} events",
                          flush=True)
        chosen = best_runs(bench.runs)
        top_run = find(chosen, "ours", top)
        lag_result = top_run.lag if top_run else {}

        profile_result = profiled_run = None
        if args.profile:
            print("profiling the service under py-spy...", flush=True)
            profile_result = await profile(bench, targets["ours"], top)
            # Slowed by the sampler: reported with the profile only, but its 201s count below.
            profiled_run = bench.runs.pop()

        for service in services:
            await asyncio.to_thread(service.stop)
        services.clear()

        print("durability check and rebuild...", flush=True)
        durable = await durability(ours_db.owner_dsn, ours_db.app_dsn,
                                   [*bench.runs, *([profiled_run] if args.profile else [])])
        rebuild = await asyncio.to_thread(rebuild_speed, ours_db.owner_dsn)
        result = {
            "machine": info, "database": database_kind, "connections": connections, "warmup": args.warmup,
            "duration": args.duration, "rounds": args.rounds, "model": model,
            "workers": os.environ.get("WORKERS", "1"), "runs": bench.runs, "lag": lag_result,
            "rebuild": rebuild, "durability": durable, "profile": profile_result,
        }
        result["runs"], result["all_runs"] = chosen, bench.runs
        result["checks"] = checks(chosen, lag_result, top)
        result["checks"][-1] = no_errors(bench.runs)
        section = report(result)
        print()
        print(section)
        (results / "result.json").write_text(json.dumps(
            {**result, "runs": [run.summary() for run in chosen], "all_runs": [run.summary() for run in bench.runs]},
            indent=2, default=str))
        if not args.no_write:
            write_benchmarks(section)
            print(f"\nwrote {BENCHMARKS.relative_to(REPO)}; raw results in {results.relative_to(REPO)}")
        errors = sum(run.errors + run.warmup_errors for run in bench.runs if run.target == "ours")
        if not durable["ok"] or errors:
            print("FAILED: errors in the service's runs or acknowledged predictions missing", file=sys.stderr)
            status = 1
    finally:
        for service in services:
            try:
                await asyncio.to_thread(service.stop)
            except Exception as error:  # noqa: BLE001 - keep stopping the others
                print(f"could not stop a server: {error}", file=sys.stderr)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(reference_name)} WITH (FORCE)")
            if ours_db is not None:
                await server.drop(ours_db.name)
        finally:
            await admin.close()
            await server.close()
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default="1,16,64", help="comma-separated wrk connection counts")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up before each run")
    parser.add_argument("--rounds", type=int, default=2, help="times each row is run (the best is reported)")
    parser.add_argument("--profile", action="store_true", help="add a py-spy profile of the highest load")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
