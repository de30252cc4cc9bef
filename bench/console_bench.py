"""The audit console on a large log: how long its pages take with a million predictions.

    python bench/console_bench.py [--predictions 1000000] [--requests 200]

On DATABASE_URL's server when set, otherwise a private embedded PostgreSQL. Loads a synthetic log
(bench/replay_bench.py's: one stream per prediction, 10 classes, one in 20 failed) with COPY,
registers its model, labels a tenth of the predictions, projects the read tables, starts the service on it (`python -m cli serve`, the tree
integrator off so it does not integrate the loaded log while pages are timed), and times each page
with sequential requests over loopback: the latency includes the client and the loopback, so the
server's share is at most this (`/health/live` gives the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from db.group_commit import GroupCommitter  # noqa: E402
from db.store import AppendRequest, EventStore  # noqa: E402
from domain.events import ModelRegistered  # noqa: E402
from domain.streams import model_stream_id  # noqa: E402
from harness.live import LiveService  # noqa: E402
from projections.worker import ProjectionRunner  # noqa: E402
from replay_bench import MODEL, run_on_a_server, synthetic_log, throwaway_database  # noqa: E402
from usecases.labels import LabelService  # noqa: E402

COLUMNS = ["position", "stream_id", "stream_version", "event_type", "schema_version", "data", "metadata",
           "recorded_at", "hash"]
TARGET_MS = 20.0  # the predictions page, 50 rows, p50


def pages(middle_position: int) -> list[tuple[str, str]]:
    return [
        ("floor: GET /health/live", "/health/live"),
        ("predictions, 50 rows (the first page)", "/ui/predictions"),
        ("predictions, a page deep in the log (cursor)", f"/ui/predictions?cursor={middle_position}"),
        ("predictions, class = 3", "/ui/predictions?class=3"),
        ("predictions, confidence below 0.5", "/ui/predictions?below=0.5"),
        ("predictions, labelled = no", "/ui/predictions?labelled=no"),
        ("the live rows (htmx, every 2 s)", "/ui/rows"),
        ("the counts above the table, no filter", "/ui/counts"),
        ("the counts, class = 3", "/ui/counts?class=3"),
        ("one prediction", "{prediction}"),
        ("the log", "/ui/log"),
        ("the event feed, latest 50", "/ui/log/events"),
        ("the event feed, PredictionFailed only", "/ui/log/events?type=PredictionFailed&after=0"),
        ("the overview", "/ui/"),
        ("the models", "/ui/models"),
        ("the model's page (quality, charts, latency)", f"/ui/models/{MODEL.sha256}"),
        ("API: GET /models/", "/models/"),
        ("API: GET /models/{sha}/quality", f"/models/{MODEL.sha256}/quality"),
    ]


def timed(client: httpx.Client, path: str, requests: int) -> list[float]:
    for _ in range(5):
        assert client.get(path).status_code == 200, path
    samples = []
    for _ in range(requests):
        started = time.perf_counter()
        answer = client.get(path)
        samples.append((time.perf_counter() - started) * 1000)
        assert answer.status_code == 200, (path, answer.status_code)
    return samples


async def bench(admin_dsn: str, predictions: int, requests: int) -> None:
    async with throwaway_database(admin_dsn, "audit_console") as (_, owner_dsn, app_dsn):
        started = time.perf_counter()
        connection = await asyncpg.connect(owner_dsn)
        try:
            await connection.copy_records_to_table("events", records=synthetic_log(2 * predictions), columns=COLUMNS)
            await connection.execute("ANALYZE events")
            count = await connection.fetchval("SELECT count(*) FROM events")
        finally:
            await connection.close()
        print(f"log: {count:,} events loaded with COPY in {time.perf_counter() - started:.1f} s")
        pool = await asyncpg.create_pool(app_dsn, min_size=1, max_size=4)
        store = EventStore(pool)
        registered = ModelRegistered(model=MODEL, size_bytes=1, input_shape=[28, 28, 1], output_kind="vector",
                                     num_classes=10, runtime={})
        await store.append([AppendRequest(stream_id=model_stream_id(MODEL.sha256), expected_version=0,
                                          events=[registered])])
        # A labelled tenth, as a team labels a sample: the model page has accuracy, the filters work.
        sample = [row["stream_id"] for row in await pool.fetch(
            "SELECT stream_id FROM events WHERE event_type = 'PredictionMade' AND position % 10 = 0")]
        committer = GroupCommitter(store)
        committer.start()
        labels = LabelService(store, committer)
        started = time.perf_counter()
        for at in range(0, len(sample), 10_000):
            await labels.record_many([{"prediction_id": str(stream), "label": (i * 7) % 10, "source": "bench"}
                                      for i, stream in enumerate(sample[at:at + 10_000])], metadata={})
        await committer.close()
        head = await pool.fetchval("SELECT max(position) FROM events")
        print(f"{len(sample):,} labels recorded in {time.perf_counter() - started:.1f} s")

        caught_up = asyncio.Event()
        runner = ProjectionRunner(app_dsn, batch_size=5000, poll_interval_s=0.5,
                                  on_applied=lambda position, _n: position >= head and caught_up.set())
        started = time.perf_counter()
        await runner.start()
        await asyncio.wait_for(caught_up.wait(), 3600)
        await runner.stop()
        await pool.close()
        print(f"read tables projected in {time.perf_counter() - started:.1f} s")
        connection = await asyncpg.connect(owner_dsn)
        try:
            await connection.execute("ANALYZE")
            made = await connection.fetchval("SELECT count(*) FROM predictions")
            middle = await connection.fetchval("SELECT position FROM predictions ORDER BY position OFFSET $1 LIMIT 1",
                                               made // 2)
            one = await connection.fetchval("SELECT prediction_id FROM predictions ORDER BY position DESC LIMIT 1")
        finally:
            await connection.close()
        print(f"{made:,} predictions in the read tables")

        with tempfile.TemporaryDirectory() as folder:
            service = LiveService(owner_dsn, Path(folder) / "service.log", TREE_INTEGRATOR="off")
            service.start(ready_timeout_s=300)
            try:
                with httpx.Client(base_url=service.url, timeout=60) as client:
                    print(f"\n| page ({made:,} predictions; {requests} sequential requests) | p50 ms | p90 ms | p99 ms |")
                    print("| --- | ---: | ---: | ---: |")
                    for name, path in pages(middle):
                        samples = timed(client, path.format(prediction=f"/ui/prediction/{one}"), requests)
                        cuts = statistics.quantiles(samples, n=100)
                        print(f"| {name} | {statistics.median(samples):.1f} | {cuts[89]:.1f} | {cuts[98]:.1f} |")
            finally:
                service.stop()
        print(f"\ntarget: the predictions page (50 rows) p50 <= {TARGET_MS:.0f} ms of server time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    run_on_a_server(lambda admin_dsn: bench(admin_dsn, args.predictions, args.requests))


if __name__ == "__main__":
    main()
