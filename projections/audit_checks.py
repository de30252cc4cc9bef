"""Checks `just verify` runs beside the chain and the read-model diff, inside the same snapshot:
the Merkle tree and its signed checkpoints (in the database and kept outside it), the original uploads (erased or
tampered?), and receipts that clients kept."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from domain.chain import GENESIS_HASH
from domain.merkle import HASH_SIZE, TILE_HEIGHT, TILE_WIDTH, TreeBuilder, leaf_hash
from domain.signed_note import Checkpoint, NoteError
from projections import tree_store
from projections.checkpoints import NoteKey, chain_head_of, filed_checkpoints, open_checkpoint
from projections.verify import OutsideCheck


def transparency_log(
    directory: Path, keys: Sequence[Ed25519PrivateKey], verifier_keys: Sequence[str], origin: str | None,
    notes: list[str],
) -> OutsideCheck:
    """The Merkle tree recomputed from the events: the stored tiles must hold exactly its hashes,
    and every signed checkpoint (in the database and in `directory`) must be signed by a trusted
    key and name the root and the chain head that the events give at its size."""

    async def check(connection: asyncpg.Connection, head_position: int, head_hash: bytes) -> str | None:
        log_id = str(await connection.fetchval("SELECT log_id FROM log_identity"))
        name = origin or f"prediction-audit/{log_id}"
        trusted = [NoteKey(name, key).verifier_key for key in keys] + list(verifier_keys)
        if not trusted:
            notes.append("transparency log: no signing key and no --key, checkpoints not checked")
        stored = await tree_store.all_checkpoints(connection)
        checkpoints: list[tuple[str, str]] = [(f"checkpoint {c.tree_size} (database)", c.note) for c in stored]
        checkpoints += [(f"checkpoint file of log {log_id}", note) for note in filed_checkpoints(directory, log_id)]
        opened: list[tuple[str, Checkpoint]] = []
        for where, note in checkpoints:
            if not trusted:
                break
            try:
                opened.append((where, open_checkpoint(note, trusted)))
            except NoteError as error:
                return f"transparency log: {where}: {error}"
        tree = await tree_store.tree_state(connection)
        sizes = {c.size for _, c in opened} | {c.tree_size for c in stored} | {tree.size}
        recomputed = await _recompute(connection, max(sizes), sizes, tree.size)
        if isinstance(recomputed, str):
            return recomputed
        roots, chain_heads = recomputed
        if roots[tree.size] != tree.root:
            return f"transparency log: the stored tree's root at size {tree.size} is not the events' root"
        good = 0
        for where, c in sorted(opened, key=lambda pair: pair[1].size):
            if c.root_hash != roots[c.size] or chain_head_of(c) != chain_heads[c.size]:
                return (f"transparency log: {where} signs a tree of {c.size} leaves that the events no longer"
                        f" give: an event at positions {good + 1}..{c.size} was rewritten after it was signed")
            good = c.size
        for c in stored:
            if (roots[c.tree_size], chain_heads[c.tree_size]) != (c.root_hash, c.chain_head):
                return f"transparency log: checkpoint {c.tree_size} in the database: its columns are not its note's"
        notes.append(
            f"transparency log: {tree.size} leaves recomputed from the events match the stored tiles;"
            f" {len(opened)} signed checkpoint(s) checked (signature, root, chain head)"
        )
        return None

    return check


async def _recompute(
    connection: asyncpg.Connection, size: int, sizes: set[int], integrated: int, page: int = 20_000
) -> tuple[dict[int, bytes], dict[int, bytes]] | str:
    """The roots and chain heads at `sizes`, from the events; a problem when the stored tiles hold
    another hash than the recomputed one (the first position whose leaf differs is named)."""
    builder = TreeBuilder()
    roots, chain_heads = {0: builder.root()}, {0: GENESIS_HASH}
    upper = {(r[0], r[1]): bytes(r[2]) for r in await connection.fetch(
        "SELECT level, tile_index, hashes FROM merkle_tiles WHERE level > 0")}
    while builder.size < size:
        rows = await tree_store.leaf_rows(connection, builder.size, min(page, size - builder.size))
        if not rows:
            return f"transparency log: the tree has {size} leaves but the log ends at position {builder.size}"
        first_tile = builder.size // TILE_WIDTH
        stored_leaves = b"".join(bytes(r[0]) for r in await connection.fetch(
            "SELECT hashes FROM merkle_tiles WHERE level = 0 AND tile_index BETWEEN $1 AND $2 ORDER BY tile_index",
            first_tile, (builder.size + len(rows) - 1) // TILE_WIDTH))
        offset = (builder.size % TILE_WIDTH) * HASH_SIZE
        for row in rows:
            leaf = leaf_hash(tree_store.entry_of(row))
            if stored_leaves[offset : offset + HASH_SIZE] != leaf and row[0] <= integrated:
                return (f"transparency log: the event at position {row[0]} does not hash to its leaf in the stored"
                        f" tree: it was rewritten after it was integrated")
            offset += HASH_SIZE
            for level, index, digest in builder.append(leaf):
                if level and level % TILE_HEIGHT == 0:
                    tile = upper.get((level // TILE_HEIGHT, index // TILE_WIDTH), b"")
                    at = (index % TILE_WIDTH) * HASH_SIZE
                    if tile[at : at + HASH_SIZE] != digest and builder.size <= integrated:
                        return f"transparency log: the stored tree's node ({level}, {index}) is not the events' hash"
            if builder.size in sizes:
                roots[builder.size] = builder.root()
                chain_heads[builder.size] = bytes(row[8])
    return roots, chain_heads


_BLOBS_SQL = """
WITH named AS (
    SELECT position, data::jsonb ->> 'blob_sha256' AS digest, 'upload' AS kind
      FROM events WHERE event_type = 'PredictionRequested'
    UNION ALL
    SELECT position, data::jsonb -> 'model' ->> 'sha256', 'model'
      FROM events WHERE event_type = 'ModelRegistered'
), erased AS (
    SELECT DISTINCT data::jsonb ->> 'blob_sha256' AS digest FROM events WHERE event_type = 'BlobErased'
)
SELECT n.position, n.digest, n.kind,
       b.sha256 IS NULL AS missing,
       b.sha256 IS NOT NULL AND sha256(b.content) <> b.sha256 AS altered,
       n.digest IN (SELECT digest FROM erased) AS erased
FROM named AS n LEFT JOIN blobs AS b ON b.sha256 = decode(n.digest, 'hex')
WHERE b.sha256 IS NULL OR sha256(b.content) <> b.sha256
ORDER BY n.position
"""


def original_bytes(notes: list[str]) -> OutsideCheck:
    """Every blob an event names is there with the bytes its digest says, unless a BlobErased
    event records its erasure: erased is reported, tampered fails."""

    async def check(connection: asyncpg.Connection, head_position: int, head_hash: bytes) -> str | None:
        erased = 0
        for row in await connection.fetch(_BLOBS_SQL):
            if row["altered"]:
                return f"blob {row['digest']} (named at position {row['position']}) does not match its digest: tampered"
            if row["missing"] and row["erased"] and row["kind"] == "upload":
                erased += 1
                continue
            return f"blob {row['digest']} (named at position {row['position']}) is missing and was not erased: tampered"
        stray = await connection.fetch(
            "SELECT encode(sha256, 'hex') AS digest FROM blobs WHERE sha256(content) <> sha256"
            " ORDER BY stored_at, sha256"
        )
        if stray:
            return (f"blob {stray[0]['digest']} (named by no event) does not match its digest: tampered"
                    f" ({len(stray)} such blob(s))")
        notes.append(f"original uploads: all present and intact, {erased} erased (recorded by BlobErased)")
        return None

    return check


class ReceiptEvent(msgspec.Struct):
    position: int
    hash: str
    type: str | None = None
    stream_version: int | None = None


class ChainHead(msgspec.Struct):
    position: int
    hash: str


class Receipt(msgspec.Struct):
    log_id: str
    events: list[ReceiptEvent]
    head: ChainHead
    stream_id: str | None = None


def load_receipt(path: Path) -> Receipt:
    """A receipt, or a whole POST /prediction/ answer (or problem) that carries one."""
    document: Any = msgspec.json.decode(path.read_bytes())
    if isinstance(document, dict) and "receipt" in document:
        document = document["receipt"]
    return msgspec.convert(document, Receipt)


def receipt(given: Receipt, notes: list[str]) -> OutsideCheck:
    async def check(connection: asyncpg.Connection, head_position: int, head_hash: bytes) -> str | None:
        log_id = str(await connection.fetchval("SELECT log_id FROM log_identity"))
        if given.log_id != log_id:
            return f"the receipt is for log {given.log_id}, this is log {log_id}"
        for position, expected, what in [
            *((e.position, e.hash, f"event {e.type or ''} at {e.position}") for e in given.events),
            (given.head.position, given.head.hash, f"chain head {given.head.position}"),
        ]:
            stored = await connection.fetchval("SELECT hash FROM events WHERE position = $1", position)
            if stored is None:
                return f"receipt: the log has no position {position} ({what})"
            if bytes(stored).hex() != expected:
                return f"receipt: {what} has hash {bytes(stored).hex()} in the log, the receipt says {expected}"
        if given.stream_id is not None:
            streams = {
                str(row["stream_id"])
                for row in await connection.fetch(
                    "SELECT stream_id FROM events WHERE position = ANY($1::bigint[])", [e.position for e in given.events]
                )
            }
            if streams != {given.stream_id}:
                return f"receipt: its events are not in stream {given.stream_id}"
        notes.append(f"receipt: {len(given.events)} event(s) and the head at {given.head.position} match the log")
        return None

    return check
