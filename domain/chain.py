"""The hash chain over the event log: canonical bytes and links. Pure.

Every event's hash is ``sha256(previous hash ‖ canonical bytes)``; the first event links to 32
zero bytes. The canonical bytes cover every column but the hash itself::

    b"<position>|<stream_id>|<stream_version>|<event_type>|<schema_version>|<recorded_at_us>|"
    b"<len(data)>|<len(metadata)>|" + data + metadata

where ``stream_id`` is the lowercase hyphenated UUID, ``recorded_at_us`` is microseconds since the
Unix epoch (UTC), ``data`` and ``metadata`` are the exact UTF-8 bytes of the stored JSON texts,
and the lengths are byte counts. Header fields cannot contain ``|`` (the event type is an
identifier), and the lengths make the split of the two JSON texts unambiguous, so any change to
any column, an added JSON key included, changes the hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

import msgspec

GENESIS_HASH = bytes(32)
# A transparency-log entry bundle gives each leaf a 2-byte length, so no event's canonical bytes may
# exceed 65,535. The header (position, stream id, versions, type, time, lengths) is at most 256
# bytes, which leaves this much for `data` and `metadata` together (the events table checks it too).
MAX_CANONICAL_BYTES = 0xFFFF
MAX_HEADER_BYTES = 256
MAX_PAYLOAD_BYTES = MAX_CANONICAL_BYTES - MAX_HEADER_BYTES
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)


class ChainedRecord(msgspec.Struct, frozen=True):
    """One row of the event log, as the chain sees it."""

    position: int
    stream_id: str
    stream_version: int
    event_type: str
    schema_version: int
    recorded_at_us: int
    data: str
    metadata: str


def to_microseconds(moment: datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding)."""
    return (moment - _EPOCH) // _MICROSECOND


def from_microseconds(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def canonical_bytes(record: ChainedRecord) -> bytes:
    data = record.data.encode()
    metadata = record.metadata.encode()
    header = (
        f"{record.position}|{record.stream_id}|{record.stream_version}|{record.event_type}|"
        f"{record.schema_version}|{record.recorded_at_us}|{len(data)}|{len(metadata)}|"
    )
    return header.encode() + data + metadata


def link(previous_hash: bytes, record: ChainedRecord) -> bytes:
    return hashlib.sha256(previous_hash + canonical_bytes(record)).digest()


class ChainBreak(msgspec.Struct, frozen=True):
    """The first position whose stored hash does not follow from its row and its predecessor."""

    position: int
    reason: str


def find_break(
    rows: Iterable[tuple[ChainedRecord, bytes]],
    previous_hash: bytes = GENESIS_HASH,
    previous_position: int = 0,
) -> tuple[ChainBreak | None, int, bytes]:
    """Walk ``(record, stored hash)`` pairs in position order.

    Returns the first break (or None) and the last verified position and hash, so a caller can
    verify a long log page by page.
    """
    for record, stored_hash in rows:
        if record.position != previous_position + 1:
            return (
                ChainBreak(previous_position + 1, f"missing position (next stored is {record.position})"),
                previous_position,
                previous_hash,
            )
        expected = link(previous_hash, record)
        if expected != stored_hash:
            return (
                ChainBreak(record.position, "hash does not match the row's contents and its predecessor"),
                previous_position,
                previous_hash,
            )
        previous_position, previous_hash = record.position, stored_hash
    return None, previous_position, previous_hash
