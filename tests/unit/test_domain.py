"""Pure domain logic: events, upcasting, stream rules, canonical bytes and the chain."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain import events as ev
from domain.chain import GENESIS_HASH, ChainedRecord, canonical_bytes, find_break, from_microseconds, link, to_microseconds
from domain.streams import StreamRuleViolation, check_stream, erasure_stream_id, model_stream_id
from tests.factories import MODEL, prediction_request

def _events():
    requested, made = prediction_request().events
    failed = ev.PredictionFailed(error_code="non_finite_output", message="NaN", model=MODEL, device="cpu")
    return requested, made, failed


def test_events_round_trip_through_their_tagged_encoding():
    for event in _events():
        text = ev.encode_event(event)
        assert msgspec.json.decode(text)["type"] == type(event).__name__
        assert ev.decode_event(ev.event_type(event), 1, text) == event


def test_old_schema_versions_are_upcast_when_read_not_rewritten():
    _, made, _ = _events()
    current = msgspec.json.decode(ev.encode_event(made))
    # Version 1 of this (hypothetical) history called `output` "prediction" and had no queue wait.
    v1 = {k: v for k, v in current.items() if k not in ("output", "queue_wait_ms")} | {"prediction": current["output"]}

    def v1_to_v2(fields):
        fields = dict(fields)
        fields["output"] = fields.pop("prediction")
        fields.setdefault("queue_wait_ms", 0.0)
        return fields

    versions = {**ev.SCHEMA_VERSIONS, "PredictionMade": 2}
    upcast = ev.decode_event(
        "PredictionMade", 1, msgspec.json.encode(v1), versions=versions, upcasters={("PredictionMade", 1): v1_to_v2}
    )
    assert upcast == made
    with pytest.raises(ev.UnknownEvent):
        ev.decode_event("PredictionMade", 1, msgspec.json.encode(v1), versions=versions, upcasters={})
    with pytest.raises(ev.UnknownEvent):
        ev.decode_event("PredictionMade", 3, ev.encode_event(made), versions=versions)
    with pytest.raises(ev.UnknownEvent):
        ev.decode_event("SomethingElse", 1, "{}")


def test_a_prediction_stream_is_a_request_then_exactly_one_outcome():
    requested, made, failed = _events()
    check_stream([], [requested])
    check_stream([], [requested, made])
    check_stream([requested], [failed])
    for bad in ([made], [requested, requested], [requested, made, failed], [requested, made, made], [failed]):
        with pytest.raises(StreamRuleViolation):
            check_stream([], bad)
    registered = ev.ModelRegistered(
        model=MODEL, size_bytes=1, input_shape=[28, 28, 1], output_kind="vector", num_classes=10, runtime={}
    )
    check_stream([], [registered])
    with pytest.raises(StreamRuleViolation):
        check_stream([registered], [requested])
    assert model_stream_id("ab") == model_stream_id("ab") != erasure_stream_id("ab")


def _record(position=1, data='{"a":1}', metadata="{}", **changes):
    fields = dict(
        position=position, stream_id=str(uuid.UUID(int=position)), stream_version=1, event_type="PredictionMade",
        schema_version=1, recorded_at_us=1_700_000_000_000_000, data=data, metadata=metadata,
    )
    return ChainedRecord(**(fields | changes))


def test_canonical_bytes_are_the_documented_format():
    record = _record(data='{"é":1}', metadata='{"m":2}')
    assert canonical_bytes(record) == (
        b"1|00000000-0000-0000-0000-000000000001|1|PredictionMade|1|1700000000000000|8|7|"
        + '{"é":1}'.encode()
        + b'{"m":2}'
    )


@given(st.integers(min_value=-(2**62), max_value=2**62))
def test_microsecond_timestamps_round_trip_exactly(micros):
    micros = micros % (253402300799 * 10**6)  # within datetime's range
    assert to_microseconds(from_microseconds(micros)) == micros


json_text = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
).map(lambda value: msgspec.json.encode(value).decode())


@given(data=json_text, metadata=json_text, other=json_text)
def test_any_change_to_any_column_changes_the_hash(data, metadata, other):
    base = _record(data=data, metadata=metadata)
    variants = [
        _record(data=other, metadata=metadata),
        _record(data=data, metadata=other),
        _record(data=data + " ", metadata=metadata),
        _record(data=data, metadata=metadata, stream_version=2),
        _record(data=data, metadata=metadata, schema_version=2),
        _record(data=data, metadata=metadata, recorded_at_us=base.recorded_at_us + 1),
        _record(data=data, metadata=metadata, event_type="PredictionFailed"),
        _record(data=data, metadata=metadata, stream_id=str(uuid.UUID(int=99))),
        # moving bytes between the two JSON texts must not collide either
        _record(data=data + metadata, metadata=""),
    ]
    for variant in variants:
        if variant != base:
            assert link(GENESIS_HASH, variant) != link(GENESIS_HASH, base)


@given(st.lists(json_text, min_size=1, max_size=12), st.data())
def test_find_break_names_the_first_edited_position(payloads, data):
    rows, previous = [], GENESIS_HASH
    for position, payload in enumerate(payloads, start=1):
        record = _record(position=position, data=payload)
        previous = link(previous, record)
        rows.append((record, previous))
    assert find_break(rows)[0] is None
    victim = data.draw(st.integers(min_value=0, max_value=len(rows) - 1))
    record, stored = rows[victim]
    rows[victim] = (msgspec.structs.replace(record, data=record.data + " "), stored)
    brk = find_break(rows)[0]
    assert brk is not None and brk.position == victim + 1
