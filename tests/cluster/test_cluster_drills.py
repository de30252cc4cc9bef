"""Drills on a cluster on this machine (harness/cluster): a PostgreSQL primary and a streaming
standby, three service nodes reading through the standby, HAProxy in front.

One cluster for the module; the drills run in this order and each leaves it usable for the
next: read-your-writes through any node (standby streaming, then paused), the standby stopped
and started again, a node SIGKILLed under load, the node running the elected workers SIGKILLed,
then `just verify` on the primary. Each sends a bounded number of requests.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import httpx
import pytest

from harness.cluster import Cluster
from harness.cluster.haproxy import CHECK_INTERVAL_MS, FALL
from harness.live import ROOT
from tests.fixtures import digit_files
from tests.processes import wait_until

pytestmark = pytest.mark.timeout(420)

DIGITS = [path.read_bytes() for path, _ in digit_files()]
TAKEOVER_S = 5.0


@pytest.fixture(scope="module")
def cluster():
    env = {"REPLICA_MAX_WAIT_S": "0.3", "REPLICA_RETRY_S": "1", "PROJECTION_LOCK_POLL_S": "0.5"}
    with Cluster(3, node_env=env) as running:  # in a temporary folder of its own
        yield running


def upload(http: httpx.Client, i: int, **headers: str) -> httpx.Response:
    return http.post("/prediction/", files={"file": (f"d{i}.png", DIGITS[i % len(DIGITS)], "image/png")},
                     headers=headers)


def ready(url: str) -> dict:
    return httpx.get(f"{url}/health/ready", timeout=10).json()


def reads_by_server(url: str) -> dict[str, float]:
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("read_connections_total{"):
            server = line.split('server="')[1].split('"')[0]
            found[server] = float(line.rsplit(" ", 1)[1])
    return found


def sql(dsn: str, query: str, *args):
    async def run():
        connection = await asyncpg.connect(dsn)
        try:
            return await connection.fetchval(query, *args)
        finally:
            await connection.close()
    return asyncio.run(run())


def write_then_read_elsewhere(cluster: Cluster, rounds: int) -> None:
    """Write through one node, read it back through the next: never a 404, never a list
    without it."""
    nodes = [node for node in cluster.nodes if node.process is not None and node.process.poll() is None]
    for i in range(rounds):
        writer, reader = nodes[i % len(nodes)], nodes[(i + 1) % len(nodes)]
        created = upload(httpx.Client(base_url=writer.url, timeout=30), i)
        assert created.status_code == 201, created.text
        prediction_id = created.json()["prediction_id"]
        one = httpx.get(f"{reader.url}/prediction/{prediction_id}", timeout=30)
        assert one.status_code == 200, one.text
        listed = httpx.get(f"{reader.url}/predictions/", params={"limit": 5}, timeout=30).json()["items"]
        assert prediction_id in [item["prediction_id"] for item in listed], f"round {i}: {reader.name} missed it"


def test_writes_read_back_through_any_other_node_via_the_standby(cluster):
    before = reads_by_server(cluster.nodes[1].url)
    write_then_read_elsewhere(cluster, 12)
    after = reads_by_server(cluster.nodes[1].url)
    assert after["replica"] > before["replica"], "reads should go to the standby while it streams"
    assert ready(cluster.nodes[0].url)["replica"]["reads_from"] == "replica"


def test_a_paused_standby_never_answers_older_than_the_write(cluster):
    standby = cluster.postgres.standby.dsn("prediction_audit")
    sql(standby, "SELECT pg_wal_replay_pause()")
    try:
        write_then_read_elsewhere(cluster, 6)
        report = ready(cluster.nodes[2].url)
        assert report["status"] == "ready"  # the node still serves: reads go to the primary
        assert report["replica"]["replay_paused"] is True
        assert report["replica"]["lag_bytes"] > 0
        assert report["replica"]["lag_seconds"] > 0
        assert reads_by_server(cluster.nodes[2].url)["primary"] > 0
    finally:
        sql(standby, "SELECT pg_wal_replay_resume()")
    wait_until(lambda: ready(cluster.nodes[0].url)["replica"]["lag_bytes"] == 0, 30, "the standby caught up")
    time.sleep(1.2)  # REPLICA_RETRY_S: then reads try the standby again
    before = reads_by_server(cluster.nodes[0].url)["replica"]
    write_then_read_elsewhere(cluster, 3)
    assert reads_by_server(cluster.nodes[0].url)["replica"] > before


def test_a_stopped_standby_sends_reads_to_the_primary_and_loses_nothing(cluster):
    acknowledged = []
    with httpx.Client(base_url=cluster.front_url, timeout=30) as http:
        cluster.postgres.standby.stop()
        try:
            for i in range(9):
                created = upload(http, i)
                assert created.status_code == 201, created.text
                acknowledged.append(created.json()["prediction_id"])
            write_then_read_elsewhere(cluster, 3)
            for node in cluster.nodes:
                report = ready(node.url)
                assert report["status"] == "ready", report
                assert report["replica"]["reachable"] is False
                scrape = httpx.get(f"{node.url}/metrics", timeout=10)
                assert scrape.status_code == 200 and "replica_lag_bytes NaN" in scrape.text
                listed = httpx.get(f"{node.url}/predictions/", params={"limit": 20}, timeout=30).json()["items"]
                assert set(acknowledged) <= {item["prediction_id"] for item in listed}
        finally:
            cluster.postgres.standby.start()
    # Its replication slot kept the WAL it missed: it catches up, and reads come back to it.
    wait_until(lambda: ready(cluster.nodes[0].url)["replica"].get("lag_bytes") == 0, 60, "the standby caught up")
    standby = cluster.postgres.standby.dsn("prediction_audit")
    assert sql(standby, "SELECT count(DISTINCT stream_id) FROM events WHERE stream_id = ANY($1::uuid[])",
               [uuid.UUID(a) for a in acknowledged]) == len(acknowledged)


def elected(cluster: Cluster) -> dict[str, str]:
    for node in cluster.nodes:
        if node.process is not None and node.process.poll() is None:
            return ready(node.url)["checks"]["projection"]["elected"]
    raise AssertionError("no node is running")


def test_sigkill_one_node_under_load_loses_no_acknowledged_prediction(cluster):
    holders = set(elected(cluster).values())
    victim = next((n for n in cluster.nodes if n.name not in holders), cluster.nodes[-1])
    concurrency, total = 8, 240
    results: list[tuple[str, float, httpx.Response | Exception]] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        with httpx.Client(base_url=cluster.front_url, timeout=30) as http:
            for i in counter:
                kind = "read" if i % 4 == 3 else "write"
                started = time.monotonic()
                try:
                    answer = (http.get("/predictions/", params={"limit": 5}) if kind == "read" else upload(http, i))
                except httpx.HTTPError as error:
                    answer = error
                with lock:
                    results.append((kind, started, answer))

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client) for _ in range(concurrency)]
        wait_until(lambda: len(results) >= total // 4, 120, "a quarter of the load answered")
        killed_at = time.monotonic()
        victim.kill()
        down = wait_until(lambda: cluster.haproxy.server_states().get(victim.name, "").startswith("DOWN"), 10,
                          "HAProxy marked the node down")
        down_after = time.monotonic() - killed_at
        for future in futures:
            future.result()

    assert down and down_after <= FALL * CHECK_INTERVAL_MS / 1000 + 1.5, down_after
    failed = [(kind, started, answer) for kind, started, answer in results
              if isinstance(answer, Exception) or answer.status_code >= 500]
    # Only requests in flight on the dead node may fail, and only writes (reads are retried).
    assert len(failed) <= concurrency, failed
    assert all(kind == "write" for kind, _, _ in failed), failed
    assert all(started < killed_at + down_after for _, started, _ in failed), failed
    served_by = {answer.headers.get("x-served-by") for _, started, answer in results
                 if not isinstance(answer, Exception) and started > killed_at + down_after}
    assert victim.name not in served_by
    acknowledged = [answer.json()["prediction_id"] for kind, _, answer in results
                    if kind == "write" and not isinstance(answer, Exception) and answer.status_code == 201]
    assert len(acknowledged) >= total * 3 // 4 - concurrency
    made = sql(cluster.owner_dsn,
               "SELECT count(DISTINCT stream_id) FROM events WHERE event_type = 'PredictionMade' "
               "AND stream_id = ANY($1::uuid[])", [uuid.UUID(a) for a in acknowledged])
    assert made == len(acknowledged)


def test_sigkill_the_node_of_the_elected_workers_another_takes_over(cluster):
    holders = elected(cluster)
    victim = cluster.node(holders["read_model"])
    held = sorted(worker for worker, node in holders.items() if node == victim.name)
    killed_at = time.monotonic()
    victim.kill()
    survivors = [n.name for n in cluster.nodes if n.process is not None and n.process.poll() is None]

    def taken_over() -> bool:
        now = elected(cluster)
        return all(now.get(worker) in survivors for worker in held)

    wait_until(taken_over, TAKEOVER_S, f"{held} taken over by another node")
    assert time.monotonic() - killed_at <= TAKEOVER_S
    # The read tables reach the head (written through a surviving node after the takeover).
    with httpx.Client(base_url=cluster.front_url, timeout=30) as http:
        for i in range(5):
            assert upload(http, i).status_code == 201
    wait_until(lambda: ready(cluster.front_url)["checks"]["projection"]["lag_events"] == 0, 30,
               "the read tables reached the head")


def test_verify_on_the_primary_after_the_drills(cluster):
    env = {**os.environ, "DATABASE_URL": cluster.owner_dsn, "PYTHONPATH": str(ROOT),
           "CHECKPOINT_DIR": str(cluster.root / "checkpoints"),
           "CHECKPOINT_KEY": str(cluster.root / "checkpoint_ed25519.pem")}
    env.pop("APP_DATABASE_URL", None)
    done = subprocess.run([sys.executable, "-m", "cli", "verify"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "OK" in done.stdout
