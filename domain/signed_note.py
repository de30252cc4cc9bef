"""The text formats of C2SP signed notes (https://c2sp.org/signed-note) and transparency-log
checkpoints (https://c2sp.org/tlog-checkpoint). Pure: no crypto library.

A checkpoint in this format can be checked by the tools of the transparency-log ecosystem
(witnesses, monitors, Go's sumdb client), not only by ours. Signing and verifying Ed25519 is the
caller's job (with `cryptography`, outside domain/): this module only builds and reads the bytes
that are signed (the note text, UTF-8) and the lines that carry signatures and keys.

    <origin>\\n<tree size>\\n<base64 root hash>\\n[<extension line>\\n ...]
    \\n
    — <key name> <base64(4-byte key hash ‖ signature)>\\n   (one line per signature)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

ED25519 = 0x01  # the signature type byte of Ed25519 keys, in key hashes and verifier keys
ED25519_KEY_SIZE = 32
KEY_HASH_SIZE = 4
ROOT_HASH_SIZE = 32
MAX_SIGNATURES = 100  # the spec requires accepting at least 16; a bound keeps parsing cheap
MAX_TREE_SIZE = (1 << 64) - 1
_DASH = "\u2014 "  # em dash and space open every signature line
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")  # every ASCII control character but newline
_TREE_SIZE = re.compile(r"0|[1-9][0-9]{0,19}")  # no leading zeroes; ASCII digits only
_KEY_HASH_HEX = re.compile(r"[0-9a-fA-F]{8}")


class NoteError(ValueError):
    """A note, checkpoint, key name or verifier key is malformed; the message says how."""


class Signature(NamedTuple):
    """One signature line: who signed (name and 4-byte key hash) and the raw signature bytes."""

    name: str
    key_hash: bytes
    signature: bytes


class Checkpoint(msgspec.Struct, frozen=True):
    """The note text of a tlog checkpoint: which log, how many leaves, and the Merkle root."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()


def _b64decode(text: str, what: str) -> bytes:
    """Strict standard base64: the alphabet and padding only, and the one canonical encoding (a
    note whose signature could be re-spelled would have two texts for one signature)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise NoteError(f"{what} is not standard base64: {error}") from None
    if base64.b64encode(raw).decode() != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw


def check_key_name(name: str) -> None:
    """Key names are non-empty and have no Unicode space, no '+' (it separates a verifier key's
    fields) and, like all note text, no control character."""
    if not isinstance(name, str) or not name:
        raise NoteError("a key name is a non-empty string")
    if "+" in name or any(ch.isspace() for ch in name) or _CONTROL.search(name):
        raise NoteError(f"a key name has no spaces, '+' or control characters: {name!r}")


def _check_text(text: str, what: str) -> None:
    if not isinstance(text, str):
        raise NoteError(f"{what} is a str, got {type(text).__name__}")
    if _CONTROL.search(text):
        raise NoteError(f"{what} has a control character other than newline")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteError(f"{what} is not valid UTF-8 (lone surrogate)") from None


def _check_note_text(text: str) -> None:
    _check_text(text, "note text")
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")


def key_hash(name: str, public_key: bytes) -> bytes:
    """The 4-byte key hash of an Ed25519 key: SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key)[:4]."""
    check_key_name(name)
    if not isinstance(public_key, bytes) or len(public_key) != ED25519_KEY_SIZE:
        raise NoteError(f"an Ed25519 public key is {ED25519_KEY_SIZE} bytes")
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public_key).digest()[:KEY_HASH_SIZE]


def verifier_key(name: str, public_key: bytes) -> str:
    """`<name>+<8 hex digits of key hash>+<base64(0x01 ‖ public key)>`, as Go's note package writes it."""
    digest = key_hash(name, public_key)
    return f"{name}+{digest.hex()}+{base64.b64encode(bytes([ED25519]) + public_key).decode()}"


def parse_verifier_key(text: str) -> tuple[str, bytes, bytes]:
    """(name, key hash, 32-byte Ed25519 public key) of a verifier key; the stated key hash must
    be the one the name and key give (a mistyped key is refused here, not at the first note)."""
    if not isinstance(text, str):
        raise NoteError("a verifier key is a str")
    parts = text.split("+", 2)  # base64 has '+' too: only the first two separate fields
    if len(parts) != 3:
        raise NoteError("a verifier key is <name>+<key hash>+<key>")
    name, hash_hex, key_b64 = parts
    check_key_name(name)
    if not _KEY_HASH_HEX.fullmatch(hash_hex):
        raise NoteError(f"a verifier key's hash is 8 hex digits, got {hash_hex!r}")
    key = _b64decode(key_b64, "verifier key")
    if not key or key[0] != ED25519:
        raise NoteError("only Ed25519 verifier keys (type 0x01) are supported")
    if len(key) != 1 + ED25519_KEY_SIZE:
        raise NoteError(f"an Ed25519 verifier key holds {ED25519_KEY_SIZE} bytes, got {len(key) - 1}")
    public_key = key[1:]
    stated = bytes.fromhex(hash_hex)
    if key_hash(name, public_key) != stated:
        raise NoteError("the verifier key's hash does not match its name and key")
    return name, stated, public_key


def format_signed_note(text: str, signatures: Sequence[tuple[str, bytes, bytes]]) -> str:
    """The note text, a blank line, then one `— <name> <base64(key hash ‖ signature)>` line each."""
    _check_note_text(text)
    if not 1 <= len(signatures) <= MAX_SIGNATURES:
        raise NoteError(f"a signed note has 1..{MAX_SIGNATURES} signatures, got {len(signatures)}")
    lines = []
    for name, digest, signature in signatures:
        check_key_name(name)
        if not isinstance(digest, bytes) or len(digest) != KEY_HASH_SIZE:
            raise NoteError(f"a key hash is {KEY_HASH_SIZE} bytes")
        if not isinstance(signature, bytes) or not signature:
            raise NoteError("a signature is non-empty bytes")
        lines.append(f"{_DASH}{name} {base64.b64encode(digest + signature).decode()}\n")
    return text + "\n" + "".join(lines)


def parse_signed_note(note: str | bytes) -> tuple[str, list[Signature]]:
    """Split a signed note into its text (ending with its newline) and its signatures.

    The text ends at the last blank line (the text itself may contain blank lines). Verifying is
    the caller's: look up each (name, key hash) among trusted keys, ignore unknown ones, and verify
    the signature over `text.encode()`. Refused: a note that is not UTF-8 or has control
    characters; no blank line; no signature or more than MAX_SIGNATURES; a line that is not a
    signature line; a bad key name; a signature that is not canonical base64 of 4 + n bytes, n >= 1;
    and (an assumption, stricter than the spec) two signatures by the same name and key hash.
    """
    if isinstance(note, bytes):
        try:
            note = note.decode("utf-8")
        except UnicodeDecodeError as error:
            raise NoteError(f"a signed note is UTF-8: {error}") from None
    _check_text(note, "signed note")
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("a signed note has a blank line between its text and its signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block.endswith("\n"):
        raise NoteError("a signed note ends with a signature line and its newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"a signed note has at most {MAX_SIGNATURES} signatures, got {len(lines)}")
    signatures: list[Signature] = []
    seen: set[tuple[str, bytes]] = set()
    for number, line in enumerate(lines, 1):
        if not line.startswith(_DASH):
            raise NoteError(f"signature line {number} does not start with an em dash and a space")
        name, space, encoded = line[len(_DASH) :].partition(" ")
        if not space:
            raise NoteError(f"signature line {number} has no space between key name and signature")
        check_key_name(name)
        raw = _b64decode(encoded, f"signature line {number}")
        if len(raw) <= KEY_HASH_SIZE:
            raise NoteError(f"signature line {number} holds {len(raw)} bytes, not a key hash and a signature")
        signature = Signature(name, raw[:KEY_HASH_SIZE], raw[KEY_HASH_SIZE:])
        if (signature.name, signature.key_hash) in seen:
            raise NoteError(f"signature line {number} repeats a key ({name}, {signature.key_hash.hex()})")
        seen.add((signature.name, signature.key_hash))
        signatures.append(signature)
    return text, signatures


def format_checkpoint(checkpoint: Checkpoint) -> str:
    """The checkpoint's note text: origin, size, base64 root hash, extension lines, each with \\n."""
    c = checkpoint
    _check_text(c.origin, "origin")
    if not c.origin or "\n" in c.origin:
        raise NoteError("the origin is one non-empty line")
    if not isinstance(c.size, int) or isinstance(c.size, bool) or not 0 <= c.size <= MAX_TREE_SIZE:
        raise NoteError(f"the tree size is an int in [0, 2**64), got {c.size!r}")
    if not isinstance(c.root_hash, bytes) or len(c.root_hash) != ROOT_HASH_SIZE:
        raise NoteError(f"the root hash is {ROOT_HASH_SIZE} bytes")
    for line in c.extensions:
        _check_text(line, "extension line")
        if not line or "\n" in line:
            raise NoteError("an extension line is one non-empty line")
    lines = [c.origin, str(c.size), base64.b64encode(c.root_hash).decode(), *c.extensions]
    return "".join(line + "\n" for line in lines)


def parse_checkpoint(text: str) -> Checkpoint:
    """Read a checkpoint's note text (the `text` of parse_signed_note), refusing any other shape.

    The origin is opaque: the spec recommends a schema-less URL but tells clients not to assume
    one, so any non-empty line is accepted.
    """
    _check_note_text(text)
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("a checkpoint has at least three lines: origin, tree size, root hash")
    origin, size_text, root_text, *extensions = lines
    if not origin:
        raise NoteError("the origin line is empty")
    if not _TREE_SIZE.fullmatch(size_text) or int(size_text) > MAX_TREE_SIZE:
        raise NoteError(f"the tree size is a decimal below 2**64 with no leading zeroes, got {size_text!r}")
    root_hash = _b64decode(root_text, "the root hash")
    if len(root_hash) != ROOT_HASH_SIZE:
        raise NoteError(f"the root hash is {ROOT_HASH_SIZE} bytes, got {len(root_hash)}")
    if any(not line for line in extensions):
        raise NoteError("extension lines are non-empty")
    return Checkpoint(origin, int(size_text), root_hash, tuple(extensions))
