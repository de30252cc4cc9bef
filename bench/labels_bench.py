"""Ground truth at scale: bulk label ingestion and model-quality answers on a large log.

    python bench/labels_bench.py [--events 1000000] [--request-items 10000] [--labels 200000]

On DATABASE_URL's server when set, otherwise a private embedded PostgreSQL. Loads a synthetic log
(bench/replay_bench.py's: one stream per prediction, 10 classes, one in 20 failed) with COPY,
registers its model, lets the projection worker catch up, then times:
- bulk ingestion: `LabelService.record_many` with requests of `--request-items` items (the path
  POST /labels runs, without HTTP), labels/s;
- the current quality (from the kept quality cells) and the quality as of an earlier position
  (aggregated from the predictions and the label history): median and max of several calls.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from db.group_commit import GroupCommitter  # noqa: E402
from db.store import AppendRequest, EventStore  # noqa: E402
from domain.events import ModelRegistered  # noqa: E402
from domain.streams import model_stream_id  # noqa: E402
from projections import quality  # noqa: E402
from projections.worker import ProjectionRunner  # noqa: E402
from replay_bench import MODEL, run_on_a_server, synthetic_log, throwaway_database  # noqa: E402
from usecases.labels import LabelService  # noqa: E402

ALL_TIME = (datetime(1, 1, 1, tzinfo=timezone.utc), datetime(9999, 12, 31, tzinfo=timezone.utc))


async def caught_up(runner_done: asyncio.Event, timeout_s: float = 900) -> None:
    await asyncio.wait_for(runner_done.wait(), timeout_s)


async def bench(admin_dsn: str, events: int, request_items: int, labels: int) -> None:
    async with throwaway_database(admin_dsn, "audit_labels") as (_, owner_dsn, app_dsn):
        records = synthetic_log(events)
        connection = await asyncpg.connect(owner_dsn)
        try:
            await connection.copy_records_to_table("events", records=records, columns=[
                "position", "stream_id", "stream_version", "event_type", "schema_version", "data", "metadata",
                "recorded_at", "hash"])
            await connection.execute("ANALYZE events")
        finally:
            await connection.close()
        made = [record[1] for record in records if record[3] == "PredictionMade"]
        print(f"log: {len(records):,} events ({len(made):,} made predictions) loaded with COPY")

        pool = await asyncpg.create_pool(app_dsn, min_size=2, max_size=4)
        store = EventStore(pool)
        registered = ModelRegistered(model=MODEL, size_bytes=1, input_shape=[28, 28, 1], output_kind="vector",
                                     num_classes=10, runtime={})
        (outcome,) = await store.append([AppendRequest(stream_id=model_stream_id(MODEL.sha256), expected_version=0,
                                                       events=[registered])])
        head = outcome.head_position  # type: ignore[union-attr]
        done = asyncio.Event()
        target = {"position": head}

        def on_applied(position: int, _count: int) -> None:
            if position >= target["position"]:
                done.set()

        runner = ProjectionRunner(app_dsn, batch_size=5000, on_applied=on_applied, poll_interval_s=0.2)
        started = time.perf_counter()
        await runner.start()
        await caught_up(done)
        print(f"projection caught up from 0 in {time.perf_counter() - started:.1f} s")

        committer = GroupCommitter(store)
        committer.start()
        service = LabelService(store, committer)
        wanted = made[:labels]
        requests = [[{"prediction_id": str(stream), "label": (start + i) * 7 % 10, "source": "bench"}
                     for i, stream in enumerate(wanted[start:start + request_items])]
                    for start in range(0, len(wanted), request_items)]
        first = await service.record_many(requests.pop(0), metadata={})
        before = first.batch.position  # an as_of early in the labelling: most of the history is after it
        # One client waiting for each answer, then two requests in flight (as `just labels-import`
        # sends them): the service checks one while it commits the other.
        for in_flight, share in ((1, len(requests) // 3), (2, len(requests) - len(requests) // 3)):
            mine, rates = requests[:share], []
            del requests[:share]

            async def client(queue: list[list[dict]]) -> None:
                while queue:
                    chunk = queue.pop(0)
                    began = time.perf_counter()
                    result = await service.record_many(chunk, metadata={})
                    assert all(item.stream_version is not None for item in result.items)
                    rates.append(len(chunk) / (time.perf_counter() - began))

            total = sum(len(chunk) for chunk in mine)
            began = time.perf_counter()
            await asyncio.gather(*(client(mine) for _ in range(in_flight)))
            print(f"bulk labels, {in_flight} request(s) in flight: {total:,} in requests of {request_items:,}: "
                  f"{total / (time.perf_counter() - began):,.0f} labels/s (one request alone: median "
                  f"{statistics.median(rates):,.0f} labels/s)")
        await committer.close()

        last = await pool.fetchval("SELECT max(position) FROM events")
        done.clear()
        target["position"] = last
        await caught_up(done)
        owner = await asyncpg.connect(owner_dsn)
        try:  # what autovacuum does within a minute of such a load; without it the planner, still
            # believing the tables empty, joins the label history by a lookup per prediction
            await owner.execute("ANALYZE predictions; ANALYZE labels")
        finally:
            await owner.close()

        async with pool.acquire() as connection:
            for label, current, position in (("current (kept cells)", True, last), ("as_of (aggregated)", False, before)):
                timings = []
                for _ in range(5):
                    began = time.perf_counter()  # what GET /models/{sha}/quality asks the database
                    (entry,) = await quality.models(connection, MODEL.sha256)
                    buckets = await quality.bucket_counts(connection, MODEL.sha256, 10, position=position,
                                                          current=current, since=ALL_TIME[0], until=ALL_TIME[1],
                                                          bucket="day")
                    quality.total(buckets, 10)
                    day = entry.first_day()
                    assert day is not None
                    await quality.bucket_counts(connection, MODEL.sha256, 10, position=position, current=current,
                                                since=day, until=day + timedelta(days=1), bucket="day")
                    timings.append(time.perf_counter() - began)
                print(f"quality {label}: median {statistics.median(timings) * 1000:,.1f} ms "
                      f"(max {max(timings) * 1000:,.1f} ms) over {len(made):,} predictions")
        await runner.stop()
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--request-items", type=int, default=10_000)
    parser.add_argument("--labels", type=int, default=200_000)
    args = parser.parse_args()
    run_on_a_server(lambda admin_dsn: bench(admin_dsn, args.events, args.request_items, args.labels))


if __name__ == "__main__":
    main()
