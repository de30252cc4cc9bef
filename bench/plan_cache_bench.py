"""PostgreSQL CPU per upload with and without `plan_cache_mode=force_custom_plan`, as the log grows.

    python bench/plan_cache_bench.py [--rounds 10] [--duration 10] [--grow 10] [--no-analyze-variant]

The service's append pool (db/store.py `append_settings`) and its projection workers
(projections/worker.py `worker_server_settings`) ask for custom plans on every execution. This
runs three copies of the service side by side, each on its own throwaway database that starts
empty, and in every round measures each at one connection (wrk, bench/upload.lua) and then grows
each log with uploads at 16 connections (not measured):

- `custom`: the service as it is (force_custom_plan);
- `auto`: the same code with `plan_cache_mode=auto` on those connections (PostgreSQL's default:
  a generic plan after five custom ones when its cost is no worse), on a server whose
  statistics are never refreshed (autovacuum off, as on the shared server);
- `auto+analyze`: `auto`, and before each measured row every table of its database whose changes
  since the last ANALYZE pass autovacuum's default threshold (50 rows + 10% of the table) is
  analyzed, as autovacuum's autoanalyze would do: fresh statistics invalidate the cached plans,
  which are then made again for the table's current size.

The override is a `sitecustomize` module put first on the service's PYTHONPATH (bench only: it
replaces `plan_cache_mode` in the server settings asyncpg sends at connect; the service's code is
unchanged). Per row: req/s, p50, PostgreSQL CPU µs per upload (the backends of its database, as
`just bench` counts them), and the log's size. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402

from bench.machine import machine  # noqa: E402
from bench.processes import Target  # noqa: E402
from bench.wrk import Bench, wrk  # noqa: E402
from harness.databases import Server  # noqa: E402
from harness.live import LiveService  # noqa: E402

SHIM = '''"""Bench only (bench/plan_cache_bench.py): plan_cache_mode from BENCH_PLAN_CACHE_MODE."""
import os
import sys

import asyncpg.connect_utils as _utils

_MODE = os.environ.get("BENCH_PLAN_CACHE_MODE")
_parse = _utils._parse_connect_arguments


def _parse_connect_arguments(**kwargs):
    settings = kwargs.get("server_settings")
    if _MODE and settings and "plan_cache_mode" in settings:
        kwargs["server_settings"] = {**settings, "plan_cache_mode": _MODE}
        print(f"bench shim: plan_cache_mode={_MODE} for {settings.get('application_name', 'a pool')}",
              file=sys.stderr, flush=True)
    return _parse(**kwargs)


_utils._parse_connect_arguments = _parse_connect_arguments
'''

# autovacuum_analyze_threshold + autovacuum_analyze_scale_factor × reltuples (the defaults)
AUTOANALYZE_DUE = """
    SELECT s.relname FROM pg_stat_user_tables AS s JOIN pg_class AS c ON c.oid = s.relid
    WHERE s.n_mod_since_analyze > 50 + 0.1 * greatest(c.reltuples, 0)
"""


async def autoanalyze(dsn: str) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        due = [row[0] for row in await connection.fetch(AUTOANALYZE_DUE)]
        for table in due:
            await connection.execute(f'ANALYZE "{table}"')
        return due
    finally:
        await connection.close()


async def log_size(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")
    finally:
        await connection.close()


async def main_async(args: argparse.Namespace) -> None:
    results = REPO / "bench" / "results" / f"plan-cache-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    shim = results / "shim"
    shim.mkdir(parents=True)
    (shim / "sitecustomize.py").write_text(SHIM)
    info = machine()
    print(f"{info['date']} at {info['commit']}; results in {results}", flush=True)
    variants = {"custom": {}, "auto": {"BENCH_PLAN_CACHE_MODE": "auto"}}
    if not args.no_analyze_variant:
        variants["auto+analyze"] = {"BENCH_PLAN_CACHE_MODE": "auto"}
    server = await asyncio.to_thread(Server)
    admin = await asyncpg.connect(server.admin_dsn)
    databases, services = {}, {}
    try:
        await server.make_template()
        for name, env in variants.items():
            databases[name] = await server.create()
            services[name] = LiveService(databases[name].owner_dsn, results / f"service-{name}.log",
                                         LOG_LEVEL="WARNING", PYTHONPATH=f"{shim}{os.pathsep}{REPO}", **env)
        await asyncio.gather(*(asyncio.to_thread(service.start, 180.0) for service in services.values()))
        targets = {name: Target(name, service.url, service.process.pid, databases[name].name)  # type: ignore[union-attr]
                   for name, service in services.items()}
        bench = Bench(args, results, admin)
        bench.server_pids = [target.pid for target in targets.values()]
        rows = []
        for round_ in range(1, args.rounds + 1):
            for name, target in targets.items():
                if name == "auto+analyze":
                    started = time.perf_counter()
                    analyzed = await autoanalyze(databases[name].owner_dsn)
                    if analyzed:
                        print(f"  analyzed {', '.join(sorted(analyzed))} in {time.perf_counter() - started:.3f} s",
                              flush=True)
                events = await log_size(databases[name].owner_dsn)
                run = await bench.load(target, 1)
                rows.append((round_, name, events, run))
            if args.grow and round_ < args.rounds:  # all three at once, not measured
                await asyncio.gather(*(wrk(target.url, 16, args.grow, "multipart", bench.manifest,
                                           results / f"grow-{name}.json") for name, target in targets.items()))
        print()
        print("| round | variant | events in the log before the row | req/s | p50 ms | PG µs/upload | "
              "service µs/upload |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for round_, name, events, run in rows:
            print(f"| {round_} | {name} | {events:,} | {run.rps:,.0f} | {run.latency_ms['p50']:.2f} | "
                  f"{run.cpu.get('postgres_us_per_request', 0):,.0f} | {run.cpu.get('process_us_per_request', 0):,.0f} |")
    finally:
        for service in services.values():
            await asyncio.to_thread(service.stop)
        for database in databases.values():
            await server.drop(database.name)
        await admin.close()
        await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured c=1 row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each row")
    parser.add_argument("--grow", type=int, default=10, help="seconds of c=16 uploads after each round (0: none)")
    parser.add_argument("--no-analyze-variant", action="store_true")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
