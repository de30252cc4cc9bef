"""The transparency log's own speeds, on throwaway databases:

    python bench/tlog_bench.py [--events 300000] [--leaves 10000000] [--seconds 8]

1. The tree integrator catching up over a synthetic log of `--events` events (bench/replay_bench's
   log, loaded with COPY): events/s, with its Python and PostgreSQL CPU.
2. A synthetic tree of `--leaves` leaves (random leaf hashes, every tile and the tree state written
   with COPY, as the integrator would have left them) and, over it:
   - inclusion and consistency proof server time (tree_store, as the routes call it: one query
     for the tiles, then the hashing), p50 and p99 over 2,000 random proofs;
   - a service on that database (TREE_INTEGRATOR=off, PROJECTIONS=off) under wrk: full tiles at
     random indexes (GET /tile/0/N) and inclusion proofs over HTTP, req/s and latency.
On DATABASE_URL's server when set, else a private embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay_bench import BackendCpu, Timer, run_on_a_server, synthetic_log, throwaway_database  # noqa: E402
from domain.merkle import HASH_SIZE, TILE_WIDTH, node_hash, range_hash  # noqa: E402
from domain.signed_note import Checkpoint  # noqa: E402
from harness.live import LiveService  # noqa: E402
from projections import tree_store  # noqa: E402
from projections.checkpoints import NoteKey, load_or_create_key, sign_checkpoint  # noqa: E402
from projections.tree import TreeIntegrator  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TILE_LUA = """
local max_tile, mode, size = tonumber(os.getenv("MAX_TILE")), os.getenv("MODE"), os.getenv("SIZE")
local function elements(n)
  local groups = {string.format("%03d", n % 1000)}
  n = math.floor(n / 1000)
  while n > 0 do
    table.insert(groups, 1, string.format("x%03d", n % 1000))
    n = math.floor(n / 1000)
  end
  return table.concat(groups, "/")
end
request = function()
  if mode == "tile" then
    return wrk.format("GET", "/tile/0/" .. elements(math.random(0, max_tile)))
  end
  return wrk.format("GET", "/events/" .. math.random(1, tonumber(size)) .. "/inclusion?tree_size=" .. size)
end
"""


async def integrator_catch_up(admin_dsn: str, events: int) -> None:
    async with throwaway_database(admin_dsn, "audit_tlog") as (name, owner_dsn, app_dsn):
        records = synthetic_log(events)
        connection = await asyncpg.connect(owner_dsn)
        try:
            await connection.copy_records_to_table(
                "events", records=records,
                columns=["position", "stream_id", "stream_version", "event_type", "schema_version", "data",
                         "metadata", "recorded_at", "hash"],
            )
            await connection.execute("ANALYZE events")
        finally:
            await connection.close()
        count = len(records)
        folder = Path(tempfile.mkdtemp(prefix="tlog-bench-"))
        integrator = TreeIntegrator(app_dsn, key_path=folder / "key.pem", checkpoint_dir=folder, poll_interval_s=0.2)
        async with BackendCpu(admin_dsn, name) as server:
            with Timer() as timer:
                await integrator.start()
                while integrator.position is None or integrator.position < count:
                    await asyncio.sleep(0.01)
            await integrator.stop()
        shutil.rmtree(folder, ignore_errors=True)
        print(f"1. integrator catching up over {count:,} events (batches of 20,000): {timer.rate(count, server)}",
              flush=True)


def synthetic_tiles(leaves: int, seed: int = 11) -> tuple[dict[tuple[int, int], bytes], list[bytes], bytes]:
    """Every tile of a tree of random leaf hashes, its right edge and its root."""
    level_hashes = np.random.default_rng(seed).bytes(leaves * HASH_SIZE)
    tiles: dict[tuple[int, int], bytes] = {}
    level = 0
    while level_hashes:
        count = len(level_hashes) // HASH_SIZE
        for index in range(0, count, TILE_WIDTH):
            tiles[(level, index // TILE_WIDTH)] = level_hashes[index * HASH_SIZE : (index + TILE_WIDTH) * HASH_SIZE]
        parents = bytearray()
        for index in range(count // TILE_WIDTH):  # only complete subtrees reach the next tile level
            row = [tiles[(level, index)][i : i + HASH_SIZE] for i in range(0, TILE_WIDTH * HASH_SIZE, HASH_SIZE)]
            while len(row) > 1:
                row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
            parents += row[0]
        level_hashes = bytes(parents)
        level += 1
    node = tree_store.node_reader(tiles)
    edge, low = [], 0
    for height in range(leaves.bit_length() - 1, -1, -1):
        if leaves >> height & 1:
            edge.append(node(height, low >> height))
            low += 1 << height
    return tiles, edge, range_hash(0, leaves, node)


async def synthetic_tree(owner_dsn: str, leaves: int) -> tuple[int, bytes]:
    with Timer() as timer:
        tiles, edge, root = synthetic_tiles(leaves)
    connection = await asyncpg.connect(owner_dsn)
    try:
        with Timer() as loading:
            await connection.copy_records_to_table(
                "merkle_tiles", records=[(level, index, hashes) for (level, index), hashes in tiles.items()],
                columns=["level", "tile_index", "hashes"],
            )
            await connection.execute("ANALYZE merkle_tiles")
            await connection.execute("UPDATE merkle_tree SET size = $1, edge = $2, root = $3", leaves, b"".join(edge),
                                     root)
            key = NoteKey("bench.example/log", load_or_create_key(Path(tempfile.mkdtemp()) / "key.pem"))
            note = sign_checkpoint(Checkpoint(key.name, leaves, root), [key])
            await connection.execute(
                "INSERT INTO tlog_checkpoints (tree_size, root_hash, chain_head, note) VALUES ($1, $2, $3, $4)",
                leaves, root, bytes(32), note,
            )
            await connection.execute("INSERT INTO tlog_keys (verifier_key) VALUES ($1)", key.verifier_key)
    finally:
        await connection.close()
    print(f"2. synthetic tree of {leaves:,} leaves: {len(tiles):,} tiles computed in {timer.wall:.1f} s, "
          f"loaded in {loading.wall:.1f} s", flush=True)
    return leaves, root


async def proof_times(owner_dsn: str, size: int, root: bytes, count: int = 2000) -> None:
    rng = random.Random(3)
    connection = await asyncpg.connect(owner_dsn)
    try:
        for what in ("inclusion", "consistency"):
            times = []
            for _ in range(count):
                started = time.perf_counter()
                if what == "inclusion":
                    proof = await tree_store.inclusion(connection, rng.randrange(size), size)
                    assert proof.root_hash == root
                else:
                    proof = await tree_store.consistency(connection, rng.randrange(1, size), size)
                    assert proof.second_root == root
                times.append(time.perf_counter() - started)
            times.sort()
            print(f"   {what} proof server time over {count:,} random proofs: p50 {statistics.median(times) * 1e3:.2f} ms,"
                  f" p99 {times[int(len(times) * 0.99)] * 1e3:.2f} ms", flush=True)
    finally:
        await connection.close()


def wrk_row(url: str, mode: str, size: int, seconds: float, connections: int, script: Path, tiles: int) -> None:
    env = {**os.environ, "MAX_TILE": str(tiles - 1), "MODE": mode, "SIZE": str(size)}
    done = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url],
                          capture_output=True, text=True, env=env, timeout=seconds + 60)
    lines = done.stdout.splitlines()
    rate = next((line.split()[1] for line in lines if line.startswith("Requests/sec")), "?")
    p50 = next((line.split()[1] for line in lines if line.strip().startswith("50%")), "?")
    p99 = next((line.split()[1] for line in lines if line.strip().startswith("99%")), "?")
    non2xx = next((line.strip() for line in lines if "Non-2xx" in line), "no errors")
    what = (f"full tiles, random among {tiles:,} (GET /tile/0/N)" if mode == "tile"
            else f"inclusion proofs over HTTP, random leaves of {size:,}")
    print(f"   {what}, wrk -c{connections}: {rate} req/s, p50 {p50}, p99 {p99}; {non2xx}", flush=True)


async def bench(admin_dsn: str, events: int, leaves: int, seconds: float) -> None:
    await integrator_catch_up(admin_dsn, events)
    async with throwaway_database(admin_dsn, "audit_tlog") as (_name, owner_dsn, _app_dsn):
        size, root = await synthetic_tree(owner_dsn, leaves)
        await proof_times(owner_dsn, size, root)
        if shutil.which("wrk") is None:
            print("   (wrk is not installed: `apt-get install -y wrk` for the HTTP rows)")
            return
        folder = Path(tempfile.mkdtemp(prefix="tlog-bench-"))
        script = folder / "tiles.lua"
        script.write_text(TILE_LUA)
        service = LiveService(owner_dsn, folder / "service.log", TREE_INTEGRATOR="off", PROJECTIONS="off",
                              LOG_LEVEL="WARNING", CHECKPOINT_DIR=str(folder), CHECKPOINT_KEY=str(folder / "k.pem"))
        try:
            await asyncio.to_thread(service.start, 180.0)
            # Hot: a set that the service's LRU holds after first use; cold: any level-0 tile,
            # mostly never read before (a query each).
            for mode, tiles in (("tile", 1000), ("tile", size // TILE_WIDTH), ("inclusion", 0)):
                wrk_row(service.url, mode, size, seconds, 16, script, tiles)
        finally:
            await asyncio.to_thread(service.stop)
            shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000, help="events for the integrator's catch-up")
    parser.add_argument("--leaves", type=int, default=10_000_000, help="leaves of the synthetic tree")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds per wrk row")
    args = parser.parse_args()
    run_on_a_server(lambda admin_dsn: bench(admin_dsn, args.events, args.leaves, args.seconds))
    print(json.dumps({"events": args.events, "leaves": args.leaves}))


if __name__ == "__main__":
    main()
