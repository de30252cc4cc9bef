"""`just bench`: the service end to end under real HTTP load, beside its ceilings and a naive reference.

    python bench/run.py [--duration 12] [--warmup 3] [--rounds 2] [--connections 1,16,64] [--profile]
                        [--workers-compare] [--no-bentoml] [--no-write]

One run, on throwaway databases (DATABASE_URL's server when set, else a private embedded
PostgreSQL in a temporary folder), prints and writes to BENCHMARKS.md (between its
`bench:begin`/`bench:end` markers; the prose around them is kept):

1. `POST /prediction/` with the digit PNGs in tests/fixtures/digits from wrk (bench/upload.lua:
   multipart, rotating through the files; `--timeout 30s`): req/s and p50/p90/p99 at each
   connection count, plus the raw-body form (Content-Type: image/png) at the highest count.
2. The naive reference (bench/reference_app.py: per-request `model.predict`, two commits with
   psycopg) at the same loads, and the ratio ours/reference; and the best peer, the same model
   served by BentoML with adaptive batching and no storage (bench/bentoml_peer/service.py, in its
   own venv bench/.bentoml-venv made on first use; `--no-bentoml` leaves it out), and ours/BentoML.
3. The ceilings: the model alone by batch size (bench/model_ceiling.py) and the HTTP stack on the
   same uploads without inference or storage (bench/http_ceiling_app.py).
4. Projection lag per event during the highest-load run (the projection's tracked position is sampled every 10 ms;
   an event's lag is the first sample whose tracked position covers it minus its `recorded_at`, both
   on the database's clock), and `python -m cli rebuild` on the database the run produced.
5. Durability: every prediction_id wrk got a 201 for is a `PredictionMade` in the event table.

The servers run side by side and the loads are interleaved (ours, reference, BentoML, ceiling at
each connection count), so each ratio compares runs made within a minute of each other on this
noisy machine. Before each measured run the bench waits until every server is idle (each may still
be answering requests wrk abandoned). Every row is run `--rounds` times (default 2) and its best
round is reported: other work on the machine only ever slows a run down.

`--workers-compare` adds the service with WORKERS=2 (its own database) at every load, right after
`ours`, and a table of the two side by side. The resident memory of every server's processes
after the rounds is reported.

`--profile` adds one more highest-load run on the service under py-spy (a flame graph and the
top frames, into bench/results/). Exit status: 1 when a run had errors or an acknowledged
prediction is missing from the event table; targets missed are reported, not fatal.

This file starts the servers and runs the plan; its parts: processes.py (the servers), cpu.py
(CPU from /proc), scrape.py (/metrics), wrk.py (one wrk run, measured), lag.py (projection lag),
machine.py (machine facts), durability.py (durability check, rebuild speed), profiling.py
(py-spy) and report.py (targets, BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402

from bench.durability import durability, rebuild_speed  # noqa: E402
from bench.lag import LagSampler, integration_delay, lag_summary  # noqa: E402
from bench.machine import machine  # noqa: E402
from bench.processes import Subprocess, Target, ensure_bench_group, rss  # noqa: E402
from bench.profiling import profile  # noqa: E402
from bench.bentoml_peer.venv import ensure_venv  # noqa: E402
from bench.report import BENCHMARKS, best_runs, checks, find, no_errors, report, write_benchmarks  # noqa: E402
from bench.wrk import Bench  # noqa: E402
from db.dsn import with_database  # noqa: E402
from harness.databases import Server  # noqa: E402
from harness.live import LiveService  # noqa: E402
from projections.read_model import quote_ident  # noqa: E402


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
    ours_db = notree_db = workers_db = None
    reference_name = f"audit_ref_{uuid.uuid4().hex[:10]}"
    services: list[Any] = []
    admin = await asyncpg.connect(server.admin_dsn)
    status = 0
    try:
        await server.make_template()
        ours_db = await server.create()
        notree_db = await server.create()
        if args.workers_compare:
            workers_db = await server.create()
        await admin.execute(f"CREATE DATABASE {quote_ident(reference_name)}")
        reference_dsn = with_database(server.admin_dsn, reference_name)

        print("starting the service, the reference and the HTTP ceiling...", flush=True)
        ours = LiveService(ours_db.owner_dsn, results / "service.log", LOG_LEVEL="WARNING")
        services.append(ours)
        # The same service without the tree integrator, on its own database: what the
        # transparency log costs the upload path, measured in the same rounds.
        notree = LiveService(notree_db.owner_dsn, results / "service-no-tree.log", LOG_LEVEL="WARNING",
                             TREE_INTEGRATOR="off")
        services.append(notree)
        # `--workers-compare`: the same service with WORKERS=2 on its own database, right after
        # `ours` at each load (its /metrics are per process, so no batch or stage numbers).
        two = None
        if workers_db is not None:
            two = LiveService(workers_db.owner_dsn, results / "service-2-workers.log", LOG_LEVEL="WARNING",
                              WORKERS="2")
            services.append(two)
        ensure_bench_group()
        reference = Subprocess("reference", [sys.executable, str(REPO / "bench" / "reference_app.py")],
                               results / "reference.log", {"REFERENCE_DATABASE_URL": reference_dsn})
        services.append(reference)
        ceiling = Subprocess("ceiling", [sys.executable, str(REPO / "bench" / "http_ceiling_app.py")],
                             results / "ceiling.log")
        services.append(ceiling)
        peer = None
        if not args.no_bentoml:
            bentoml = await asyncio.to_thread(ensure_venv)
            peer = Subprocess("bentoml", [str(bentoml), "serve", "service:MnistPeer", "--working-dir",
                                          str(REPO / "bench" / "bentoml_peer"), "--host", "127.0.0.1"],
                              results / "bentoml.log",
                              {"PYTHONPATH": "", "BENTOML_HOME": str(results / "bentoml-home"),
                               "BENTOML_DO_NOT_TRACK": "true"}, health_path="/readyz")
            services.append(peer)
        await asyncio.gather(asyncio.to_thread(ours.start, 180.0), asyncio.to_thread(notree.start, 180.0),
                             asyncio.to_thread(reference.wait_ready), asyncio.to_thread(ceiling.wait_ready),
                             *([asyncio.to_thread(peer.wait_ready)] if peer else []),
                             *([asyncio.to_thread(two.start, 180.0)] if two else []))
        assert ours.process is not None and notree.process is not None
        targets = {
            "ours": Target("ours", ours.url, ours.process.pid, ours_db.name),
            "reference": Target("reference", reference.url, reference.process.pid, reference_name),
            "ceiling": Target("ceiling", ceiling.url, ceiling.process.pid, None),
            "no-tree": Target("no-tree", notree.url, notree.process.pid, notree_db.name),
        }
        if two is not None:
            assert two.process is not None
            targets["workers-2"] = Target("workers-2", two.url, two.process.pid, workers_db.name)
        if peer is not None:
            targets["bentoml"] = Target("bentoml", peer.url, peer.process.pid, None, ok_status=200)
        bench = Bench(args, results, admin)
        bench.server_pids = [target.pid for target in targets.values()]
        print(f"load: {args.warmup:g} s warm-up + {args.duration:g} s per row, wrk -t1 --timeout 30s", flush=True)
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} of {args.rounds}", flush=True)
            plan = [(name, c, "multipart") for c in connections
                    for name in ("ours", *(("workers-2",) if two else ()), *(("no-tree",) if c == top else ()),
                                 "reference",
                                 *(("bentoml",) if peer else ()), "ceiling")]
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
        # Resident memory of every server's processes after all the rounds (TensorFlow's arenas
        # grown by the largest batches included).
        memory = {name: rss(target.pid) for name, target in targets.items()}
        chosen = best_runs(bench.runs)
        top_run = find(chosen, "ours", top)
        lag_result = top_run.lag if top_run else {}
        tlog_result = await integration_delay(ours_db.owner_dsn, top_run.prediction_ids if top_run else [])

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
            "rebuild": rebuild, "durability": durable, "memory": memory, "profile": profile_result, "tlog": tlog_result,
        }
        result["runs"], result["all_runs"] = chosen, bench.runs
        result["checks"] = checks(chosen, lag_result, top, tlog_result)
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
            for database in (ours_db, notree_db, workers_db):
                if database is not None:
                    await server.drop(database.name)
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
    parser.add_argument("--workers-compare", action="store_true",
                        help="also run the service with WORKERS=2 (own database) at every load, right after ours")
    parser.add_argument("--no-bentoml", action="store_true", help="leave out the BentoML peer")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
