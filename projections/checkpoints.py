"""Signed checkpoints of the Merkle tree: C2SP tlog-checkpoint notes signed with Ed25519 keys the
database never holds, and the copies kept outside the database.

Layout outside the database: `CHECKPOINT_DIR/<log id>/checkpoint` (the latest note, replaced
atomically) and `checkpoints.ndjson` (one `{"tree_size", "note"}` line at most every `history_s`).
The private key is a file (`CHECKPOINT_KEY`, PEM, created 0600 on first use); `just rotate-key`
moves it aside as `<CHECKPOINT_KEY>.retired-<key hash>` and makes a new one. Verifiers trust the
current key and the retired ones (and any verifier key they are given), never keys read from the
database, which whoever rewrote the log could have rewritten too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from domain.signed_note import (
    Checkpoint,
    NoteError,
    format_checkpoint,
    format_signed_note,
    key_hash,
    parse_checkpoint,
    parse_signed_note,
    parse_verifier_key,
    verifier_key,
)

LATEST = "checkpoint"
HISTORY = "checkpoints.ndjson"
CHAIN_HEAD = "chain-head "  # the extension line naming the hash chain's head at the tree size
RETIRED = ".retired-"


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        return load_key(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    _write_private(temporary, key)
    try:
        os.link(temporary, path)  # never replaces a key another process created meanwhile
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    return load_key(path)


def load_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def _write_private(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
        file.flush()
        os.fsync(file.fileno())


def retired_keys(path: Path) -> list[Ed25519PrivateKey]:
    """The keys `rotate_key` moved aside next to `path`, oldest first."""
    found = sorted(path.parent.glob(path.name + RETIRED + "*"), key=lambda p: p.stat().st_mtime_ns)
    return [load_key(p) for p in found]


def rotate_key(path: Path, name: str) -> tuple[str, str]:
    """Move the current key aside and make a new one; (retired, new) verifier keys.

    The integrator notices the new file before its next signature, signs that checkpoint with
    both keys (so a verifier holding either can follow the rotation) and the new one afterwards.
    """
    old = load_or_create_key(path)
    old_verifier = NoteKey(name, old).verifier_key
    retired = path.with_name(path.name + RETIRED + NoteKey(name, old).key_hash.hex())
    new = Ed25519PrivateKey.generate()
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    _write_private(temporary, new)
    os.link(path, retired)
    os.replace(temporary, path)
    return old_verifier, NoteKey(name, new).verifier_key


def public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class NoteKey:
    """A signing key under a signed-note key name (this log's origin)."""

    def __init__(self, name: str, key: Ed25519PrivateKey) -> None:
        self.name = name
        self.private = key
        self.public = public_bytes(key)
        self.key_hash = key_hash(name, self.public)
        self.verifier_key = verifier_key(name, self.public)

    def sign(self, text: str) -> tuple[str, bytes, bytes]:
        return self.name, self.key_hash, self.private.sign(text.encode())


def sign_checkpoint(checkpoint: Checkpoint, keys: Sequence[NoteKey]) -> str:
    text = format_checkpoint(checkpoint)
    return format_signed_note(text, [key.sign(text) for key in keys])


def open_checkpoint(note: str | bytes, trusted: Iterable[str]) -> Checkpoint:
    """The checkpoint of a note signed by at least one trusted verifier key; NoteError otherwise.

    Signatures by keys the caller does not know are ignored, as the signed-note spec says (a
    witness may have cosigned); a signature by a trusted key that does not verify is an error.
    """
    keys = {}
    for text in trusted:
        name, digest, public = parse_verifier_key(text)
        keys[(name, digest)] = Ed25519PublicKey.from_public_bytes(public)
    body, signatures = parse_signed_note(note)
    verified = 0
    for signature in signatures:
        public_key = keys.get((signature.name, signature.key_hash))
        if public_key is None:
            continue
        try:
            public_key.verify(signature.signature, body.encode())
        except InvalidSignature:
            raise NoteError(f"the signature by {signature.name} ({signature.key_hash.hex()}) does not verify") from None
        verified += 1
    if not verified:
        raise NoteError("the note is signed by no trusted key")
    return parse_checkpoint(body)


def chain_head_of(checkpoint: Checkpoint) -> bytes | None:
    for line in checkpoint.extensions:
        if line.startswith(CHAIN_HEAD):
            try:
                return bytes.fromhex(line[len(CHAIN_HEAD):])
            except ValueError:
                return None
    return None


class FiledCheckpoint(msgspec.Struct, frozen=True):
    tree_size: int
    note: str


def file_checkpoint(directory: Path, log_id: str, tree_size: int, note: str, *, append_history: bool) -> None:
    """Keep a signed note outside the database: the latest, and now and then the history."""
    folder = directory / log_id
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{LATEST}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(note)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, folder / LATEST)
    if append_history:
        with open(folder / HISTORY, "ab") as file:
            file.write(msgspec.json.encode(FiledCheckpoint(tree_size, note)) + b"\n")
            file.flush()
            os.fsync(file.fileno())


def filed_checkpoints(directory: Path, log_id: str) -> list[str]:
    """Every note kept outside the database for this log: the history, then the latest."""
    folder = directory / log_id
    notes: list[str] = []
    if (folder / HISTORY).exists():
        for line in (folder / HISTORY).read_bytes().splitlines():
            if line.strip():
                notes.append(msgspec.json.decode(line, type=FiledCheckpoint).note)
    if (folder / LATEST).exists():
        notes.append((folder / LATEST).read_text(encoding="utf-8"))
    return notes
