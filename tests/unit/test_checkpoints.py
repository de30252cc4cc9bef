"""Signing and opening C2SP checkpoints with Ed25519 (projections/checkpoints.py)."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from domain.merkle import EMPTY_ROOT, leaf_hash
from domain.signed_note import Checkpoint, NoteError, parse_signed_note
from projections.checkpoints import (
    NoteKey,
    chain_head_of,
    filed_checkpoints,
    file_checkpoint,
    load_or_create_key,
    open_checkpoint,
    retired_keys,
    rotate_key,
    sign_checkpoint,
)

ORIGIN = "example.com/audit-log"
CHECKPOINT = Checkpoint(ORIGIN, 5, leaf_hash(b"root"), ("chain-head " + "ab" * 32,))


@pytest.fixture
def key() -> NoteKey:
    return NoteKey(ORIGIN, Ed25519PrivateKey.generate())


def test_a_signed_checkpoint_opens_with_its_verifier_key(key):
    note = sign_checkpoint(CHECKPOINT, [key])
    assert note.startswith(f"{ORIGIN}\n5\n{base64.b64encode(CHECKPOINT.root_hash).decode()}\nchain-head ")
    assert "\n\n\u2014 " + ORIGIN + " " in note
    assert open_checkpoint(note, [key.verifier_key]) == CHECKPOINT
    assert chain_head_of(CHECKPOINT) == bytes.fromhex("ab" * 32)
    assert chain_head_of(Checkpoint(ORIGIN, 0, EMPTY_ROOT)) is None


def test_a_flipped_byte_in_the_body_or_the_signature_fails(key):
    note = sign_checkpoint(CHECKPOINT, [key])
    body, signatures = note.split("\n\n")
    tampered_body = body.replace("\n5\n", "\n6\n") + "\n\n" + signatures
    with pytest.raises(NoteError, match="does not verify"):
        open_checkpoint(tampered_body, [key.verifier_key])
    _, [signature] = parse_signed_note(note)
    raw = bytearray(signature.key_hash + signature.signature)
    raw[-1] ^= 1
    flipped = body + "\n\n\u2014 " + ORIGIN + " " + base64.b64encode(bytes(raw)).decode() + "\n"
    with pytest.raises(NoteError, match="does not verify"):
        open_checkpoint(flipped, [key.verifier_key])


def test_an_unknown_key_is_refused_and_a_cosigner_is_ignored(key):
    stranger = NoteKey(ORIGIN, Ed25519PrivateKey.generate())
    with pytest.raises(NoteError, match="no trusted key"):
        open_checkpoint(sign_checkpoint(CHECKPOINT, [stranger]), [key.verifier_key])
    witness = NoteKey("witness.example", Ed25519PrivateKey.generate())
    cosigned = sign_checkpoint(CHECKPOINT, [key, witness])
    assert open_checkpoint(cosigned, [key.verifier_key]) == CHECKPOINT


def test_rotation_keeps_the_old_key_next_to_the_new_one(tmp_path):
    path = tmp_path / "key.pem"
    first = NoteKey(ORIGIN, load_or_create_key(path))
    retired, new = rotate_key(path, ORIGIN)
    assert retired == first.verifier_key and new == NoteKey(ORIGIN, load_or_create_key(path)).verifier_key
    assert [NoteKey(ORIGIN, k).verifier_key for k in retired_keys(path)] == [retired]
    assert path.stat().st_mode & 0o777 == 0o600


def test_checkpoints_kept_outside_the_database(tmp_path, key):
    notes = [sign_checkpoint(Checkpoint(ORIGIN, size, leaf_hash(bytes([size]))), [key]) for size in (1, 2, 3)]
    file_checkpoint(tmp_path, "log", 1, notes[0], append_history=True)
    file_checkpoint(tmp_path, "log", 2, notes[1], append_history=False)
    file_checkpoint(tmp_path, "log", 3, notes[2], append_history=True)
    assert filed_checkpoints(tmp_path, "log") == [notes[0], notes[2], notes[2]]  # history, then the latest
    assert filed_checkpoints(tmp_path, "other") == []
