"""The event store against a real PostgreSQL: append-only, group commit, ordering, hash chain."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import timedelta

import asyncpg
import msgspec
import pytest

from db.group_commit import GroupCommitter
from db.store import (
    AppendRequest,
    EventTooLarge,
    APPEND_LOCK_KEY,
    NOTIFY_CHANNEL,
    AppendRejected,
    Committed,
    EventStore,
    IdempotencyKeyReused,
    Replayed,
    VersionConflict,
    append_settings,
)
from domain.chain import GENESIS_HASH, MAX_PAYLOAD_BYTES, ChainedRecord, find_break, link, to_microseconds
from domain.events import GroundTruthRecorded, PredictionMade, PredictionRequested
from tests.factories import log_every_plan, prediction_request


async def verify(store: EventStore):
    events = await store.read_all(0, 1_000_000)
    return find_break(((e.chained(), e.hash) for e in events))


async def test_append_assigns_gap_free_positions_and_links_the_chain(app_pool):
    store = EventStore(app_pool)
    outcomes = await store.append([prediction_request(label=str(i)) for i in range(5)])
    assert all(isinstance(o, Committed) for o in outcomes)
    events = await store.read_all(0, 100)
    assert [e.position for e in events] == list(range(1, 11))
    assert [e.stream_version for e in events] == [1, 2] * 5
    assert {e.recorded_at for e in events} == {events[0].recorded_at}  # one group, one clock reading
    brk, last, head = await verify(store)
    assert brk is None and last == 10
    assert outcomes[-1].head_position == 10 and outcomes[-1].head_hash == head == (await store.head())[1]
    decoded = [e.decode() for e in await store.read_stream(outcomes[2].stream_id)]
    assert isinstance(decoded[0], PredictionRequested) and isinstance(decoded[1], PredictionMade)
    assert decoded[0].filename == "digit2.png"


async def test_blobs_are_stored_byte_for_byte_and_deduplicated(app_pool):
    store = EventStore(app_pool)
    content = bytes(range(256)) * 10
    first, second = prediction_request(content=content), prediction_request(content=content)
    assert all(isinstance(o, Committed) for o in await store.append([first, second]))
    digest = next(iter(first.blobs))
    assert await store.read_blob(digest) == content
    assert await app_pool.fetchval("SELECT count(*) FROM blobs") == 1


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET event_type = 'Tampered' WHERE position = 1",
        "DELETE FROM events WHERE position = 1",
        "TRUNCATE events",
        "TRUNCATE events CASCADE",
        "UPDATE blobs SET content = 'x'",
        "DELETE FROM blobs",
        "TRUNCATE blobs CASCADE",  # plain TRUNCATE is refused before the trigger: thumbnails refer to blobs
        "DELETE FROM idempotency_keys",
    ],
)
async def test_postgres_refuses_changes_even_from_the_superuser(app_pool, owner, statement):
    await EventStore(app_pool).append([prediction_request(key="k1")])
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner.execute(statement)
    assert await owner.fetchval("SELECT count(*) FROM events") == 2
    assert await owner.fetchval("SELECT count(*) FROM blobs") == 1


async def test_the_service_role_cannot_change_or_unprotect_the_log(app_pool):
    await EventStore(app_pool).append([prediction_request()])
    async with app_pool.acquire() as connection:
        for statement in (
            "UPDATE events SET stream_version = 9",
            "DELETE FROM events",
            "ALTER TABLE events DISABLE TRIGGER USER",
            "DROP TRIGGER events_refuse_update_delete ON events",
            "SET session_replication_role = replica",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(statement)
        await connection.execute("RESET ROLE")
        assert await connection.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute("ALTER TABLE events DISABLE TRIGGER ALL")
        owned = await connection.fetchval(
            "SELECT count(*) FROM pg_class WHERE relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user)"
        )
        assert owned == 0


async def test_version_conflict_fails_only_its_request_and_leaves_nothing_half_written(app_pool):
    store = EventStore(app_pool)
    (existing,) = await store.append([prediction_request()])
    assert isinstance(existing, Committed)
    stale = prediction_request(stream_id=existing.stream_id)  # expects a new stream: version 0
    before, after = prediction_request(label="a"), prediction_request(label="b")
    outcomes = await store.append([before, stale, after])
    assert isinstance(outcomes[0], Committed) and isinstance(outcomes[2], Committed)
    assert isinstance(outcomes[1], VersionConflict) and outcomes[1].actual == 2
    assert len(await store.read_stream(existing.stream_id)) == 2
    assert await app_pool.fetchval("SELECT count(*) FROM events") == 6
    assert await app_pool.fetchval("SELECT count(*) FROM blobs") == 3  # the conflicting blob is not kept
    assert (await verify(store))[0] is None


async def test_two_appends_to_one_stream_in_one_group_give_one_conflict(app_pool):
    store = EventStore(app_pool)
    stream = uuid.uuid4()
    outcomes = await store.append([prediction_request(stream_id=stream), prediction_request(stream_id=stream)])
    assert isinstance(outcomes[0], Committed) and isinstance(outcomes[1], VersionConflict)
    assert len(await store.read_stream(stream)) == 2


async def test_concurrent_writers_to_one_stream_one_wins(app_pool):
    stream = uuid.uuid4()
    stores = [EventStore(app_pool) for _ in range(8)]
    outcomes = await asyncio.gather(*(s.append([prediction_request(stream_id=stream)]) for s in stores))
    kinds = [type(o[0]) for o in outcomes]
    assert kinds.count(Committed) == 1 and kinds.count(VersionConflict) == 7
    assert await app_pool.fetchval("SELECT count(*) FROM events") == 2


async def test_a_request_the_database_refuses_fails_alone(app_pool, owner):
    # Stand-in for "any other error": a trigger (installed by the superuser) refuses one request's rows.
    await owner.execute("""
        CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.metadata::text LIKE '%poison%' THEN RAISE EXCEPTION 'poisoned row'; END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION poison();
    """)
    store = EventStore(app_pool)
    requests = [prediction_request(label="ok1"), prediction_request(label="poison"), prediction_request(label="ok2")]
    outcomes = await store.append(requests)
    assert [type(o) for o in outcomes] == [Committed, AppendRejected, Committed]
    assert await app_pool.fetchval("SELECT count(*) FROM events") == 4
    brk, last, _ = await verify(store)
    assert brk is None and last == 4


async def test_idempotency_key_replays_the_first_stream_and_refuses_reuse(app_pool):
    store = EventStore(app_pool)
    first = prediction_request(key="retry-me", content=b"same bytes")
    (committed,) = await store.append([first])
    assert isinstance(committed, Committed)
    # a sequential retry, and two concurrent retries landing in one group
    (again,) = await store.append([prediction_request(key="retry-me", content=b"same bytes")])
    assert again == Replayed(first.stream_id)
    group = await store.append(
        [prediction_request(key="new-key", content=b"n"), prediction_request(key="new-key", content=b"n")]
    )
    assert isinstance(group[0], Committed) and group[1] == Replayed(group[0].stream_id)
    (reused,) = await store.append([prediction_request(key="retry-me", content=b"other bytes")])
    assert isinstance(reused, IdempotencyKeyReused)
    assert await app_pool.fetchval("SELECT count(*) FROM events") == 4


async def test_notifies_once_per_transaction_with_the_head(app_pool, database):
    listener = await asyncpg.connect(database.app_dsn)
    received: list[str] = []
    await listener.add_listener(NOTIFY_CHANNEL, lambda *args: received.append(args[3]))
    try:
        await EventStore(app_pool).append([prediction_request() for _ in range(4)])
        async with asyncio.timeout(5):
            while not received:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert received == ["8"]
    finally:
        await listener.close()


@pytest.mark.timeout(60)
async def test_concurrent_appenders_and_a_live_reader_see_every_event_once_in_order(app_pool):
    writers, appends_per_writer = 10, 25
    store = EventStore(app_pool)
    done = asyncio.Event()
    seen: list[int] = []

    async def follow() -> None:
        after = 0
        while True:
            finished = done.is_set()
            for event in await store.read_all(after, 500):
                seen.append(event.position)
                after = event.position
            if finished and after == writers * appends_per_writer * 2:
                return
            await asyncio.sleep(0.002)

    async def write(writer: int) -> None:
        for i in range(appends_per_writer):
            batch = [prediction_request(label=f"{writer}-{i}")]
            assert isinstance((await store.append(batch))[0], Committed)

    reader = asyncio.create_task(follow())
    await asyncio.gather(*(write(w) for w in range(writers)))
    done.set()
    await asyncio.wait_for(reader, 30)
    assert seen == list(range(1, writers * appends_per_writer * 2 + 1))
    brk, last, _ = await verify(store)
    assert brk is None and last == len(seen)


@pytest.mark.parametrize(
    ("tamper", "position"),
    [
        ("UPDATE events SET data = replace(data::text, 'digit3', 'digit8')::json WHERE position = 7", 7),
        ("UPDATE events SET data = ('{\"extra\":1,' || substr(data::text, 2))::json WHERE position = 4", 4),
        ("UPDATE events SET metadata = '{}' WHERE position = 9", 9),
        ("UPDATE events SET recorded_at = recorded_at + interval '1 microsecond' WHERE position = 2", 2),
        ("UPDATE events SET stream_version = 3 WHERE position = 6", 6),
        ("DELETE FROM events WHERE position = 5", 5),
    ],
)
async def test_an_edit_behind_the_apps_back_is_found_at_its_position(app_pool, owner, tamper, position):
    store = EventStore(app_pool)
    await store.append([prediction_request(label=str(i)) for i in range(5)])
    assert (await verify(store))[0] is None
    async with owner.transaction():
        await owner.execute("ALTER TABLE events DISABLE TRIGGER USER")
        await owner.execute(tamper)
        await owner.execute("ALTER TABLE events ENABLE TRIGGER USER")
    brk, last, _ = await verify(store)
    assert brk is not None and brk.position == position and last == position - 1


async def test_log_identity_is_fixed_once_the_log_has_events(app_pool, owner):
    await EventStore(app_pool).append([prediction_request()])
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await owner.execute("UPDATE log_identity SET log_id = gen_random_uuid()")


async def test_empty_log_head_is_genesis(app_pool):
    assert await EventStore(app_pool).head() == (0, GENESIS_HASH)


HOSTILE_TEXTS = [
    "ünïcödé", "日本語のファイル", "🎉 emoji", "e\u0301 combining", "\u2028\u2029 separators",
    'quote " and back\\slash', "\x01 control", "\x00 NUL (escaped in JSON)", "tab\tand\nnewline", "'; DROP TABLE events; --",
]


async def test_hashes_written_by_postgres_are_domain_chains_for_any_text(app_pool):
    # append_events computes the hashes in SQL; verifiers recompute them with domain/chain.py.
    store = EventStore(app_pool)
    outcomes = await store.append([prediction_request(label=text) for text in HOSTILE_TEXTS])
    assert all(isinstance(o, Committed) for o in outcomes)
    stored = await store.read_all(0, 1000)
    previous = GENESIS_HASH
    for event in stored:
        previous = link(previous, event.chained())
        assert event.hash == previous, event.position
    answered = [event for outcome in outcomes for event in outcome.events]
    assert answered == stored  # what the service tells its client is exactly what was stored
    assert outcomes[-1].head_position == len(stored) and outcomes[-1].head_hash == previous
    assert {e.decode().filename for e in stored if e.event_type == "PredictionRequested"} == {
        f"digit{text}.png" for text in HOSTILE_TEXTS
    }


async def test_appends_wait_for_the_append_lock_other_writers_take(app_pool, database):
    # Anything that writes the log by hand (tests, tools) orders itself with APPEND_LOCK_KEY.
    holder = await asyncpg.connect(database.app_dsn)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
        append = asyncio.create_task(EventStore(app_pool).append([prediction_request()]))
        await asyncio.sleep(0.5)
        assert not append.done()
        await transaction.rollback()
        (outcome,) = await asyncio.wait_for(append, 10)
        assert isinstance(outcome, Committed)
    finally:
        await holder.close()


async def test_an_append_without_events_is_refused_alone(app_pool):
    store = EventStore(app_pool)
    empty = msgspec.structs.replace(prediction_request(), events=[])
    outcomes = await store.append([prediction_request(label="a"), empty, prediction_request(label="b")])
    assert isinstance(outcomes[0], Committed) and isinstance(outcomes[2], Committed)
    assert isinstance(outcomes[1], AppendRejected)
    assert outcomes[2].head_position == 4 and await store.head() == (4, outcomes[2].head_hash)


# --- only append_events writes the log (issue 17, item 4) ----------------------------------------


async def test_the_service_role_cannot_write_the_log_tables_directly(app_pool):
    """Before: audit_app had INSERT, so it could add a correctly hashed stream dated in the past
    and the chain verified. Now every write goes through append_events."""
    store = EventStore(app_pool)
    (first,) = await store.append([prediction_request()])
    head = first.events[-1]
    backdated = head.recorded_at - timedelta(days=365)
    record = ChainedRecord(position=head.position + 1, stream_id=str(uuid.uuid4()), stream_version=1,
                           event_type="PredictionRequested", schema_version=1,
                           recorded_at_us=to_microseconds(backdated), data="{}", metadata="{}")
    content = b"forged upload"
    for statement, *args in [
        ("INSERT INTO events (position, stream_id, stream_version, event_type, schema_version, data, metadata,"
         " recorded_at, hash) VALUES ($1, $2::uuid, $3, $4, $5, $6::json, $7::json, $8, $9)",
         record.position, record.stream_id, 1, record.event_type, 1, "{}", "{}", backdated, link(head.hash, record)),
        ("INSERT INTO blobs (sha256, content, size_bytes) VALUES ($1, $2, $3)",
         hashlib.sha256(content).digest(), content, len(content)),
        ("INSERT INTO idempotency_keys (key, request_sha256, stream_id, position) VALUES ('k', '', $1, 1)",
         uuid.uuid4()),
    ]:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await app_pool.execute(statement, *args)
    assert await store.head() == (head.position, head.hash)

    (second,) = await store.append([prediction_request(key="through-the-function")])  # still as audit_app
    assert isinstance(second, Committed) and second.head_position == head.position + 2
    assert await app_pool.fetchval("SELECT current_user") == "audit_app"
    assert await store.find_idempotency_key("through-the-function") is not None


async def test_append_events_runs_as_a_nologin_role_that_only_audit_app_may_call(owner):
    function = await owner.fetchrow(
        """
        SELECT p.prosecdef, p.proconfig, r.rolname, r.rolcanlogin, r.rolsuper,
               has_function_privilege('audit_app', p.oid, 'EXECUTE') AS app_may_call,
               coalesce(p.proacl::text[], '{}') AS acl
        FROM pg_proc AS p JOIN pg_roles AS r ON r.oid = p.proowner
        WHERE p.proname = 'append_events' AND p.pronamespace = 'public'::regnamespace
        """
    )
    assert function["prosecdef"] and function["proconfig"] == [
        "search_path=pg_catalog, public, pg_temp", "plan_cache_mode=force_generic_plan"]
    assert (function["rolname"], function["rolcanlogin"], function["rolsuper"]) == ("audit_log_writer", False, False)
    assert function["app_may_call"]
    assert not any(entry.startswith("=") for entry in function["acl"])  # nothing granted to PUBLIC
    for table in ("events", "blobs", "idempotency_keys"):
        assert await owner.fetchval("SELECT has_table_privilege('audit_app', $1, 'SELECT')", table)
        for privilege in ("INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"):
            assert not await owner.fetchval("SELECT has_table_privilege('audit_app', $1, $2)", table, privilege)
    assert not await owner.fetchval("SELECT has_schema_privilege('audit_app', 'public', 'CREATE')")


async def test_the_bulk_append_runs_without_jit_and_only_through_append_events(owner):
    """The set-based path's queries are costed in the billions of rows, so on a server with JIT on
    (PostgreSQL's default) every call compiled them (240 ms of a 10,000-label request). A later
    CREATE OR REPLACE that forgets the SET clause would quietly bring that back."""
    function = await owner.fetchrow(
        """
        SELECT p.prosecdef, p.proconfig, r.rolname, has_function_privilege('audit_app', p.oid, 'EXECUTE') AS app_may_call
        FROM pg_proc AS p JOIN pg_roles AS r ON r.oid = p.proowner
        WHERE p.proname = 'append_events_in_bulk' AND p.pronamespace = 'public'::regnamespace
        """
    )
    assert function["prosecdef"] and function["rolname"] == "audit_log_writer"
    assert sorted(function["proconfig"]) == [
        "jit=off", "plan_cache_mode=force_custom_plan", "search_path=pg_catalog, public, pg_temp"]
    assert not function["app_may_call"]


async def test_a_temporary_table_cannot_stand_in_for_the_log(database):
    """pg_temp is searched first for tables unless a search_path names it: the function's own
    search_path puts it last and its tables are schema-qualified."""
    pool = await asyncpg.create_pool(database.app_dsn, min_size=1, max_size=1)  # one session
    try:
        await pool.execute("CREATE TEMP TABLE events (LIKE public.events)")
        await pool.execute("GRANT ALL ON pg_temp.events TO PUBLIC")
        await pool.execute(
            "INSERT INTO pg_temp.events VALUES (41, gen_random_uuid(), 1, 'Fake', 1, '{}', '{}', now(), $1)", bytes(32)
        )
        (outcome,) = await EventStore(pool).append([prediction_request()])
        assert isinstance(outcome, Committed) and outcome.head_position == 2
        assert await pool.fetchval("SELECT count(*) FROM public.events") == 2
        assert await pool.fetchval("SELECT count(*) FROM pg_temp.events") == 1
    finally:
        await pool.close()


async def test_recorded_at_never_goes_back_even_when_the_clock_does(app_pool, owner):
    """A head recorded ahead of the clock (as after the clock stepped back): the next append
    takes the head's time, not an earlier one."""
    store = EventStore(app_pool)
    (first,) = await store.append([prediction_request()])
    head = first.events[-1]
    ahead = head.recorded_at + timedelta(hours=1)
    record = ChainedRecord(position=head.position + 1, stream_id=str(uuid.uuid4()), stream_version=1,
                           event_type="SomethingNew", schema_version=1, recorded_at_us=to_microseconds(ahead),
                           data="{}", metadata="{}")
    await owner.execute(
        "INSERT INTO events (position, stream_id, stream_version, event_type, schema_version, data, metadata,"
        " recorded_at, hash) VALUES ($1, $2::uuid, 1, $3, 1, '{}', '{}', $4, $5)",
        record.position, record.stream_id, record.event_type, ahead, link(head.hash, record),
    )
    (second,) = await store.append([prediction_request()])
    assert [event.recorded_at for event in second.events] == [ahead, ahead]
    assert (await verify(store))[0] is None



async def test_an_event_too_large_for_a_log_entry_is_refused_alone(app_pool, owner):
    """A transparency-log entry bundle gives each leaf a 2-byte length: the store refuses an event
    whose canonical bytes could exceed 65,535, and only that request of the group."""
    # The factory puts the label in the filename (data) and the request id (metadata).
    fits = prediction_request(label="x" * ((MAX_PAYLOAD_BYTES - 2_000) // 2))
    too_large = prediction_request(label="x" * (MAX_PAYLOAD_BYTES // 2 + 100))
    outcomes = await EventStore(app_pool).append([fits, too_large, prediction_request()])
    assert isinstance(outcomes[0], Committed) and isinstance(outcomes[2], Committed)
    assert isinstance(outcomes[1], EventTooLarge) and "65,279" in str(outcomes[1])
    longest = await owner.fetchval("SELECT max(octet_length(data::text) + octet_length(metadata::text)) FROM events")
    assert MAX_PAYLOAD_BYTES - 2_000 < longest <= MAX_PAYLOAD_BYTES


async def test_the_events_table_itself_refuses_an_event_too_large_for_a_log_entry(owner):
    """Even a superuser's insert around the append function (the triggers do not stop INSERT)."""
    with pytest.raises(asyncpg.CheckViolationError, match="events_fit_a_log_entry"):
        await owner.execute(
            "INSERT INTO events (position, stream_id, stream_version, event_type, schema_version, data, metadata,"
            " recorded_at, hash) VALUES (1, gen_random_uuid(), 1, 'Big', 1, $1::json, '{}', now(), $2)",
            '"' + "x" * 65_300 + '"', bytes(32),
        )


async def test_a_group_that_names_one_stream_several_times_sees_its_own_earlier_requests(app_pool, owner):
    """append_events looks every stored version up at once; a stream named again later in the same
    group is checked against what the group itself appended before it."""
    store = EventStore(app_pool)
    (first,) = await store.append([prediction_request()])
    stream = first.stream_id
    label = lambda n: AppendRequest(stream_id=stream, expected_version=n,  # noqa: E731
                                    events=[GroundTruthRecorded(label=n % 10, source="group")])
    others = [prediction_request() for _ in range(3)]
    outcomes = await store.append([label(2), others[0], label(3), label(2), others[1], label(4), others[2]])
    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == ["Committed", "Committed", "Committed", "VersionConflict", "Committed", "Committed", "Committed"]
    assert outcomes[3].actual == 4
    versions = [r["stream_version"] for r in await owner.fetch(
        "SELECT stream_version FROM events WHERE stream_id = $1 ORDER BY position", stream)]
    assert versions == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("padding", [0, 300], ids=["small group, event by event", "large group, set-based"])
async def test_small_and_large_groups_decide_and_chain_alike(app_pool, padding):
    """append_events builds a group of more than 512 events set-based and a smaller one event by
    event: both give the same outcomes (replayed key, taken key, conflict, a stream named twice,
    blobs only for what committed) and hashes that domain/chain.py recomputes."""
    store = EventStore(app_pool)
    taken = prediction_request(key="taken")
    (first,) = await store.append([taken])
    stream = first.stream_id
    label = lambda n: AppendRequest(stream_id=stream, expected_version=n,  # noqa: E731
                                    events=[GroundTruthRecorded(label=n % 10, source="group")])
    twin = lambda request: msgspec.structs.replace(  # noqa: E731
        prediction_request(key=request.idempotency_key), request_sha256=request.request_sha256)
    replayed = twin(taken)
    reused = msgspec.structs.replace(prediction_request(key="taken"), request_sha256=b"other")
    new = prediction_request(key="new")
    conflicted = prediction_request()
    conflicted = msgspec.structs.replace(conflicted, expected_version=5)
    padded = [prediction_request(label=f"pad{i}") for i in range(padding)]  # two events each
    group = [label(2), *padded[:padding // 2], replayed, label(3), conflicted, reused, label(2),
             new, twin(new), *padded[padding // 2:], label(4)]
    outcomes = await store.append(group)

    kinds = [type(o).__name__ for o in outcomes]
    expected = (["Committed"] + ["Committed"] * (padding // 2)
                + ["Replayed", "Committed", "VersionConflict", "IdempotencyKeyReused", "VersionConflict",
                   "Committed", "Replayed"] + ["Committed"] * (padding - padding // 2) + ["Committed"])
    assert kinds == expected
    committed = [o for o in outcomes if isinstance(o, Committed)]
    assert [e.stream_version for o in committed if o.stream_id == stream for e in o.events] == [3, 4, 5]
    stored = await store.read_all(0, 10_000)
    previous = GENESIS_HASH
    for event in stored:
        previous = link(previous, event.chained())
        assert event.hash == previous, event.position
    assert [e for o in committed for e in o.events] == stored[1 + 1:]  # after the first upload's two events
    for request, outcome in zip(group, outcomes, strict=True):
        if isinstance(request.events[0], PredictionRequested):
            stored_blob = await store.read_blob(bytes.fromhex(request.events[0].blob_sha256))
            assert (stored_blob is not None) == isinstance(outcome, Committed)


async def test_append_events_plans_its_statements_once_and_only_as_index_probes(database, owner):
    """The append pool asks for custom plans (append_settings), but append_events runs with
    plan_cache_mode=force_generic_plan: each statement is planned once per session, without the
    call's values (an unnest of a parameter is estimated at 10 rows, of a known array at its
    length). Planned on an empty, never-analyzed log, every lookup is still an index probe, so
    the plan kept stays right at any size. The bulk path keeps planning each group."""
    settings = append_settings(lock_timeout_ms=5000, statement_timeout_ms=30000, idle_timeout_ms=30000)
    assert settings["plan_cache_mode"] == "force_custom_plan"
    connection = await asyncpg.connect(database.owner_dsn, server_settings=settings)
    plans = await log_every_plan(connection, nested=True)

    class Lent:  # asyncpg's acquire() is awaited or used with `async with`
        def __await__(self):
            return asyncio.sleep(0, connection).__await__()

        async def __aenter__(self):
            return connection

        async def __aexit__(self, *_exc):
            return None

    class OneSession:  # what EventStore needs of a pool, on this one session
        def acquire(self):
            return Lent()

        async def release(self, _connection):
            return None

    try:
        store = EventStore(OneSession())  # type: ignore[arg-type]
        for key in (None, "a-key", None):
            (outcome,) = await store.append([prediction_request(key=key)])
            assert isinstance(outcome, Committed)
    finally:
        await connection.close()

    lookups = [plan for plan in plans if "LEFT JOIN LATERAL" in plan]
    assert len(lookups) == 3
    for plan in lookups:
        assert "Index Only Scan Backward using events_stream_version_unique on events" in plan
        assert "Function Scan on unnest t  (cost=0.00..0.10 rows=10 " in plan  # generic: the array is not known
    keys = [plan for plan in plans if "FROM unnest(p_keys)" in plan]
    assert len(keys) == 1 and "Index Scan using idempotency_keys_pkey on idempotency_keys" in keys[0]
    statements = [plan for plan in plans if "public." in plan]  # append_events' own (not asyncpg's)
    assert len(statements) > 10 and not [plan for plan in statements if "Seq Scan" in plan]
    bulk = await owner.fetchval("SELECT proconfig FROM pg_proc WHERE proname = 'append_events_in_bulk'")
    assert "plan_cache_mode=force_custom_plan" in bulk


async def test_a_caller_that_goes_away_cancels_only_its_wait_not_the_commit(app_pool):
    """The writer task owns each group's commit: cancelling one caller (a client that hung up)
    leaves its request in the group, committed, and every other caller gets its answer."""
    committer = GroupCommitter(EventStore(app_pool))
    committer.start()
    try:
        requests = [prediction_request(label=str(i)) for i in range(4)]
        waits = [asyncio.ensure_future(committer.append(request)) for request in requests]
        await asyncio.sleep(0)  # every request is queued; the first group's transaction is under way
        waits[1].cancel()
        outcomes = await asyncio.gather(*waits, return_exceptions=True)
    finally:
        await committer.close()
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert all(isinstance(outcomes[i], Committed) for i in (0, 2, 3))
    stored = {event.stream_id for event in await EventStore(app_pool).read_all(0, 100)}
    assert stored == {request.stream_id for request in requests}  # the cancelled one too


async def test_an_upload_append_answers_before_its_connection_is_back_in_the_pool(database):
    """asyncpg's release is a shielded task: awaited, it would hold every group's answer for two
    more turns of the event loop. Here the release cannot finish (the pool's reset waits for the
    test), and the append still answers."""
    resetting, finish_reset = asyncio.Event(), asyncio.Event()

    async def held_reset(_connection: asyncpg.Connection) -> None:
        resetting.set()
        await finish_reset.wait()

    pool = await asyncpg.create_pool(database.app_dsn, min_size=1, max_size=2, reset=held_reset)
    try:
        (outcome,) = await asyncio.wait_for(EventStore(pool).append([prediction_request()]), 10)
        assert isinstance(outcome, Committed)
        await asyncio.wait_for(resetting.wait(), 10)  # the release runs, behind the answer
        assert pool.get_idle_size() == 0  # and has not finished
    finally:
        finish_reset.set()
        await asyncio.wait_for(pool.close(), 10)
