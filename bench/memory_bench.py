"""`just bench-memory`: does the service's memory stay flat over 100,000 uploads?

    python bench/memory_bench.py [--uploads 100000] [--baseline 10000] [--every 10000]
                                 [--connections 16] [--no-write]

Starts the service (`python -m cli serve`, its defaults: the projection worker as a child process,
the tree integrator on) on a throwaway database (DATABASE_URL's server when set, else a private
embedded PostgreSQL), then sends uploads with wrk (bench/upload.lua, the digit PNGs as multipart,
`--connections` connections) in segments sized to end at every `--every` uploads. After each
segment, once the service is idle, it reads the resident memory (VmRSS) of every process of the
service. The target (issue 15): the RSS of all the service's processes after `--uploads` within 5%
of their RSS after the first `--baseline` (the first uploads grow TensorFlow's arenas and the
caches, which is why the baseline is not zero). The result goes into BENCHMARKS.md between its
`memory:begin`/`memory:end` markers. Exit status 1 on errors (non-201 or socket) only; growth
beyond the target is reported, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cpu import settle  # noqa: E402
from bench.machine import machine  # noqa: E402
from bench.processes import rss  # noqa: E402
from bench.report import write_marked_section  # noqa: E402
from bench.wrk import digits_manifest, wrk  # noqa: E402
from harness.databases import Server  # noqa: E402
from harness.live import LiveService  # noqa: E402

TARGET_GROWTH = 0.05


def sample(pid: int, uploads: int, seconds: float) -> dict[str, Any]:
    rows = rss(pid)
    return {"uploads": uploads, "elapsed_s": seconds, "processes": rows,
            "total_mib": sum(float(row["rss_mib"]) for row in rows)}  # type: ignore[arg-type]


async def measure(args: argparse.Namespace, results: Path) -> dict[str, Any]:
    server = await asyncio.to_thread(Server)
    database = None
    service = None
    try:
        await server.make_template()
        database = await server.create()
        service = LiveService(database.owner_dsn, results / "service.log", LOG_LEVEL="WARNING")
        await asyncio.to_thread(service.start, 180.0)
        assert service.process is not None
        pid = service.process.pid
        manifest = digits_manifest(results)
        checkpoints = sorted({*range(args.every, args.uploads + 1, args.every), args.baseline, args.uploads})
        samples = [sample(pid, 0, 0.0)]
        print(f"service ready: {samples[0]['total_mib']:,.0f} MiB in {len(samples[0]['processes'])} processes",
              flush=True)
        done = errors = 0
        rate = float("inf")  # the first segment (1 s) measures it
        started = time.monotonic()
        for checkpoint in checkpoints:
            if done >= checkpoint and samples[-1]["uploads"] == done:
                continue  # a segment overshot this checkpoint too: already sampled
            while done < checkpoint:
                seconds = max(1, round((checkpoint - done) / rate))  # wrk takes whole seconds
                data = await wrk(service.url, args.connections, seconds, "multipart", manifest,
                                 results / "wrk.json")
                done += data["created"]
                errors += data["non_201"] + sum(data["errors"].values())
                rate = max(1.0, data["requests"] / (data["duration_us"] / 1e6))
            await settle([pid])
            row = sample(pid, done, time.monotonic() - started)
            samples.append(row)
            print(f"  {done:>8,} uploads ({rate:,.0f}/s): " + ", ".join(
                f"{p['role'].split(' (')[0]} {p['rss_mib']:,.0f}" for p in row["processes"])
                + f" = {row['total_mib']:,.0f} MiB", flush=True)
        return {"samples": samples, "errors": errors, "connections": args.connections,
                "baseline": args.baseline, "uploads": args.uploads}
    finally:
        if service is not None:
            await asyncio.to_thread(service.stop)
        if database is not None:
            await server.drop(database.name)
        await server.close()


def at(samples: list[dict[str, Any]], uploads: int) -> dict[str, Any]:
    """The first sample taken at or after `uploads`."""
    return next(row for row in samples if row["uploads"] >= uploads)


def report(result: dict[str, Any], info: dict[str, Any]) -> tuple[str, bool]:
    samples = result["samples"]
    base, last = at(samples, result["baseline"]), samples[-1]
    growth = last["total_mib"] / base["total_mib"] - 1
    ok = growth <= TARGET_GROWTH
    roles = [str(row["role"]) for row in base["processes"]]
    lines = [
        f"Run of {info['date']} at commit `{info['commit']}` on {info['cpu']} ({info['cores']} cores): the service "
        f"with its defaults on a throwaway database, {result['uploads']:,} uploads from wrk (bench/upload.lua, "
        f"multipart digit PNGs, {result['connections']} connections) in segments, the resident memory (VmRSS) of "
        f"each of its processes read after each segment once the service was idle. {result['errors']} errors.",
        "",
        f"**RSS of all the service's processes: {base['total_mib']:,.0f} MiB after {base['uploads']:,} uploads, "
        f"{last['total_mib']:,.0f} MiB after {last['uploads']:,} ({growth:+.1%}); target ≤ "
        f"{TARGET_GROWTH:+.0%}: {'met' if ok else '**missed**'}.**",
        "",
        "| uploads | minutes | " + " | ".join(f"{role.split(' (')[0]} MiB" for role in roles) + " | all MiB | vs baseline |",
        "| ---: | ---: | " + " | ".join("---:" for _ in roles) + " | ---: | ---: |",
    ]
    for row in samples:
        by_role = {str(p["role"]): float(p["rss_mib"]) for p in row["processes"]}  # type: ignore[arg-type]
        cells = " | ".join(f"{by_role[role]:,.1f}" if role in by_role else "–" for role in roles)
        lines.append(f"| {row['uploads']:,} | {row['elapsed_s'] / 60:.1f} | {cells} | {row['total_mib']:,.1f} | "
                     f"{row['total_mib'] / base['total_mib'] - 1:+.1%} |")
    return "\n".join(lines), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=100_000, help="uploads in all")
    parser.add_argument("--baseline", type=int, default=10_000, help="uploads before the baseline sample")
    parser.add_argument("--every", type=int, default=10_000, help="uploads between samples")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    results = REPO / "bench" / "results" / f"memory-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    results.mkdir(parents=True, exist_ok=True)
    info = machine()
    result = asyncio.run(measure(args, results))
    section, _ok = report(result, info)
    print()
    print(section)
    if not args.no_write:
        write_marked_section("memory", section, "Memory over 100,000 uploads")
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
