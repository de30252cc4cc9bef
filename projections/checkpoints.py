"""Ed25519-signed chain heads, written outside the database by the active projection worker.

Layout: `CHECKPOINT_DIR/<log id>/latest.json` (replaced atomically at most every `interval_s`
while the log grows) and `history.ndjson` (one signed checkpoint appended every `history_s`).
The private key lives in a file the database never sees (`CHECKPOINT_KEY`, created 0600 on first
use); verification derives the public key from it, or takes one explicitly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from domain.checkpoints import FORMAT, ChainCheckpoint, SignedCheckpoint, signing_bytes

log = logging.getLogger(__name__)

LATEST = "latest.json"
HISTORY = "history.ndjson"


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    try:
        os.link(temporary, path)  # never replaces a key another process created meanwhile
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    return load_or_create_key(path)


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, log_id: str, position: int, hash_hex: str) -> SignedCheckpoint:
    checkpoint = ChainCheckpoint(
        log_id=log_id,
        position=position,
        hash=hash_hex,
        signed_at=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        key_id=key_id(key.public_key()),
    )
    return SignedCheckpoint(checkpoint=checkpoint, signature=key.sign(signing_bytes(checkpoint)).hex())


def signature_ok(public_key: Ed25519PublicKey, signed: SignedCheckpoint) -> bool:
    try:
        public_key.verify(bytes.fromhex(signed.signature), signing_bytes(signed.checkpoint))
    except (InvalidSignature, ValueError):
        return False
    return signed.checkpoint.format == FORMAT


def write(directory: Path, signed: SignedCheckpoint, *, append_history: bool) -> None:
    folder = directory / signed.checkpoint.log_id
    folder.mkdir(parents=True, exist_ok=True)
    encoded = msgspec.json.encode(signed)
    temporary = folder / f".{LATEST}.{os.getpid()}.tmp"
    with open(temporary, "wb") as file:
        file.write(encoded)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, folder / LATEST)
    if append_history:
        with open(folder / HISTORY, "ab") as file:
            file.write(encoded + b"\n")
            file.flush()
            os.fsync(file.fileno())


def read_all(directory: Path, log_id: str) -> list[SignedCheckpoint]:
    """Every checkpoint kept for this log (history first, then latest). Unparseable entries raise."""
    folder = directory / log_id
    found: list[SignedCheckpoint] = []
    if (folder / HISTORY).exists():
        for line in (folder / HISTORY).read_bytes().splitlines():
            if line.strip():
                found.append(msgspec.json.decode(line, type=SignedCheckpoint))
    if (folder / LATEST).exists():
        found.append(msgspec.json.decode((folder / LATEST).read_bytes(), type=SignedCheckpoint))
    return found


class CheckpointProblem(msgspec.Struct, frozen=True):
    position: int
    reason: str


async def check_against_log(
    connection: asyncpg.Connection, directory: Path, log_id: str, public_key: Ed25519PublicKey
) -> tuple[int, list[CheckpointProblem]]:
    """(checkpoints checked, problems): each must be signed by the key and name the hash the log
    holds at its position."""
    try:
        checkpoints = read_all(directory, log_id)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        return 0, [CheckpointProblem(0, f"a checkpoint file of log {log_id} is unreadable: {error}")]
    expected_key = key_id(public_key)
    problems: list[CheckpointProblem] = []
    for signed in checkpoints:
        c = signed.checkpoint
        if c.log_id != log_id:
            problems.append(CheckpointProblem(c.position, f"checkpoint names log {c.log_id}, not {log_id}"))
        elif c.key_id != expected_key or not signature_ok(public_key, signed):
            problems.append(CheckpointProblem(c.position, "checkpoint signature is not valid for this key"))
        else:
            stored = await connection.fetchval("SELECT hash FROM events WHERE position = $1", c.position)
            if stored is None:
                problems.append(CheckpointProblem(c.position, "the log no longer has the checkpointed position"))
            elif bytes(stored).hex() != c.hash:
                problems.append(CheckpointProblem(
                    c.position, f"the log's hash at {c.position} differs from the signed checkpoint (rewritten)"
                ))
    return len(checkpoints), problems


class ChainHeadCheckpointer:
    """The projection worker's `on_applied` hook: signs the head it has applied, at most every
    `interval_s` (and once more after a quiet spell, so the last head is always covered)."""

    def __init__(
        self, dsn: str, directory: Path, key: Ed25519PrivateKey, *, interval_s: float = 1.0, history_s: float = 60.0
    ) -> None:
        self._dsn = dsn
        self._directory = directory
        self._key = key
        self._interval_s = interval_s
        self._history_s = history_s
        self._pending: int | None = None
        self._written = 0
        self._last_history = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._log_id: str | None = None

    def on_applied(self, position: int, count: int) -> None:
        if position > self._written:
            self._pending = position
            self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="chain-head-checkpoints")

    async def stop(self) -> None:
        """Write the last applied head, then stop."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        if self._pending is not None:
            try:
                await self._write(self._pending)
            except Exception:  # shutting down: the next active worker checkpoints again
                log.warning("could not write the final chain-head checkpoint", exc_info=True)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            position = self._pending
            if position is None or position <= self._written:
                continue
            try:
                await self._write(position)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("chain-head checkpoint at %d failed (%s); retrying", position, error)
                self._wake.set()
            await asyncio.sleep(self._interval_s)

    async def _write(self, position: int) -> None:
        connection = await asyncpg.connect(self._dsn, timeout=5)
        try:
            if self._log_id is None:
                self._log_id = str(await connection.fetchval("SELECT log_id FROM log_identity"))
            stored = await connection.fetchval("SELECT hash FROM events WHERE position = $1", position)
        finally:
            await connection.close()
        if stored is None:
            return
        now = time.monotonic()
        append_history = now - self._last_history >= self._history_s
        signed = sign(self._key, self._log_id, position, bytes(stored).hex())
        await asyncio.to_thread(write, self._directory, signed, append_history=append_history)
        if append_history:
            self._last_history = now
        self._written = position
        if self._pending == position:
            self._pending = None
