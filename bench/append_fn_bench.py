"""PostgreSQL CPU of one upload's append (`append_events`, autocommit: the COMMIT and its WAL flush
included), called directly, one at a time, on a log of a given size.

    python bench/append_fn_bench.py [--seed-events 100000] [--calls 500] [--rounds 5]
        [--mode force_custom_plan --mode auto ...] [--sql NAME=FILE ...]

A throwaway database (harness/databases.py) gets a synthetic log by COPY (bench/replay_bench.py's,
never analyzed: the shared server runs with autovacuum off), then the service's role appends
uploads as the group committer does (one request: PredictionRequested + PredictionMade and the
image's blob) through `EventStore.append` on a pool with the service's settings. Each row is
`--calls` appends; the CPU is the backend's own on-CPU time from /proc/<pid>/schedstat
(nanoseconds, robust to a busy machine). Variants alternate row by row:

- `--mode`: the session's plan_cache_mode (what `append_settings` asks for is force_custom_plan);
- `--sql NAME=FILE`: FILE (run by the owner on a database of its own before the bench; e.g. a
  migration's up section) replaces functions; its rows appear under NAME.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import asyncpg  # noqa: E402

from bench.replay_bench import MODEL, synthetic_log  # noqa: E402
from db.store import AppendRequest, Committed, EventStore, append_settings  # noqa: E402
from domain.events import ImageFacts, PredictionMade, PredictionRequested  # noqa: E402
from harness.databases import Server  # noqa: E402
from infra.database import _keep_session  # noqa: E402


def on_cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as handle:
        return int(handle.read().split()[0])


def upload(index: int) -> AppendRequest:
    content = os.urandom(300)
    digest = hashlib.sha256(content).digest()
    requested = PredictionRequested(
        input_id=str(uuid.uuid4()), blob_sha256=digest.hex(), size_bytes=len(content), filename=f"digit-{index}.png",
        content_type="image/png", image=ImageFacts(format="PNG", mode="L", width=28, height=28),
        preprocessing={"height": 28, "width": 28, "channels": 1, "scale": "1/255"},
        tensor_sha256=hashlib.sha256(digest).hexdigest(), model=MODEL,
    )
    output = [0.01] * 9 + [0.91]
    made = PredictionMade(output=output, likely_class=9, model=MODEL, device="/device:CPU:0", batch_size=1,
                          batch_index=0, runtime={"tensorflow": "2.20.0"}, inference_ms=0.6, queue_wait_ms=0.01)
    return AppendRequest(stream_id=uuid.uuid4(), expected_version=0, events=[requested, made],
                         metadata={"request_id": f"req-{index}", "client": "bench"}, blobs={digest: content})


class Variant:
    def __init__(self, name: str, dsn: str, mode: str) -> None:
        self.name, self.dsn, self.mode = name, dsn, mode
        self.rows: list[float] = []

    async def open(self) -> None:
        settings = append_settings(lock_timeout_ms=5000, statement_timeout_ms=30000, idle_timeout_ms=30000)
        settings["plan_cache_mode"] = self.mode
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=1, server_settings=settings,
                                              reset=_keep_session)  # as the service's pool (infra/database.py)
        self.store = EventStore(self.pool)
        async with self.pool.acquire() as connection:
            self.pid = connection.get_server_pid()

    async def row(self, calls: int, start: int) -> float:
        before = on_cpu_ns(self.pid)
        for index in range(start, start + calls):
            [outcome] = await self.store.append([upload(index)])
            assert isinstance(outcome, Committed), outcome
        return (on_cpu_ns(self.pid) - before) / 1000 / calls


async def main_async(args: argparse.Namespace) -> None:
    server = await asyncio.to_thread(Server)
    await server.make_template()
    databases = []
    variants: list[Variant] = []
    try:
        specs = [(mode, mode, None) for mode in args.mode or ["force_custom_plan"]]
        specs += [(name, "force_custom_plan", Path(path)) for name, _, path in (s.partition("=") for s in args.sql)]
        records = synthetic_log(args.seed_events)
        for name, mode, sql in specs:
            database = await server.create()
            databases.append(database)
            owner = await asyncpg.connect(database.owner_dsn)
            try:
                if records:
                    await owner.copy_records_to_table(
                        "events", records=records,
                        columns=["position", "stream_id", "stream_version", "event_type", "schema_version", "data",
                                 "metadata", "recorded_at", "hash"],
                    )
                if sql is not None:
                    text = sql.read_text()
                    await owner.execute(text.split("-- migrate:down")[0])
            finally:
                await owner.close()
            variant = Variant(name, database.app_dsn, mode)
            await variant.open()
            variants.append(variant)
        start = 0
        for variant in variants:  # warm-up: plans, caches
            await variant.row(args.calls // 5, start)
            start += args.calls
        for round_ in range(args.rounds):
            for variant in variants:
                variant.rows.append(await variant.row(args.calls, start))
                start += args.calls
            print(f"round {round_ + 1}: " + ", ".join(f"{v.name} {v.rows[-1]:,.0f}" for v in variants), flush=True)
        print(f"PG CPU µs per upload's append (median of {args.rounds} rows of {args.calls}, log of "
              f"{args.seed_events:,} events + appends): "
              + ", ".join(f"{v.name} {statistics.median(v.rows):,.0f}" for v in variants))
    finally:
        for variant in variants:
            await variant.pool.close()
        for database in databases:
            await server.drop(database.name)
        await server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-events", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", action="append", default=[])
    parser.add_argument("--sql", action="append", default=[], help="NAME=FILE: functions replaced for variant NAME")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
