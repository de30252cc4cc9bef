"""Checks `just verify` runs beside the chain and the read-model diff, inside the same snapshot:
signed chain-head checkpoints kept outside the database, the original uploads (erased or
tampered?), and receipts that clients kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from projections.checkpoints import check_against_log
from projections.verify import OutsideCheck


def signed_checkpoints(directory: Path, public_key: Ed25519PublicKey | None, notes: list[str]) -> OutsideCheck:
    async def check(connection: asyncpg.Connection, head_position: int, head_hash: bytes) -> str | None:
        log_id = str(await connection.fetchval("SELECT log_id FROM log_identity"))
        if public_key is None:
            notes.append(f"outside checkpoints: no signing key, none checked (log {log_id})")
            return None
        checked, problems = await check_against_log(connection, directory, log_id, public_key)
        notes.append(f"outside checkpoints: {checked} checked in {directory / log_id}")
        if problems:
            first = problems[0]
            return f"outside checkpoint at position {first.position}: {first.reason}"
        return None

    return check


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
