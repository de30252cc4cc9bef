"""PostgreSQL CPU per upload at one connection, by backend role: the request's append pool, the
projection worker, the tree integrator (and checkpoint signer), anything else.

    python bench/c1_roles.py [--seconds 8] [--warmup 300] [--rounds 3] [--variant NAME=ENV=VALUE ...] [--sql NAME=FILE ...] [--root NAME=DIR ...]

Starts the service (harness/live.py) on a throwaway database (harness/databases.py), sends uploads
at one connection with wrk and bench/upload.lua (the digit PNGs, multipart; warm-up from Python),
and reads every backend's on-CPU time of that database from /proc/<pid>/schedstat (nanoseconds,
so robust to a busy machine) before and after each measured run. Backends are told apart by
`application_name` (the followers name themselves `projection:<name>`; the service's pool has
none). Prints, per round: µs of PostgreSQL CPU per upload by role, the service processes' CPU per
upload (all threads, the projection process too), and wrk's p50/mean latency (wall clock: run it
under `flock /work/bench.lock`).

`--variant` runs a second service with extra environment (e.g. a sitecustomize on PYTHONPATH),
`--sql` one whose database first runs a SQL file as its owner (e.g. an earlier function body),
`--root` one that runs from another checkout of the code (e.g. the commit before a change);
rows alternate between the services, each round measures every variant once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402
import httpx  # noqa: E402

from bench.cpu import process_tree  # noqa: E402
from bench.wrk import digits_manifest, wrk  # noqa: E402
from harness import live  # noqa: E402
from harness.databases import Server  # noqa: E402
from harness.live import LiveService  # noqa: E402

DIGITS = REPO / "tests" / "fixtures" / "digits"


def on_cpu_ns(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/schedstat") as handle:
            return int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def tree_cpu_ns(pid: int) -> int:
    total = 0
    for process in process_tree(pid):
        try:
            for task in os.listdir(f"/proc/{process}/task"):
                with open(f"/proc/{process}/task/{task}/schedstat") as handle:
                    total += int(handle.read().split()[0])
        except (OSError, ValueError):
            pass
    return total


def role_of(application_name: str) -> str:
    if application_name.startswith("projection:"):
        return application_name.removeprefix("projection:").partition("@")[0]
    return application_name or "service pool"


async def backends(admin: asyncpg.Connection, database: str) -> dict[int, str]:
    rows = await admin.fetch(
        "SELECT pid, application_name FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", database
    )
    return {row["pid"]: role_of(row["application_name"]) for row in rows}


def upload_loop(url: str, files: list[tuple[str, bytes]], count: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(count):
            name, data = files[i % len(files)]
            started = time.perf_counter()
            response = client.post("/prediction/", files={"file": (name, data, "image/png")})
            latencies.append(time.perf_counter() - started)
            if response.status_code != 201:
                raise RuntimeError(f"upload answered {response.status_code}: {response.text[:300]}")
    return latencies


async def measure(admin: asyncpg.Connection, database: str, service: LiveService, manifest: Path,
                  seconds: float) -> dict[str, float]:
    roles = await backends(admin, database)
    before = {pid: on_cpu_ns(pid) for pid in roles}
    process_before = tree_cpu_ns(service.process.pid)  # type: ignore[union-attr]
    data = await wrk(service.url, 1, seconds, "multipart", manifest, manifest.parent / f"c1-roles-{database}.json")
    uploads = data["created"]
    if data["non_201"] or not uploads:
        raise RuntimeError(f"wrk: {data['non_201']} answers other than 201 of {data['requests']}")
    await asyncio.sleep(1.2)  # the followers' last wake-ups and the last checkpoint
    process_after = tree_cpu_ns(service.process.pid)  # type: ignore[union-attr]
    roles.update(await backends(admin, database))
    by_role: dict[str, float] = {}
    for pid, role in roles.items():
        after = on_cpu_ns(pid)
        if after is None:
            continue
        start = before.get(pid)
        spent = after - (start if start is not None else 0)  # a backend that started meanwhile: all of it
        by_role[role] = by_role.get(role, 0.0) + spent / 1000 / uploads
    by_role["PG total"] = sum(by_role.values())
    by_role["service processes"] = (process_after - process_before) / 1000 / uploads
    by_role["p50 ms"] = data["latency_us"]["percentiles"]["50"] / 1000
    by_role["mean ms"] = data["latency_us"]["mean"] / 1000
    by_role["uploads"] = uploads
    return by_role


async def main_async(args: argparse.Namespace) -> None:
    files = [(path.name, path.read_bytes()) for path in sorted(DIGITS.glob("*.png"))]
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    manifest = digits_manifest(logs)
    variants: dict[str, dict[str, str]] = {"base": {}}
    for spec in args.variant:
        name, _, assignment = spec.partition("=")
        key, _, value = assignment.partition("=")
        variants.setdefault(name, {})[key] = value
    sql = {name: Path(path) for name, _, path in (spec.partition("=") for spec in args.sql)}
    roots = {name: Path(path).resolve() for name, _, path in (spec.partition("=") for spec in args.root)}
    for name in [*sql, *roots]:
        variants.setdefault(name, {})
    server = await asyncio.to_thread(Server)
    admin = await asyncpg.connect(server.admin_dsn)
    databases, services = {}, {}
    try:
        await server.make_template()
        for name, env in variants.items():
            databases[name] = await server.create()
            if name in sql:  # the up section, as the owner
                owner = await asyncpg.connect(databases[name].owner_dsn)
                try:
                    await owner.execute(sql[name].read_text().split("-- migrate:down")[0])
                finally:
                    await owner.close()
            services[name] = LiveService(databases[name].owner_dsn, logs / f"c1-roles-{name}.log",
                                         LOG_LEVEL="WARNING", **env)
        for name, service in services.items():  # one at a time: a variant may run another checkout
            root = roots.get(name)
            if root is not None:
                service.env["PYTHONPATH"] = str(root)
            live.ROOT = root or REPO
            service.launch()
        live.ROOT = REPO
        await asyncio.gather(*(asyncio.to_thread(service.wait_ready, 180.0) for service in services.values()))
        for service in services.values():
            await asyncio.to_thread(upload_loop, service.url, files, args.warmup)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for round_ in range(1, args.rounds + 1):
            for name, service in services.items():
                row = await measure(admin, databases[name].name, service, manifest, args.seconds)
                results[name].append(row)
                print(f"round {round_} {name}: " + ", ".join(f"{k} {v:,.1f}" for k, v in sorted(row.items())),
                      flush=True)
        print()
        for name, rows in results.items():
            keys = sorted({k for row in rows for k in row})
            print(f"{name} (median of {len(rows)} rounds of {args.seconds:g} s): "
                  + ", ".join(f"{k} {statistics.median(row.get(k, 0.0) for row in rows):,.1f}" for k in keys))
    finally:
        for service in services.values():
            await asyncio.to_thread(service.stop)
        for database in databases.values():
            await server.drop(database.name)
        await admin.close()
        await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of uploads at one connection per row")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", action="append", default=[], help="NAME=ENV=VALUE (repeatable)")
    parser.add_argument("--sql", action="append", default=[],
                        help="NAME=FILE: a variant whose database runs FILE (up to '-- migrate:down') first")
    parser.add_argument("--root", action="append", default=[],
                        help="NAME=DIR: a variant whose service runs from another checkout (e.g. a `git worktree`)")
    parser.add_argument("--logs", default=str(REPO / "bench" / "results"))
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
