"""Process-level drills on the service: kill -9 under load, SIGTERM drain, a killed projection worker
child, a database outage, huge multipart bodies.

Each drill sends a fixed number of requests and asserts statuses, row counts and exit codes.
Marked `fault` (by folder): .ci/run runs them in its DATABASE_URL pass only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid

import asyncpg
import httpx
import pytest

from harness.live import LiveService
from tests.fixtures import digit_files
from tests.processes import projection_workers, wait_until
from tests.proxy import TcpProxy

pytestmark = pytest.mark.timeout(240)

DIGITS = [path.read_bytes() for path, _ in digit_files()]


async def upload(http: httpx.AsyncClient, i: int) -> httpx.Response | Exception:
    try:
        return await http.post("/prediction/", files={"file": (f"f{i}.png", DIGITS[i % len(DIGITS)], "image/png")})
    except httpx.HTTPError as error:
        return error


async def load(url: str, count: int, concurrency: int, *, keepalive: bool = True) -> list[httpx.Response | Exception]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency if keepalive else 0)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        async def one(i: int):
            async with semaphore:
                return await upload(http, i)

        return await asyncio.gather(*(one(i) for i in range(count)))


async def check_log_integrity(owner_dsn: str, acknowledged: list[str]) -> None:
    """Every acknowledged prediction is there; no stream is half written; no blob is orphaned;
    the read tables hold each prediction exactly once."""
    connection = await asyncpg.connect(owner_dsn)
    try:
        found = await connection.fetchval(
            "SELECT count(DISTINCT stream_id) FROM events WHERE stream_id = ANY($1::uuid[])",
            [uuid.UUID(a) for a in acknowledged],
        )
        assert found == len(acknowledged)
        half_written = await connection.fetchval("""
            SELECT count(*) FROM (SELECT stream_id FROM events WHERE event_type LIKE 'Prediction%'
                                  GROUP BY stream_id HAVING count(*) <> 2) s""")
        assert half_written == 0
        orphans = await connection.fetchval("""
            SELECT count(*) FROM blobs b WHERE NOT EXISTS (
                SELECT FROM events e WHERE (e.event_type = 'PredictionRequested'
                                            AND e.data::jsonb ->> 'blob_sha256' = encode(b.sha256, 'hex'))
                                        OR (e.event_type = 'ModelRegistered'
                                            AND e.data::jsonb -> 'model' ->> 'sha256' = encode(b.sha256, 'hex')))""")
        assert orphans == 0
        positions = await connection.fetch("SELECT position FROM events ORDER BY position")
        assert [r["position"] for r in positions] == list(range(1, len(positions) + 1))
        streams = await connection.fetchval("SELECT count(DISTINCT stream_id) FROM events WHERE event_type = 'PredictionRequested'")
        deadline = time.monotonic() + 30
        while True:
            projected = await connection.fetchval("SELECT count(*) FROM predictions")
            distinct = await connection.fetchval("SELECT count(DISTINCT prediction_id) FROM predictions")
            assert projected == distinct  # never a duplicate
            if projected == streams or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert projected == streams
    finally:
        await connection.close()


async def test_kill_9_under_load_loses_no_acknowledged_prediction(database, tmp_path):
    service = LiveService(database.owner_dsn, tmp_path / "first.log").start()
    (worker,) = projection_workers(service.process.pid)
    task = asyncio.create_task(load(service.url, 600, 32))
    # let a couple of hundred events through, then kill the process mid-stream
    await _wait_for_events(database.owner_dsn, 200)
    service.signal(signal.SIGKILL)
    assert service.wait(10) == -signal.SIGKILL
    # Its projection worker notices and stops by itself: no orphan keeps the projection lock.
    wait_until(lambda: not _alive(worker), 10, f"the orphaned projection worker {worker} did not stop")
    results = await task
    acknowledged = [r.json()["prediction_id"] for r in results if isinstance(r, httpx.Response) and r.status_code == 201]
    assert 50 <= len(acknowledged) < 600
    assert all(isinstance(r, Exception) or r.status_code == 201 for r in results)

    restarted = LiveService(database.owner_dsn, tmp_path / "second.log").start()
    try:
        await check_log_integrity(database.owner_dsn, acknowledged)
        async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as http:
            for prediction_id in acknowledged[:: max(1, len(acknowledged) // 25)]:
                assert (await http.get(f"/prediction/{prediction_id}")).status_code == 200
            assert (await upload(http, 1)).status_code == 201
    finally:
        assert restarted.stop_gracefully(), restarted.log()


async def test_sigterm_drains_every_accepted_request(database, tmp_path):
    service = LiveService(database.owner_dsn, tmp_path / "service.log").start()
    task = asyncio.create_task(load(service.url, 400, 32, keepalive=False))
    await _wait_for_events(database.owner_dsn, 100)
    service.signal(signal.SIGTERM)
    results = await task
    assert service.wait(60) in (0, 128 + signal.SIGTERM)
    assert "Application shutdown complete" in service.log()
    answered = [r for r in results if isinstance(r, httpx.Response)]
    assert all(r.status_code == 201 for r in answered), {r.status_code for r in answered}
    # A request either never got in (refused, or closed by uvicorn before its request arrived)
    # or it was answered, and then it is committed: nothing committed goes unanswered.
    not_in = [r for r in results if isinstance(r, Exception)]
    assert all(isinstance(r, (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)) for r in not_in)
    connection = await asyncpg.connect(database.owner_dsn)
    try:
        committed = await connection.fetchval("SELECT count(*) FROM events WHERE event_type = 'PredictionMade'")
    finally:
        await connection.close()
    assert committed == len(answered) and len(answered) >= 40
    await check_log_integrity(database.owner_dsn, [r.json()["prediction_id"] for r in answered])
    # The projection worker (a child process) applied everything committed before it stopped.
    assert not projection_workers(service.process.pid)
    connection = await asyncpg.connect(database.owner_dsn)
    try:
        head = await connection.fetchval("SELECT max(position) FROM events")
        tracked = await connection.fetchval("SELECT position FROM projection_tracking")
    finally:
        await connection.close()
    assert tracked == head


async def test_a_projection_worker_that_dies_is_restarted(database, tmp_path):
    service = LiveService(database.owner_dsn, tmp_path / "service.log").start()
    try:
        (first,) = projection_workers(service.process.pid)
        os.kill(first, signal.SIGKILL)
        (second,) = wait_until(lambda: [p for p in projection_workers(service.process.pid) if p != first], 20,
                               "no new projection worker")
        async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
            created = await upload(http, 3)
            assert created.status_code == 201, created.text
            # The list waits for the projection (read-your-writes): the new worker applied it.
            listed = await http.get("/predictions/")
            assert listed.status_code == 200, listed.text
            assert created.json()["prediction_id"] in [item["prediction_id"] for item in listed.json()["items"]]
        assert projection_workers(service.process.pid) == [second]
    finally:
        assert service.stop_gracefully(), service.log()
    assert not projection_workers(service.process.pid)


async def test_database_outage_fast_503s_then_recovery_without_restart(database, tmp_path):
    proxy = TcpProxy(database.owner_dsn)
    await proxy.start()
    service = LiveService(
        proxy.dsn, tmp_path / "service.log",
        DB_CONNECT_TIMEOUT_S="1", DB_STATEMENT_TIMEOUT_MS="2000", DB_LOCK_TIMEOUT_MS="1000",
        PROJECTION_POLL_S="0.2", READ_YOUR_WRITES_TIMEOUT_S="1",
    )
    await asyncio.to_thread(service.start)  # the proxy runs on this loop: keep it free
    try:
        before = await load(service.url, 20, 4)
        assert all(r.status_code == 201 for r in before)

        await proxy.stop()
        started = time.monotonic()
        during = await load(service.url, 30, 6)
        elapsed = time.monotonic() - started
        statuses = [r.status_code for r in during if isinstance(r, httpx.Response)]
        assert len(statuses) == 30 and set(statuses) == {503}, statuses
        assert all(r.headers["content-type"].startswith("application/problem+json") for r in during)
        # the database outage itself, not a model that is not ready
        assert {r.json()["type"] for r in during} == {"urn:problem:database_unavailable"}
        assert all(r.headers.get("retry-after") for r in during)
        assert elapsed < 30  # 30 requests, 6 at a time, each bounded by the 1-2 s timeouts
        async with httpx.AsyncClient(base_url=service.url, timeout=10) as http:
            ready = await http.get("/health/ready")
            assert ready.status_code == 503 and ready.json()["checks"]["database"]["ok"] is False
            assert (await http.get("/predictions/")).status_code == 503
            assert (await http.get("/health/live")).status_code == 200

            await proxy.start()
            deadline = time.monotonic() + 30
            while (await http.get("/health/ready")).status_code != 200:
                assert time.monotonic() < deadline, service.log()
                await asyncio.sleep(0.2)
        after = await load(service.url, 20, 4)
        assert all(r.status_code == 201 for r in after), [getattr(r, "status_code", r) for r in after]
        acknowledged = [r.json()["prediction_id"] for r in [*before, *after]]
        await check_log_integrity(database.owner_dsn, acknowledged)
    finally:
        await asyncio.to_thread(service.stop)
        await proxy.stop()


async def test_huge_multipart_parts_are_bounded_and_harm_nobody(database, tmp_path):
    service = LiveService(database.owner_dsn, tmp_path / "service.log").start()
    try:
        rss_before = _rss_kib(service.process.pid)
        async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
            filler = b"\x00" * (9 * 1024 * 1024)
            for _ in range(10):
                response = await http.post(
                    "/prediction/",
                    files={"notes": ("n.bin", filler, "application/octet-stream"),
                           "file": ("d.png", DIGITS[0], "image/png")},
                )
                assert response.status_code == 201
                too_big = await http.post("/prediction/", files={"file": ("b.png", filler + filler, "image/png")})
                assert too_big.status_code == 413
            ok = await load(service.url, 20, 5)
            assert all(r.status_code == 201 for r in ok)
        growth_mib = (_rss_kib(service.process.pid) - rss_before) / 1024
        assert growth_mib < 300, f"RSS grew by {growth_mib:.0f} MiB"
    finally:
        assert service.stop_gracefully(), service.log()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def _wait_for_events(owner_dsn: str, count: int, timeout_s: float = 60) -> None:
    connection = await asyncpg.connect(owner_dsn)
    try:
        deadline = time.monotonic() + timeout_s
        while await connection.fetchval("SELECT count(*) FROM events") < count:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
