"""CPU accounting from /proc: a process tree, its event-loop threads, PostgreSQL backends, the machine."""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def ticks(stat_path: str) -> int:
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
    return (sum(ticks(f"/proc/{p}/stat") for p in process_tree(pid)),
            sum(ticks(f"/proc/{p}/task/{p}/stat") for p in http_processes(pid)))


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
