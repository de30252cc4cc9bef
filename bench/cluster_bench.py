"""`just bench-cluster`: how far one primary carries the write path, on this machine.

    python -m bench.cluster_bench [--duration 12] [--warmup 3] [--connections 64] [--no-write]

In one run, on a cluster of its own (harness/cluster: a private primary and streaming standby,
three service nodes reading through it):

1. Uploads (`POST /prediction/`, the digit PNGs, bench/upload.lua under wrk) straight to one
   node, then through HAProxy with 1, 2 and 3 nodes behind it: req/s and latency. Each upload
   appends two events, so one node's events/s is twice its req/s.
2. The append path alone, without HTTP or the model: writer processes, each with its own pool
   and group committer as a node has, and many concurrent writers in each appending a
   prediction's two events (the same requests an upload makes, same digits as blobs):
   events/s committed, 1 process and 3 processes.

The ratio of (2) to one node's events/s is how many nodes one primary carries before the append
path is what limits; SCALING.md reasons from it. On a 2-core machine the nodes, HAProxy, both
PostgreSQL servers and the load generator share the same cores, so (1) shows the topology's
overhead, not a gain, and (2) is a lower bound for a primary with cores of its own. The result
goes into BENCHMARKS.md between its `cluster:begin`/`cluster:end` markers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import asyncpg

from bench.machine import machine
from bench.report import BENCHMARKS, write_marked_section
from bench.wrk import DIGITS, digits_manifest, wrk
from db.group_commit import GroupCommitter
from db.store import AppendRequest, EventStore
from domain.events import ImageFacts, ModelRef, PredictionMade, PredictionRequested
from harness.cluster import Cluster, print_flush
from harness.cluster.haproxy import HAProxy
from harness.cluster.processes import process_tree

REPO = Path(__file__).resolve().parent.parent
MODEL = ModelRef(name="append-bench", version="1", sha256="ab" * 32)


class PrimaryCpu:
    """CPU seconds the primary's processes (postmaster, backends, WAL writer, WAL sender...) used."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._start = 0.0
        self._started_at = 0.0

    def _seconds(self) -> float:
        total = 0.0
        for process in process_tree(self._pid):
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except Exception:  # noqa: BLE001 - a backend that just exited
                pass
        return total

    def __enter__(self) -> "PrimaryCpu":
        self._start, self._started_at = self._seconds(), time.monotonic()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.percent = 100 * (self._seconds() - self._start) / (time.monotonic() - self._started_at)


# ---- the append path alone -----------------------------------------------------------------


def append_request(content: bytes) -> AppendRequest:
    """What one upload appends: PredictionRequested and PredictionMade, its bytes as the blob."""
    digest = hashlib.sha256(content).digest()
    requested = PredictionRequested(
        input_id=str(uuid.uuid4()), blob_sha256=digest.hex(), size_bytes=len(content), filename="digit.png",
        content_type="image/png", image=ImageFacts(format="PNG", mode="L", width=28, height=28),
        preprocessing={"height": 28, "width": 28, "channels": 1}, tensor_sha256="cd" * 32, model=MODEL,
        idempotency_key=None,
    )
    made = PredictionMade(
        output=[0.01] * 9 + [0.91], likely_class=9, model=MODEL, device="/device:CPU:0", batch_size=16,
        batch_index=0, runtime={"tensorflow": "bench"}, inference_ms=0.5, queue_wait_ms=0.1,
    )
    return AppendRequest(stream_id=uuid.uuid4(), expected_version=0, events=[requested, made],
                         metadata={"request_id": uuid.uuid4().hex, "client": "bench"},
                         blobs={digest: content})


async def _append_for(dsn: str, writers: int, seconds: float, contents: list[bytes]) -> tuple[int, int, int, float]:
    """(events appended, groups, requests in them, seconds spent committing them)."""
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=4)
    groups = [0, 0, 0.0]

    def observe(size: int, commit_s: float) -> None:
        groups[0] += 1
        groups[1] += size
        groups[2] += commit_s

    committer = GroupCommitter(EventStore(pool), max_group=256, on_group=observe)
    committer.start()
    deadline = time.monotonic() + seconds
    appended = 0

    async def writer(offset: int) -> None:
        nonlocal appended
        i = offset
        while time.monotonic() < deadline:
            await committer.append(append_request(contents[i % len(contents)]))
            appended += 2
            i += writers

    await asyncio.gather(*(writer(w) for w in range(writers)))
    await committer.close()
    await pool.close()
    return appended, groups[0], groups[1], groups[2]


def _append_process(dsn: str, writers: int, seconds: float, start_at: float, out: multiprocessing.Queue) -> None:
    contents = [path.read_bytes() for path in sorted(DIGITS.glob("*.png"))]
    time.sleep(max(0.0, start_at - time.time()))  # every process starts together
    out.put(asyncio.run(_append_for(dsn, writers, seconds, contents)))


def append_path(dsn: str, processes: int, writers: int, seconds: float, primary_pid: int) -> dict:
    """Events/s, the primary's CPU, mean group size and commit time, with `processes` writer
    processes of `writers` concurrent appends each."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 3.0  # every process imports and connects first, then all start together
    started = [context.Process(target=_append_process, args=(dsn, writers, seconds, start_at, out))
               for _ in range(processes)]
    for process in started:
        process.start()
    time.sleep(max(0.0, start_at - time.time()))
    with PrimaryCpu(primary_pid) as cpu:
        results = [out.get(timeout=seconds + 120) for _ in started]
    for process in started:
        process.join(30)
    events, groups, requests, commit_s = (sum(column) for column in zip(*results))
    return {"rate": events / seconds, "cpu": cpu.percent, "group": requests / max(1, groups),
            "commit_ms": 1000 * commit_s / max(1, groups)}


# ---- uploads through HAProxy ------------------------------------------------------------------


async def uploads(url: str, connections: int, args: argparse.Namespace, scratch: Path, primary_pid: int) -> dict:
    manifest = digits_manifest(scratch)
    await wrk(url, connections, args.warmup, "multipart", manifest, scratch / "warm.json")
    with PrimaryCpu(primary_pid) as cpu:
        data = await wrk(url, connections, args.duration, "multipart", manifest, scratch / "run.json")
    seconds = data["duration_us"] / 1e6
    latency = data["latency_us"]
    return {
        "rps": data["requests"] / seconds,
        "p50_ms": latency["percentiles"]["50"] / 1e3,
        "p99_ms": latency["percentiles"]["99"] / 1e3,
        "errors": data["non_201"] + sum(data["errors"].values()),
        "primary_cpu_pct": cpu.percent,
    }


def report(rows: list[tuple[str, dict]], appends: list[tuple[str, dict]], facts: str, pg: str,
           connections: int, args: argparse.Namespace) -> str:
    one_node = next(result for name, result in rows if name == "HAProxy, 1 node")
    node_events = 2 * one_node["rps"]
    best_append = max(a["rate"] for _, a in appends)
    lines = [
        f"Run of {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {facts}, {pg}; wrk `-t1 --timeout 30s`, "
        f"{args.warmup:g} s warm-up then {args.duration:g} s per row; everything (nodes, HAProxy, both PostgreSQL "
        f"servers, wrk, the writer processes) on the same cores; each row is the best of {args.rounds} "
        "interleaved rounds. Primary CPU: the primary's processes "
        "(100% = one core) during the measured seconds.",
        "",
        f"| uploads, {connections} connections | req/s | events/s | p50 ms | p99 ms | errors | primary CPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {name} | {r['rps']:,.0f} | {2 * r['rps']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} "
          f"| {r['primary_cpu_pct']:.0f}% |" for name, r in rows],
        "",
        "| append path alone (no HTTP, no model) | events/s | primary CPU | events per primary CPU-second "
        "| mean group (uploads) | mean commit ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {name} | {a['rate']:,.0f} | {a['cpu']:.0f}% | {100 * a['rate'] / a['cpu']:,.0f} | {a['group']:.1f} "
          f"| {a['commit_ms']:.2f} |" for name, a in appends],
        "",
        f"One node through HAProxy: **{node_events:,.0f} events/s**; the append path: **{best_append:,.0f} "
        f"events/s**, so one primary carries about **{best_append / node_events:.1f} nodes** like this one "
        "before appends limit (SCALING.md).",
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    if "<!-- cluster:begin -->" not in BENCHMARKS.read_text():
        raise SystemExit("BENCHMARKS.md has no cluster:begin/cluster:end markers: put them where the section goes")
    write_marked_section("cluster", text, "Cluster")


def main() -> int:
    parser = argparse.ArgumentParser(prog="just bench-cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="each row this many times; the best is kept")
    parser.add_argument("--writers", type=int, default=64, help="concurrent appends per writer process")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    with Cluster(3) as cluster:
        scratch = cluster.root / "bench"
        scratch.mkdir()
        print_flush(f"cluster up under {cluster.root}")
        fronts = {n: HAProxy(scratch, {node.name: node.port for node in cluster.nodes[:n]}, name=f"haproxy-{n}")
                  for n in (1, 2, 3)}
        try:
            targets = [("one node, no HAProxy", cluster.nodes[0].url)]
            for n, proxy in fronts.items():
                proxy.start()
                targets.append((f"HAProxy, {n} node{'s' if n > 1 else ''}", proxy.url))
            best: dict[str, dict] = {}
            for _round in range(args.rounds):  # interleaved, best round kept: other work only slows a run
                for name, url in targets:
                    result = asyncio.run(uploads(url, args.connections, args, scratch,
                                                 cluster.postgres.primary.process.pid))
                    print_flush(f"  {name:<24} {result['rps']:8.1f} req/s  p50 {result['p50_ms']:.1f} ms  "
                                f"p99 {result['p99_ms']:.1f} ms  errors {result['errors']}  "
                                f"primary CPU {result['primary_cpu_pct']:.0f}%")
                    if name not in best or result["rps"] > best[name]["rps"]:
                        best[name] = result
            rows = list(best.items())
        finally:
            for proxy in fronts.values():
                proxy.stop()
        appends = []
        for processes, writers in ((1, args.writers), (1, 4 * args.writers), (3, args.writers)):
            name = f"{processes} writer process{'es' if processes > 1 else ''} × {writers} concurrent appends"
            measured = []
            for _round in range(args.rounds):
                result = append_path(cluster.app_dsn, processes, writers, args.duration,
                                     cluster.postgres.primary.process.pid)
                print_flush(f"  {name:<48} {result['rate']:10.0f} events/s  primary CPU {result['cpu']:.0f}%  "
                            f"group {result['group']:.1f}  commit {result['commit_ms']:.2f} ms")
                measured.append(result)
            appends.append((name, max(measured, key=lambda r: r["rate"])))
        facts = machine()
        text = report(rows, appends, f"{facts['cpu']} ({facts['cores']} cores) at commit `{facts['commit']}`",
                      cluster.postgres.version, args.connections, args)
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
