"""Erasure: delete an original upload (retention, right to erasure) without breaking
the chain. The chain covers the blob's digest, not its bytes, so every hash still verifies; a
BlobErased event, appended in the same transaction as the DELETE, records that and why, so verify
tells an erased blob from a tampered one."""

from __future__ import annotations

import hashlib
import re

import asyncpg

from db.store import AppendRequest, Committed, EventStore, VersionConflict
from domain.events import BlobErased
from domain.streams import erasure_stream_id


class ErasureRefused(Exception):
    pass


async def erase(owner_dsn: str, digest_hex: str, reason: str) -> Committed:
    if not re.fullmatch(r"[0-9a-f]{64}", digest_hex):
        raise ErasureRefused("the digest must be 64 lowercase hex characters (sha256)")
    pool = await asyncpg.create_pool(owner_dsn, min_size=1, max_size=2)
    try:
        uploaded = await pool.fetchval(
            "SELECT count(*) FROM events WHERE event_type = 'PredictionRequested' "
            "AND data::jsonb ->> 'blob_sha256' = $1",
            digest_hex,
        )
        if not uploaded:
            raise ErasureRefused(f"no upload has digest {digest_hex} (model artifacts are not erasable)")
        content = await pool.fetchval("SELECT content FROM blobs WHERE sha256 = $1", bytes.fromhex(digest_hex))
        if content is not None and hashlib.sha256(content).hexdigest() != digest_hex:
            raise ErasureRefused("the stored bytes do not match their digest: investigate before erasing")
        request = AppendRequest(
            stream_id=erasure_stream_id(digest_hex),
            expected_version=0,
            events=[BlobErased(blob_sha256=digest_hex, reason=reason)],
            metadata={"client": "just erase"},
            erase_blobs=[bytes.fromhex(digest_hex)],
        )
        (outcome,) = await EventStore(pool).append([request])
    finally:
        await pool.close()
    if isinstance(outcome, VersionConflict):
        raise ErasureRefused(f"blob {digest_hex} was already erased")
    if not isinstance(outcome, Committed):
        raise ErasureRefused(f"the erasure was not recorded: {outcome}")
    return outcome
