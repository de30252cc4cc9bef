"""Signed chain-head checkpoints kept outside the database: the format. Pure.

A superuser could rewrite the chain forward from an edit so that it verifies again; a chain head
signed with a key the database never holds, and kept outside it, pins what the log was. Any
rewrite at or before a checkpointed position changes the hash stored at that position.
"""

from __future__ import annotations

import msgspec

FORMAT = "prediction-audit-checkpoint/v1"


class ChainCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    log_id: str
    position: int
    hash: str  # hex sha256 of the event at `position`
    signed_at: str  # ISO 8601, UTC
    key_id: str  # first 16 hex of sha256(raw Ed25519 public key)
    format: str = FORMAT


class SignedCheckpoint(msgspec.Struct, frozen=True, kw_only=True):
    checkpoint: ChainCheckpoint
    signature: str  # hex Ed25519 signature of signing_bytes(checkpoint)


def signing_bytes(checkpoint: ChainCheckpoint) -> bytes:
    c = checkpoint
    return f"{c.format}|{c.log_id}|{c.position}|{c.hash}|{c.signed_at}|{c.key_id}".encode()
