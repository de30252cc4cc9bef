"""Replay / rebuild speed: bulk-load a synthetic log into a throwaway database and time the
projection over it.

    python bench/replay_bench.py [--events 100000] [--batch-size 5000]

On DATABASE_URL's server when set (it must be allowed to create databases), otherwise on a
private embedded PostgreSQL in a temporary folder. The log is realistic in shape: one stream per
prediction (PredictionRequested + PredictionMade, one in 20 failed), 10-class outputs, groups of
16 requests sharing one commit time, correctly chained hashes (`domain.chain.link`), loaded
with COPY. Prints events/s for: the worker catching up from 0, `rebuild` (build + swap, with
that worker live), `verify` (chain + replay into scratch tables + diff) and `replay` (NDJSON).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db import embedded  # noqa: E402
from db.dsn import APP_ROLE, with_database, with_user  # noqa: E402
from db.migrate import migrate  # noqa: E402
from domain.chain import GENESIS_HASH, ChainedRecord, link, to_microseconds  # noqa: E402
from domain.events import (  # noqa: E402
    ImageFacts,
    ModelRef,
    PredictionFailed,
    PredictionMade,
    PredictionRequested,
    encode_event,
    encode_metadata,
)
from projections.rebuild import rebuild  # noqa: E402
from projections.replay import replay  # noqa: E402
from projections.verify import verify  # noqa: E402
from projections.worker import ProjectionRunner  # noqa: E402

MODEL = ModelRef(name="mnist_convnet", version="1", sha256="ab" * 32)
GROUP = 16


def synthetic_log(events: int, seed: int = 7) -> list[tuple]:
    """COPY records for `events` events (rounded down to whole prediction streams)."""
    rng = random.Random(seed)
    records: list[tuple] = []
    previous = GENESIS_HASH
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    position = 0
    for index in range(events // 2):
        stream_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        recorded_at = start + timedelta(milliseconds=index // GROUP)
        content_digest = hashlib.sha256(stream_id.bytes).hexdigest()
        requested = PredictionRequested(
            input_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            blob_sha256=content_digest,
            size_bytes=300 + index % 500,
            filename=f"digit-{index}.png",
            content_type="image/png",
            image=ImageFacts(format="PNG", mode="L", width=28, height=28),
            preprocessing={"height": 28, "width": 28, "channels": 1, "scale": "1/255"},
            tensor_sha256=hashlib.sha256(content_digest.encode()).hexdigest(),
            model=MODEL,
        )
        if index % 20 == 19:
            outcome = PredictionFailed(error_code="non_finite_output", message="NaN in the output", model=MODEL,
                                       device="/device:CPU:0")
        else:
            raw = [rng.random() for _ in range(10)]
            total = sum(raw)
            output = [x / total for x in raw]
            outcome = PredictionMade(output=output, likely_class=max(range(10), key=output.__getitem__), model=MODEL,
                                     device="/device:CPU:0", batch_size=GROUP, batch_index=index % GROUP,
                                     runtime={"tensorflow": "2.20.0"}, inference_ms=1.5, queue_wait_ms=0.2)
        metadata = encode_metadata({"request_id": f"req-{index}", "client": "bench"})
        for version, event in enumerate((requested, outcome), start=1):
            position += 1
            data = encode_event(event)
            name = type(event).__name__
            record = ChainedRecord(position=position, stream_id=str(stream_id), stream_version=version,
                                   event_type=name, schema_version=1, recorded_at_us=to_microseconds(recorded_at),
                                   data=data, metadata=metadata)
            previous = link(previous, record)
            records.append((position, stream_id, version, name, 1, data, metadata, recorded_at, previous))
    return records


def _process_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BackendCpu:
    """CPU time of the PostgreSQL backends serving one database, sampled from /proc while they
    live (the server runs on this machine): the server's share of a phase, apart from the rest
    of a shared machine's load."""

    def __init__(self, admin_dsn: str, database: str) -> None:
        self._admin_dsn, self._database = admin_dsn, database
        self._seen: dict[int, tuple[float, float]] = {}  # pid -> (first, last) CPU seconds
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BackendCpu:
        self._connection = await asyncpg.connect(self._admin_dsn)
        self._own = self._connection.get_server_pid()
        await self._sample()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._sample()
        await self._connection.close()
        self.seconds = sum(last - first for first, last in self._seen.values())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            await self._sample()

    async def _sample(self) -> None:
        pids = await self._connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> $2", self._database, self._own
        )
        for (pid,) in pids:
            cpu = _process_cpu_s(pid)
            if cpu is not None:
                first, _ = self._seen.get(pid, (cpu, cpu))
                self._seen[pid] = (first, cpu)


class Timer:
    """Wall time and this process's CPU time of one phase (the machine is shared: say so)."""

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu

    def rate(self, count: int, server: BackendCpu | None = None) -> str:
        text = f"{self.wall:.2f} s, {count / self.wall:,.0f} events/s (Python CPU {self.cpu:.2f} s"
        if server is not None:
            # The pipeline overlaps the two sides: on two otherwise idle cores the slower side
            # sets the pace.
            text += (f", PostgreSQL CPU {server.seconds:.2f} s: ~{count / max(self.cpu, server.seconds):,.0f} "
                     f"events/s on two idle cores")
        return text + f"; load average {os.getloadavg()[0]:.1f})"


@contextlib.asynccontextmanager
async def throwaway_database(admin_dsn: str, prefix: str) -> AsyncIterator[tuple[str, str, str]]:
    """A migrated database of its own: (name, owner DSN, the service role's DSN); dropped after."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    owner_dsn = with_database(admin_dsn, name)
    await migrate(owner_dsn)
    try:
        yield name, owner_dsn, with_user(owner_dsn, APP_ROLE)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def run_on_a_server(bench_on: Callable[[str], Awaitable[None]]) -> None:
    """Run `bench_on(admin_dsn)` on DATABASE_URL's server, or on a private embedded PostgreSQL in a
    temporary folder."""
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    tmp: Path | None = None
    handle = None
    admin_dsn = os.environ.get("DATABASE_URL")
    if not admin_dsn:
        tmp = Path(tempfile.mkdtemp(prefix="bench-pg-"))
        handle, admin_dsn = embedded.start(tmp / "pgdata")
        print("server: embedded PostgreSQL (throwaway)")
    else:
        print("server: DATABASE_URL (throwaway database)")
    try:
        asyncio.run(bench_on(admin_dsn))
    finally:
        if handle is not None:
            handle.cleanup()  # type: ignore[attr-defined]
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


async def bench(admin_dsn: str, events: int, batch_size: int, rounds: int) -> None:
    async with throwaway_database(admin_dsn, "audit_bench") as (name, owner_dsn, app_dsn):
        started = time.perf_counter()
        records = synthetic_log(events)
        generated = time.perf_counter() - started
        connection = await asyncpg.connect(owner_dsn)
        try:
            started = time.perf_counter()
            await connection.copy_records_to_table(
                "events",
                records=records,
                columns=["position", "stream_id", "stream_version", "event_type", "schema_version", "data",
                         "metadata", "recorded_at", "hash"],
            )
            loaded = time.perf_counter() - started
            await connection.execute("ANALYZE events")
        finally:
            await connection.close()
        count = len(records)
        print(f"log: {count} events generated in {generated:.2f} s, loaded with COPY in {loaded:.2f} s "
              f"({count / loaded:,.0f} events/s)")

        caught_up = asyncio.Event()

        def on_applied(position: int, _count: int) -> None:
            if position >= count:
                caught_up.set()

        runner = ProjectionRunner(app_dsn, batch_size=1000, on_applied=on_applied, poll_interval_s=0.5)
        with Timer() as timer:
            await runner.start()
            await asyncio.wait_for(caught_up.wait(), 600)
        print(f"live worker catching up from 0 (batches of 1000, every index in place): {timer.rate(count)}")

        for attempt in range(rounds):
            async with BackendCpu(admin_dsn, name) as server:
                with Timer() as timer:
                    report = await rebuild(owner_dsn, batch_size=batch_size)
            print(f"rebuild #{attempt + 1} (batches of {batch_size}, live worker running): "
                  f"{timer.rate(count, server)}; build {report.build_s:.2f} s, swap {report.swap_s * 1000:.0f} ms")
        await runner.stop()

        for attempt in range(rounds):
            async with BackendCpu(admin_dsn, name) as server:
                with Timer() as timer:
                    checked = await verify(owner_dsn)
            assert checked.ok, checked.problem
            print(f"verify #{attempt + 1} (chain + replay + diff in one snapshot): {timer.rate(count, server)}")

        connection = await asyncpg.connect(owner_dsn)
        try:
            with open(os.devnull, "wb") as sink, Timer() as timer:
                written = await replay(connection, sink.write)
        finally:
            await connection.close()
        print(f"replay as NDJSON: {timer.rate(written)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="rebuild and verify this many times each")
    args = parser.parse_args()
    run_on_a_server(lambda admin_dsn: bench(admin_dsn, args.events, args.batch_size, args.rounds))


if __name__ == "__main__":
    main()
