"""The stored Merkle tree, read: leaves from the events, tiles, roots and proofs at any integrated
size, and the signed checkpoints. Used by the integrator, the HTTP routes and `just verify`.

Proofs come from stored tiles only: `domain.merkle.nodes_needed` names the perfect subtrees a
proof reads, one query fetches the tiles that hold them, and the proof is computed from those
(a few tiles for any tree size, so the cost does not grow with the log).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import asyncpg
import msgspec

from db.store import fetch_events_after
from domain.chain import ChainedRecord, canonical_bytes
from domain.merkle import (
    HASH_SIZE,
    TILE_WIDTH,
    Node,
    Subtree,
    consistency_path,
    inclusion_path,
    node_hash,
    nodes_needed,
    range_hash,
    tile_of,
)

Queryable = asyncpg.Pool | asyncpg.Connection
T = TypeVar("T")

# The hashed columns in ChainedRecord's order, `recorded_at` as the hashed integer microseconds
# (extract(epoch) is numeric since PostgreSQL 14: exact), then the chain hash.
LEAF_COLUMNS = (
    "position, stream_id::text, stream_version, event_type, schema_version,"
    " (extract(epoch FROM recorded_at) * 1000000)::bigint, data::text, metadata::text, hash"
)


class MissingTiles(LookupError):
    """The tree is not integrated that far (or its tiles were removed)."""


class TreeState(msgspec.Struct, frozen=True):
    size: int
    edge: tuple[bytes, ...]
    root: bytes
    chain_head: bytes


class StoredCheckpoint(msgspec.Struct, frozen=True):
    tree_size: int
    root_hash: bytes
    chain_head: bytes
    note: str
    signed_at_us: int


def entry_of(row: asyncpg.Record) -> bytes:
    """A leaf's data: the event's canonical bytes, from a row of LEAF_COLUMNS."""
    return canonical_bytes(ChainedRecord(*row[:8]))


async def leaf_rows(conn: Queryable, after: int, limit: int, *, up_to: int | None = None) -> list[asyncpg.Record]:
    return await fetch_events_after(conn, after, limit, up_to=up_to, columns=LEAF_COLUMNS)


async def tree_state(conn: Queryable) -> TreeState:
    row = await conn.fetchrow("SELECT size, edge, root, chain_head FROM merkle_tree")
    edge = bytes(row["edge"])
    return TreeState(
        size=row["size"],
        edge=tuple(edge[i : i + HASH_SIZE] for i in range(0, len(edge), HASH_SIZE)),
        root=bytes(row["root"]),
        chain_head=bytes(row["chain_head"]),
    )


async def read_tiles(conn: Queryable, keys: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    if not keys:
        return {}
    levels, indexes = zip(*sorted(keys))
    rows = await conn.fetch(
        "SELECT t.level, t.tile_index, t.hashes FROM merkle_tiles AS t"
        " JOIN unnest($1::smallint[], $2::bigint[]) AS k(level, tile_index) USING (level, tile_index)",
        list(levels), list(indexes),
    )
    return {(row["level"], row["tile_index"]): bytes(row["hashes"]) for row in rows}


async def read_tile(conn: Queryable, level: int, index: int) -> bytes | None:
    hashes = await conn.fetchval("SELECT hashes FROM merkle_tiles WHERE level = $1 AND tile_index = $2", level, index)
    return None if hashes is None else bytes(hashes)


def node_reader(tiles: dict[tuple[int, int], bytes]) -> Node:
    """Node (level, index) from the tiles: stored, or folded from 2**r hashes of one tile."""

    def node(level: int, index: int) -> bytes:
        tile_level, tile_index, first, count = tile_of(level, index)
        hashes = tiles.get((tile_level, tile_index))
        if hashes is None or len(hashes) < (first + count) * HASH_SIZE:
            raise MissingTiles(f"tile {tile_level}/{tile_index} does not hold node ({level}, {index})")
        row = [hashes[i * HASH_SIZE : (i + 1) * HASH_SIZE] for i in range(first, first + count)]
        while len(row) > 1:
            row = [node_hash(row[i], row[i + 1]) for i in range(0, len(row), 2)]
        return row[0]

    return node


async def from_tiles(conn: Queryable, paths: Callable[[Subtree], T]) -> T:
    """Run `paths` (a function of a Subtree) on the stored tiles, fetched in one query."""
    needed = nodes_needed(paths)
    tiles = await read_tiles(conn, {tile_of(level, index)[:2] for level, index in needed})
    node = node_reader(tiles)
    return paths(lambda lo, hi: range_hash(lo, hi, node))


class Inclusion(msgspec.Struct, frozen=True):
    leaf_index: int
    tree_size: int
    leaf_hash: bytes
    proof: list[bytes]
    root_hash: bytes


class Consistency(msgspec.Struct, frozen=True):
    first: int
    second: int
    proof: list[bytes]
    first_root: bytes
    second_root: bytes


async def inclusion(conn: Queryable, index: int, size: int) -> Inclusion:
    def paths(subtree: Subtree) -> Inclusion:
        return Inclusion(index, size, subtree(index, index + 1), inclusion_path(index, size, subtree), subtree(0, size))

    return await from_tiles(conn, paths)


async def consistency(conn: Queryable, first: int, second: int) -> Consistency:
    def paths(subtree: Subtree) -> Consistency:
        return Consistency(first, second, consistency_path(first, second, subtree), subtree(0, first), subtree(0, second))

    return await from_tiles(conn, paths)


async def entries(conn: Queryable, tile_index: int, width: int) -> list[bytes]:
    """The leaf data under level-0 tile `tile_index`, its first `width` entries."""
    first = tile_index * TILE_WIDTH
    return [entry_of(row) for row in await leaf_rows(conn, first, width, up_to=first + width)]


_CHECKPOINT_COLUMNS = (
    "tree_size, root_hash, chain_head, note, (extract(epoch FROM signed_at) * 1000000)::bigint AS signed_at_us"
)


def _checkpoint(row: asyncpg.Record) -> StoredCheckpoint:
    return StoredCheckpoint(row[0], bytes(row[1]), bytes(row[2]), row[3], row[4])


async def latest_checkpoint(conn: Queryable) -> StoredCheckpoint | None:
    row = await conn.fetchrow(f"SELECT {_CHECKPOINT_COLUMNS} FROM tlog_checkpoints ORDER BY tree_size DESC LIMIT 1")
    return None if row is None else _checkpoint(row)


async def checkpoint_covering(conn: Queryable, position: int) -> StoredCheckpoint | None:
    """The first signed checkpoint whose tree holds the event at `position`."""
    row = await conn.fetchrow(
        f"SELECT {_CHECKPOINT_COLUMNS} FROM tlog_checkpoints WHERE tree_size >= $1 ORDER BY tree_size LIMIT 1",
        position,
    )
    return None if row is None else _checkpoint(row)


async def recent_checkpoints(conn: Queryable, limit: int, *, before: int | None = None) -> list[StoredCheckpoint]:
    rows = await conn.fetch(
        f"SELECT {_CHECKPOINT_COLUMNS} FROM tlog_checkpoints WHERE tree_size < $2"
        " ORDER BY tree_size DESC LIMIT $1",
        limit, 2**63 - 1 if before is None else before,
    )
    return [_checkpoint(row) for row in rows]


async def all_checkpoints(conn: Queryable) -> list[StoredCheckpoint]:
    rows = await conn.fetch(f"SELECT {_CHECKPOINT_COLUMNS} FROM tlog_checkpoints ORDER BY tree_size")
    return [_checkpoint(row) for row in rows]


async def published_keys(conn: Queryable) -> list[str]:
    """Every verifier key that has signed here, newest first."""
    rows = await conn.fetch("SELECT verifier_key FROM tlog_keys ORDER BY first_used_at DESC, verifier_key")
    return [row[0] for row in rows]


class Refusal(msgspec.Struct, frozen=True):
    refused_at_us: int
    signed_size: int
    new_size: int
    reason: str


async def open_refusal(conn: Queryable) -> Refusal | None:
    """The latest refusal to sign, unless a checkpoint was signed after it."""
    row = await conn.fetchrow(
        """
        SELECT (extract(epoch FROM r.refused_at) * 1000000)::bigint, r.signed_size, r.new_size, r.reason
        FROM tlog_refusals AS r
        WHERE r.refused_at > coalesce((SELECT max(signed_at) FROM tlog_checkpoints), '-infinity')
        ORDER BY r.refusal_id DESC LIMIT 1
        """
    )
    return None if row is None else Refusal(*row)


class SignedSizeWatch:
    """The latest signed tree size, for requests that wait for a checkpoint (`Prefer:
    wait=checkpoint`): one poller per process while anyone waits, instead of a query loop (and a
    held connection) per request."""

    def __init__(self, pool: asyncpg.Pool, *, interval_s: float = 0.02, acquire_timeout_s: float = 5.0) -> None:
        self._pool = pool
        self._interval_s = interval_s
        self._acquire_timeout_s = acquire_timeout_s
        self._size = -1
        self._changed = asyncio.Condition()
        self._waiting = 0
        self._poller: asyncio.Task[None] | None = None

    async def wait_for(self, size: int, timeout_s: float) -> bool:
        """True once a checkpoint of at least `size` leaves is signed; false after the timeout."""
        if self._size >= size:
            return True
        self._waiting += 1
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll(), name="signed-size-watch")
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self._size >= size)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting -= 1

    async def _poll(self) -> None:
        while self._waiting:
            try:
                async with self._pool.acquire(timeout=self._acquire_timeout_s) as connection:
                    size = await connection.fetchval("SELECT coalesce(max(tree_size), -1) FROM tlog_checkpoints")
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                size = self._size  # the waiters time out on their own; keep trying meanwhile
            if size != self._size:
                self._size = size
                async with self._changed:
                    self._changed.notify_all()
            await asyncio.sleep(self._interval_s)
