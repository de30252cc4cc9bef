"""C2SP signed notes and tlog checkpoints (domain/signed_note.py).

The format is pinned to the real world: Go's published sum.golang.org verifier key, and a
checkpoint that sum.golang.org signed (size 65664258), whose Ed25519 signature verifies with that
key, so our parser reads exactly the bytes Go signs. Signing happens here with `cryptography`,
as it will in the app: domain/ never imports a crypto library.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from domain.merkle import EMPTY_ROOT, TreeBuilder, consistency_proof, leaf_hash, verify_consistency
from domain.signed_note import (
    MAX_SIGNATURES,
    Checkpoint,
    NoteError,
    Signature,
    format_checkpoint,
    format_signed_note,
    key_hash,
    parse_checkpoint,
    parse_signed_note,
    parse_verifier_key,
    verifier_key,
)

# Published by Go (the default GOSUMDB key, golang.org/x/mod/sumdb).
SUMDB_KEY = "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ux18htTTAD8OuAn8"
# A checkpoint served by sum.golang.org at tree size 65664258; its signature checks with SUMDB_KEY.
SUMDB_NOTE = (
    "go.sum database tree\n65664258\nWVVNVD2qx+fTq31zkj6UAqxT5X6HvGphGM+o8Thnbsg=\n\n"
    "\u2014 sum.golang.org "
    "Az3grligJmgX7KGyGPKybykNTh3VgsbLvUuvOwrM5zLVlulmFp2wdvbxOw74/gcNxURShXEpb7RXcs3+BYflYN+w0gQ=\n"
)
# The example of the signed-note spec: its text has a blank line of its own.
SPEC_NOTE = (
    "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned è subito sera.\n\n"
    "\u2014 quasimodo.example/salvatore "
    "NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
)


def raw_public_key(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sign(text: str, name: str, private: Ed25519PrivateKey) -> Signature:
    return Signature(name, key_hash(name, raw_public_key(private)), private.sign(text.encode()))


def verified(note: str, trusted: dict[tuple[str, bytes], bytes]) -> tuple[str, list[str]]:
    """What a caller outside domain/ does: parse, skip unknown keys, verify the known ones."""
    text, signatures = parse_signed_note(note)
    good = []
    for name, digest, signature in signatures:
        if (public := trusted.get((name, digest))) is not None:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, text.encode())
            good.append(name)
    if not good:
        raise InvalidSignature("no trusted key signed this note")
    return text, good


# --- keys ---------------------------------------------------------------------------------------


def test_go_sumdb_verifier_key_and_its_key_hash():
    name, digest, public = parse_verifier_key(SUMDB_KEY)
    assert name == "sum.golang.org" and digest.hex() == "033de0ae" and len(public) == 32
    assert key_hash(name, public) == digest
    assert verifier_key(name, public) == SUMDB_KEY


def test_a_go_sumdb_checkpoint_verifies_and_reformats_byte_for_byte():
    name, digest, public = parse_verifier_key(SUMDB_KEY)
    text, good = verified(SUMDB_NOTE, {(name, digest): public})
    assert good == ["sum.golang.org"]
    checkpoint = parse_checkpoint(text)
    assert checkpoint == Checkpoint("go.sum database tree", 65664258,
                                    base64.b64decode("WVVNVD2qx+fTq31zkj6UAqxT5X6HvGphGM+o8Thnbsg="))
    assert format_checkpoint(checkpoint) == text
    _, signatures = parse_signed_note(SUMDB_NOTE)
    assert [(s.name, s.key_hash.hex(), len(s.signature)) for s in signatures] == [("sum.golang.org", "033de0ae", 64)]
    assert format_signed_note(text, signatures) == SUMDB_NOTE
    with pytest.raises(InvalidSignature):
        verified(SUMDB_NOTE.replace("65664258", "65664259"), {(name, digest): public})


@pytest.mark.parametrize("text", [
    SUMDB_KEY.replace("033de0ae", "033de0af"),  # the stated hash is not the key's
    SUMDB_KEY.replace("033de0ae", "33de0ae"),
    SUMDB_KEY.replace("+033de0ae+", "+033de0ae"),
    "sum.golang.org+033de0ae+Ac4zctda0e5eza+HJyk9SxEdh+s3Ady8lq3K3SKxKk3",  # a mistyped key: not base64 of 33 bytes
    SUMDB_KEY.replace("+Ac4z", "+Ac4z "),
    SUMDB_KEY.replace("+Ac4", "+Ag4"),  # another signature type
    "sum.golang.org",
    "+033de0ae+" + SUMDB_KEY.split("+", 2)[2],  # no name
    "sum golang+033de0ae+" + SUMDB_KEY.split("+", 2)[2],
    "sum.golang.org+033de0ae+" + base64.b64encode(b"\x01" + bytes(31)).decode(),
])
def test_malformed_verifier_keys_are_refused(text):
    with pytest.raises(NoteError):
        parse_verifier_key(text)


def test_verifier_keys_round_trip():
    public = raw_public_key(Ed25519PrivateKey.generate())
    text = verifier_key("audit.example/log", public)
    assert parse_verifier_key(text) == ("audit.example/log", key_hash("audit.example/log", public), public)


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\u00a0b", "a\u2003b", "a\tb", "a\x01b", "a\nb"])
def test_key_names_have_no_spaces_or_plus(name):
    with pytest.raises(NoteError):
        key_hash(name, bytes(32))


def test_key_hash_needs_a_32_byte_key():
    with pytest.raises(NoteError):
        key_hash("name", bytes(33))


# --- signed notes -------------------------------------------------------------------------------


def test_a_checkpoint_signed_with_ed25519_verifies_through_the_format():
    log_key, witness_key, stranger = (Ed25519PrivateKey.generate() for _ in range(3))
    builder = TreeBuilder()
    for i in range(1000):
        builder.append(leaf_hash(str(i).encode()))
    text = format_checkpoint(Checkpoint("audit.example/predictions", builder.size, builder.root()))
    note = format_signed_note(text, [sign(text, "audit.example/predictions", log_key),
                                     sign(text, "witness.example", witness_key)])
    assert note.startswith(text + "\n\u2014 audit.example/predictions ")
    trusted = {("audit.example/predictions", key_hash("audit.example/predictions", raw_public_key(log_key))):
               raw_public_key(log_key)}
    read, good = verified(note, trusted)  # the witness's key is unknown here: ignored, not an error
    assert good == ["audit.example/predictions"] and parse_checkpoint(read).size == 1000
    with pytest.raises(InvalidSignature):
        verified(note.replace("\n1000\n", "\n1001\n"), trusted)
    # a stranger's signature under the log's name has another key hash: it is not even tried
    forged = format_signed_note(text, [sign(text, "audit.example/predictions", stranger)])
    with pytest.raises(InvalidSignature):
        verified(forged, trusted)


def test_two_checkpoints_of_one_log_are_consistent():
    hashes = [leaf_hash(bytes([i])) for i in range(20)]
    builder, texts = TreeBuilder(), []
    for h in hashes:
        builder.append(h)
        if builder.size in (7, 20):
            texts.append(format_checkpoint(Checkpoint("o", builder.size, builder.root())))
    old, new = (parse_checkpoint(t) for t in texts)
    verify_consistency(old.size, new.size, old.root_hash, new.root_hash, consistency_proof(old.size, hashes))


def test_the_text_ends_at_the_last_blank_line():
    text, signatures = parse_signed_note(SPEC_NOTE)
    assert text == "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned è subito sera.\n"
    assert [(s.name, len(s.key_hash), len(s.signature)) for s in signatures] == [("quasimodo.example/salvatore", 4, 64)]
    assert format_signed_note(text, signatures) == SPEC_NOTE
    assert parse_signed_note(SPEC_NOTE.encode()) == (text, signatures)


SIG = base64.b64encode(bytes(4) + b"signature").decode()


@pytest.mark.parametrize("note", [
    "text\n",  # no signatures
    "text\n\n",  # a blank line and nothing after it
    f"text\n\u2014 k {SIG}\n",  # no blank line
    f"text\n\n\u2014 k {SIG}",  # the last line is not ended
    f"text\n\n- k {SIG}\n",  # a hyphen, not the em dash
    f"text\n\n\u2014k {SIG}\n",
    f"text\n\n\u2013 k {SIG}\n",  # an en dash
    f"text\n\n\u2014 k  {SIG}\n", f"text\n\n\u2014  k {SIG}\n", f"text\n\n\u2014 k{SIG}\n",
    f"text\n\n\u2014 k+1 {SIG}\n", f"text\n\n\u2014 k\u00a0x {SIG}\n",
    f"text\n\n\u2014 k {SIG} \n", f"text\n\n\u2014 k {SIG}\n\n", f"text\n\n\u2014 k {SIG}\nnot a signature\n",
    f"text\n\n\u2014 k {SIG[:-1]}\n",  # not base64
    f"text\n\n\u2014 k {SIG.replace('=', '')}\n",  # padding left out
    "text\n\n\u2014 k AAAAAAB=\n",  # non-canonical: the padding bits are not zero
    f"text\n\n\u2014 k {base64.b64encode(bytes(4)).decode()}\n",  # a key hash and no signature
    f"text\n\n\u2014 k {base64.b64encode(bytes(4) + b'x').decode()}\n\u2014 k {SIG}\n",  # one key twice
    f"te\txt\n\n\u2014 k {SIG}\n", f"text\r\n\n\u2014 k {SIG}\n", f"text\x00\n\n\u2014 k {SIG}\n",
    f"text\ud800\n\n\u2014 k {SIG}\n",  # not UTF-8
    b"text\xff\n\n\xe2\x80\x94 k " + SIG.encode() + b"\n",
    "text\n\n" + "".join(f"\u2014 k{i} {SIG}\n" for i in range(MAX_SIGNATURES + 1)),
])
def test_malformed_notes_are_refused(note):
    with pytest.raises(NoteError):
        parse_signed_note(note)


def test_a_note_may_carry_up_to_the_limit_of_signatures():
    note = "text\n\n" + "".join(f"\u2014 k{i} {SIG}\n" for i in range(MAX_SIGNATURES))
    assert len(parse_signed_note(note)[1]) == MAX_SIGNATURES


@pytest.mark.parametrize("text, signatures", [
    ("no final newline", [("k", bytes(4), b"s")]),
    ("text\n", []),
    ("text\n", [("k", bytes(4), b"s")] * (MAX_SIGNATURES + 1)),
    ("text\n", [("k k", bytes(4), b"s")]),
    ("text\n", [("k", bytes(3), b"s")]),
    ("text\n", [("k", bytes(4), b"")]),
    ("te\rxt\n", [("k", bytes(4), b"s")]),
])
def test_formatting_refuses_what_could_not_be_parsed(text, signatures):
    with pytest.raises(NoteError):
        format_signed_note(text, signatures)


note_texts = st.lists(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30), min_size=1, max_size=6,
).map(lambda lines: "\n".join(lines) + "\n")
key_names = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters="+\x85"),
                    min_size=1, max_size=20)
signatures = st.lists(st.tuples(key_names, st.binary(min_size=4, max_size=4), st.binary(min_size=1, max_size=80)),
                      min_size=1, max_size=5, unique_by=lambda s: (s[0], s[1]))


@given(note_texts, signatures)
def test_signed_notes_round_trip(text, sigs):
    text_back, sigs_back = parse_signed_note(format_signed_note(text, sigs))
    assert text_back == text and sigs_back == [Signature(*s) for s in sigs]


# --- checkpoints --------------------------------------------------------------------------------


def test_the_tlog_checkpoint_spec_example_parses():
    text = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    checkpoint = parse_checkpoint(text)
    assert (checkpoint.origin, checkpoint.size, len(checkpoint.root_hash), checkpoint.extensions) == \
        ("example.com/behind-the-sofa", 20852163, 32, ())


@given(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40),
       st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32),
       st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20), max_size=3))
def test_checkpoints_round_trip(origin, size, root_hash, extensions):
    checkpoint = Checkpoint(origin, size, root_hash, tuple(extensions))
    text = format_checkpoint(checkpoint)
    assert parse_checkpoint(text) == checkpoint and format_checkpoint(parse_checkpoint(text)) == text


def test_the_empty_tree_has_size_zero():
    text = format_checkpoint(Checkpoint("o", 0, EMPTY_ROOT))
    assert text == "o\n0\n47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n"
    assert parse_checkpoint(text).size == 0


ROOT = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize("text", [
    f"o\n12\n{ROOT}",  # no final newline
    "o\n12\n", f"o\n{ROOT}\n",  # fewer than three lines
    f"\n12\n{ROOT}\n",  # no origin
    f"o\n012\n{ROOT}\n", f"o\n00\n{ROOT}\n", f"o\n+12\n{ROOT}\n", f"o\n-1\n{ROOT}\n", f"o\n 12\n{ROOT}\n",
    f"o\n1_000\n{ROOT}\n", f"o\n\u0661\u0662\n{ROOT}\n", f"o\n\n{ROOT}\n", f"o\n{2**64}\n{ROOT}\n",
    f"o\n12\n{base64.b64encode(bytes(31)).decode()}\n", f"o\n12\n{bytes(32).hex()}\n",
    f"o\n12\n{ROOT.rstrip('=')}\n", f"o\n12\n{ROOT[:-2]}B=\n",  # unpadded; non-canonical
    f"o\n12\n{ROOT}\n\n", f"o\n12\n{ROOT}\next\n\n",  # empty extension lines
    f"o\r\n12\n{ROOT}\n", f"o\n12\n{ROOT}\nex\tt\n",
])
def test_malformed_checkpoints_are_refused(text):
    with pytest.raises(NoteError):
        parse_checkpoint(text)


@pytest.mark.parametrize("checkpoint", [
    Checkpoint("", 1, bytes(32)), Checkpoint("a\nb", 1, bytes(32)), Checkpoint("o", -1, bytes(32)),
    Checkpoint("o", 2**64, bytes(32)), Checkpoint("o", True, bytes(32)), Checkpoint("o", 1, bytes(31)),
    Checkpoint("o", 1, bytes(32), ("",)), Checkpoint("o", 1, bytes(32), ("a\nb",)),
])
def test_checkpoints_that_cannot_be_formatted(checkpoint):
    with pytest.raises(NoteError):
        format_checkpoint(checkpoint)
