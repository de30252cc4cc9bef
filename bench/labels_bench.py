"""Ground truth at scale: bulk label ingestion and model-quality answers on a large log.

    python bench/labels_bench.py [--events 2000000] [--request-items 10000] [--labels 1000000] [--uploads-s 10]

On DATABASE_URL's server when set, otherwise a private embedded PostgreSQL. Loads a synthetic log
(bench/replay_bench.py's: one stream per prediction, 10 classes, one in 20 failed) with COPY,
registers its model, lets the projection worker catch up, then times:
- bulk ingestion: `LabelService.record_many` with requests of `--request-items` items (the path
  POST /labels runs, without HTTP), one request in flight, then two (as `just labels-import`);
- the current quality (from the kept quality cells) and the quality as of an early position
  of the labelling (aggregated from the predictions and the label history): median and max;
- upload throughput of a service on that log (wrk), alone and while labels are posted to it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay_bench import MODEL, run_on_a_server, synthetic_log, throwaway_database  # noqa: E402
from wrk import DIGITS, wrk  # noqa: E402

from db.group_commit import GroupCommitter  # noqa: E402
from db.store import AppendRequest, EventStore  # noqa: E402
from domain.events import ModelRegistered  # noqa: E402
from domain.streams import model_stream_id  # noqa: E402
from harness.live import LiveService  # noqa: E402
from infra.database import create_pool  # noqa: E402
from service.bootstrap import GC_GEN0_THRESHOLD  # noqa: E402
from infra.settings import Settings  # noqa: E402
from projections.worker import ProjectionRunner  # noqa: E402
from usecases.labels import LabelService  # noqa: E402


async def caught_up(runner_done: asyncio.Event, timeout_s: float = 900) -> None:
    await asyncio.wait_for(runner_done.wait(), timeout_s)


def load_log(owner_dsn: str, events: int) -> tuple[int, list]:
    """(events loaded, the made predictions' ids in log order): a synthetic log COPYed into the
    database and analysed."""
    records = synthetic_log(events)

    async def copy() -> None:
        connection = await asyncpg.connect(owner_dsn)
        try:
            await connection.copy_records_to_table("events", records=records, columns=[
                "position", "stream_id", "stream_version", "event_type", "schema_version", "data", "metadata",
                "recorded_at", "hash"])
            await connection.execute("ANALYZE events")
        finally:
            await connection.close()

    asyncio.run(copy())
    return len(records), [record[1] for record in records if record[3] == "PredictionMade"]


async def bench(admin_dsn: str, events: int, request_items: int, labels: int, uploads_s: float) -> None:
    async with throwaway_database(admin_dsn, "audit_labels") as (_, owner_dsn, app_dsn):
        # The log is generated and copied in a child process: the labelling service never holds
        # 2M loaded records, and this process measuring it with them on its heap (freed or not)
        # cost about 70 ms more CPU per 10,000-item request.
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as loader:
            count, made = await asyncio.get_running_loop().run_in_executor(loader, load_log, owner_dsn, events)
        print(f"log: {count:,} events ({len(made):,} made predictions) loaded with COPY")
        # As the service does after its warm-up (service/bootstrap.py): what exists now is never
        # garbage, and every full collection would walk the million ids kept for labelling.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])  # as the service runs (no walk per 700 objects)

        pool = await create_pool(app_dsn, Settings.from_env(), size=4, min_size=2)  # the service's pool settings
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
        # Each request's items are built when it is sent, as the service parses a body per request
        # (all 950,000 built up front sat on the heap for every garbage collection to walk).
        requests = [(start, wanted[start:start + request_items]) for start in range(0, len(wanted), request_items)]

        def items_of(request: tuple[int, list]) -> list[dict]:
            start, streams = request
            return [{"prediction_id": str(stream), "label": (start + i) * 7 % 10, "source": "bench"}
                    for i, stream in enumerate(streams)]

        first = await service.record_many(items_of(requests.pop(0)), metadata={})
        before = first.head_position  # an as_of early in the labelling: most of the history is after it
        # The ingestion alone (the projection worker paused: it would share the two cores), one
        # client waiting for each answer, then two requests in flight (as `just labels-import` sends
        # them: the service checks one while it commits the other); then two in flight while the
        # worker projects what arrives, as in service.
        await runner.stop()
        third = len(requests) // 3
        for in_flight, share, projecting in ((1, third, False), (2, third, False), (2, len(requests) - 2 * third, True)):
            mine, rates = requests[:share], []
            del requests[:share]
            if projecting:
                runner = ProjectionRunner(app_dsn, batch_size=5000, on_applied=on_applied, poll_interval_s=0.2)
                await runner.start()
            if not mine:
                continue

            async def client(queue: list[tuple[int, list]]) -> None:
                while queue:
                    chunk = items_of(queue.pop(0))
                    began = time.perf_counter()
                    result = await service.record_many(chunk, metadata={})
                    assert all(item.stream_version is not None for item in result.items)
                    rates.append(len(chunk) / (time.perf_counter() - began))

            total, count = sum(len(streams) for _, streams in mine), len(mine)
            began, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(client(mine) for _ in range(in_flight)))
            print(f"bulk labels, {in_flight} request(s) in flight, projection {'running' if projecting else 'paused'}: "
                  f"{total:,} in requests of {request_items:,}: {total / (time.perf_counter() - began):,.0f} labels/s "
                  f"(each request: median {statistics.median(rates):,.0f} labels/s; this process's CPU "
                  f"{(time.process_time() - cpu) / count * 1000:,.0f} ms a request)")
        await committer.close()

        last = await pool.fetchval("SELECT max(position) FROM events")
        done.clear()
        target["position"] = last
        started = time.perf_counter()
        await caught_up(done)
        print(f"projection caught up with the labels {time.perf_counter() - started:.1f} s after the last one")
        owner = await asyncpg.connect(owner_dsn)
        try:  # what autovacuum does within a minute of such a load; without it the planner, still
            # believing the tables empty, joins the label history by a lookup per prediction
            await owner.execute("ANALYZE predictions; ANALYZE labels")
        finally:
            await owner.close()

        await runner.stop()
        await pool.close()
        await on_the_service(owner_dsn, made, request_items, before, uploads_s)


async def on_the_service(owner_dsn: str, made: list, request_items: int, before: int, seconds: float) -> None:
    """A service on this log (its tree integrator off: it would integrate the whole loaded log
    meanwhile): `GET /models/{sha}/quality` now and `?as_of=` early in the labelling, then its
    upload throughput (wrk, 16 connections) alone and while a labelling tool posts bulk labels
    to it, interleaved, two rounds each."""
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        manifest = scratch / "digits.txt"
        manifest.write_text("".join(f"{path}\n" for path in sorted(DIGITS.glob("*.png"))))
        service = LiveService(owner_dsn, scratch / "service.log", TREE_INTEGRATOR="off")
        service.start(ready_timeout_s=300)
        try:
            async with httpx.AsyncClient(base_url=service.url, timeout=120) as client:
                for name, params in (("now (the kept cells)", {}), (f"as_of={before} (aggregated)", {"as_of": before})):
                    timings = []
                    for _ in range(5):
                        began = time.perf_counter()
                        answer = await client.get(f"/models/{MODEL.sha256}/quality", params=params)
                        timings.append(time.perf_counter() - began)
                        assert answer.status_code == 200, answer.text
                    print(f"GET /models/{{sha}}/quality {name}: median {statistics.median(timings) * 1000:,.1f} ms "
                          f"(max {max(timings) * 1000:,.1f} ms) over {len(made):,} predictions, "
                          f"{answer.json()['report']['labelled']:,} labelled then")
            if seconds <= 0:
                return
            stop = asyncio.Event()
            began = time.perf_counter()
            posting = [asyncio.create_task(post_labels(service.url, made[i::2], request_items, stop)) for i in range(2)]
            await asyncio.sleep(seconds)
            stop.set()
            posted = sum(await asyncio.gather(*posting))
            print(f"POST /labels, two requests of {request_items:,} in flight, no uploads: "
                  f"{posted / (time.perf_counter() - began):,.0f} labels/s over HTTP")
            await wrk(service.url, 16, 3, "multipart", manifest, scratch / "warm.json")
            alone, along, rates = [], [], []
            for _ in range(2):
                alone.append(rate(await wrk(service.url, 16, seconds, "multipart", manifest, scratch / "a.json")))
                stop = asyncio.Event()
                posted = asyncio.create_task(post_labels(service.url, made, request_items, stop))
                began = time.perf_counter()
                along.append(rate(await wrk(service.url, 16, seconds, "multipart", manifest, scratch / "b.json")))
                stop.set()
                rates.append(await posted / (time.perf_counter() - began))
            print(f"uploads at 16 connections: {max(alone):,.0f} req/s alone, {max(along):,.0f} req/s while labels are "
                  f"ingested ({min(rates):,.0f}-{max(rates):,.0f} labels/s over HTTP meanwhile): "
                  f"{max(along) / max(alone):.0%} (best of two interleaved rounds each; LABELS_SHARE_WHILE_UPLOADING "
                  f"{os.environ.get('LABELS_SHARE_WHILE_UPLOADING', 'default 0.05')})")
        finally:
            service.stop()


def rate(summary: dict) -> float:
    """Created predictions per second in one wrk run (bench/upload.lua's summary)."""
    return summary["created"] / (summary["duration_us"] / 1e6)


async def post_labels(url: str, made: list, request_items: int, stop: asyncio.Event) -> int:
    """POST /labels in requests of `request_items` until told to stop; the labels it got in."""
    sent, at = 0, 0
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        while not stop.is_set():
            chunk = made[at:at + request_items] or made[:request_items]
            at = (at + request_items) % len(made)
            answer = await client.post("/labels", json=[
                {"prediction_id": str(stream), "label": i % 10, "source": "bench-http"} for i, stream in enumerate(chunk)])
            assert answer.status_code == 200, answer.text
            sent += answer.json()["accepted"]
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--request-items", type=int, default=10_000)
    parser.add_argument("--labels", type=int, default=1_000_000, help="at most; each made prediction is labelled once")
    parser.add_argument("--uploads-s", type=float, default=10.0,
                        help="seconds of each upload run, alone and while labelling (0: skip that phase)")
    args = parser.parse_args()
    run_on_a_server(lambda admin_dsn: bench(admin_dsn, args.events, args.request_items, args.labels, args.uploads_s))


if __name__ == "__main__":
    main()
