-- migrate:up

-- append_events hands groups of more than 512 events to append_events_in_bulk (issue 12: bulk
-- labels). There the loop over requests only decides each request's outcome and where its events
-- go (first position, first stream version); the rows, and the canonical bytes each hash covers,
-- are built by one query, and the loop over events does only the sequential part: hash =
-- sha256(previous hash || link). A 10,000-event group spent about 33 µs per event in the per-event
-- loop (a format(), two conversions and ten array appends each); set-based, 170 ms in all. Smaller
-- groups (an upload's, a single label's) keep the per-event body of
-- 20261203140000_append_events_without_per_request_search.sql unchanged: planning the set-based
-- queries on every call (plan_cache_mode=force_custom_plan) cost a single upload 0.1-0.3 ms more.
-- Outcomes, hashes and every check are the same on both paths.

CREATE FUNCTION append_events_in_bulk(
    p_stream_ids uuid[],
    p_expected_versions int[],
    p_keys text[],
    p_request_sha256s bytea[],
    p_metadata text[],
    p_event_counts int[],
    p_event_types text[],
    p_schema_versions int[],
    p_data text[],
    p_blob_requests int[],
    p_blob_digests bytea[],
    p_blob_contents bytea[]
) RETURNS TABLE (
    request int,               -- 0-based index into the group
    outcome text,              -- committed | replayed | key_reused | conflict
    stream_id uuid,            -- replayed: the stream the key recorded
    stream_version int,        -- committed: the new version; conflict: the stored one
    recorded_at timestamptz,   -- committed
    positions bigint[],        -- committed
    hashes bytea[]             -- committed
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_now timestamptz;
    v_last timestamptz;
    v_now_us bigint;
    v_head bigint;             -- the head's position before this group
    v_next bigint;             -- the last position given out so far
    v_hash bytea;
    v_count int := coalesce(array_length(p_stream_ids, 1), 0);
    v_streams uuid[] := '{}';
    v_versions int[] := '{}';
    v_stored int[];
    v_repeated boolean[];
    v_tracked boolean[];
    v_keys text[];
    v_key_sha256s bytea[];
    v_key_streams uuid[];
    v_slot int;
    v_version int;
    -- per request, in request order
    r_outcomes text[] := '{}';
    r_streams uuid[] := '{}';
    r_versions int[] := '{}';
    v_accepted boolean[] := '{}';
    -- per accepted request
    a_requests int[] := '{}';
    a_first_positions bigint[] := '{}';
    a_first_versions int[] := '{}';
    -- per event, in position order
    e_requests int[];
    e_positions bigint[];
    e_streams uuid[];
    e_versions int[];
    e_types text[];
    e_schema_versions int[];
    e_data text[];
    e_metadata text[];
    e_links bytea[];
    v_link bytea;
    e_hashes bytea[] := '{}';
    k_keys text[] := '{}';
    k_sha256s bytea[] := '{}';
    k_streams uuid[] := '{}';
    k_positions bigint[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(1635083380);  -- db/store.py APPEND_LOCK_KEY, 0x61756474 ("audt")
    -- Under the lock, in a statement that started before it was granted: read the head with
    -- queries of their own (plpgsql takes a new snapshot per query in a volatile function).
    SELECT e.position, e.hash, e.recorded_at INTO v_head, v_hash, v_last
      FROM public.events e ORDER BY e.position DESC LIMIT 1;
    -- Never before the head's time: a clock stepped back must not make the log's time run
    -- backwards (verify reports a recorded_at earlier than its predecessor's).
    v_now := greatest(clock_timestamp(), v_last);
    v_now_us := (extract(epoch FROM v_now) * 1000000)::bigint;
    v_head := coalesce(v_head, 0);
    v_next := v_head;
    v_hash := coalesce(v_hash, decode(repeat('00', 32), 'hex'));

    -- Each request's stream version as stored, in request order, and whether its stream appears
    -- again in this group (two labels for one prediction). Only repeated streams are tracked.
    SELECT coalesce(array_agg(coalesce(s.version, 0) ORDER BY u.ord), '{}'),
           coalesce(array_agg(u.nth > 1 ORDER BY u.ord), '{}'),
           coalesce(array_agg(u.count > 1 ORDER BY u.ord), '{}')
      INTO v_stored, v_repeated, v_tracked
      FROM (SELECT t.id, t.ord, row_number() OVER (PARTITION BY t.id ORDER BY t.ord) AS nth,
                   count(*) OVER (PARTITION BY t.id) AS count
              FROM unnest(p_stream_ids) WITH ORDINALITY AS t(id, ord)) u
      LEFT JOIN (SELECT e.stream_id AS id, max(e.stream_version) AS version FROM public.events e
                  WHERE e.stream_id = ANY(p_stream_ids) GROUP BY e.stream_id) s ON s.id = u.id;
    SELECT coalesce(array_agg(k.key), '{}'), coalesce(array_agg(k.request_sha256), '{}'),
           coalesce(array_agg(k.stream_id), '{}')
      INTO v_keys, v_key_sha256s, v_key_streams
      FROM public.idempotency_keys k WHERE k.key = ANY(p_keys);

    -- Decide each request in order: replayed (its key is taken), conflict, or committed at the
    -- next free positions.
    FOR i IN 1 .. v_count LOOP
        v_slot := CASE WHEN p_keys[i] IS NULL THEN NULL ELSE array_position(v_keys, p_keys[i]) END;
        IF v_slot IS NOT NULL THEN
            -- Committed earlier, or accepted earlier in this very group: the first answer stands.
            r_outcomes[i] := CASE WHEN p_request_sha256s[i] IS NOT NULL AND v_key_sha256s[v_slot] <> p_request_sha256s[i]
                                  THEN 'key_reused' ELSE 'replayed' END;
            r_streams[i] := v_key_streams[v_slot];
            r_versions[i] := NULL;
            CONTINUE;
        END IF;
        v_slot := CASE WHEN v_repeated[i] THEN array_position(v_streams, p_stream_ids[i]) END;
        v_version := CASE WHEN v_slot IS NULL THEN v_stored[i] ELSE v_versions[v_slot] END;
        IF v_version <> p_expected_versions[i] THEN
            r_outcomes[i] := 'conflict';
            r_streams[i] := NULL;
            r_versions[i] := v_version;
            CONTINUE;
        END IF;
        a_requests := a_requests || i;
        a_first_positions := a_first_positions || (v_next + 1);
        a_first_versions := a_first_versions || (v_version + 1);
        v_next := v_next + p_event_counts[i];
        v_version := v_version + p_event_counts[i];
        IF v_slot IS NOT NULL THEN
            v_versions[v_slot] := v_version;
        ELSIF v_tracked[i] THEN
            v_streams := v_streams || p_stream_ids[i];
            v_versions := v_versions || v_version;
        END IF;
        IF p_keys[i] IS NOT NULL THEN
            v_keys := v_keys || p_keys[i];
            v_key_sha256s := v_key_sha256s || coalesce(p_request_sha256s[i], ''::bytea);
            v_key_streams := v_key_streams || p_stream_ids[i];
            k_keys := k_keys || p_keys[i];
            k_sha256s := k_sha256s || coalesce(p_request_sha256s[i], ''::bytea);
            k_streams := k_streams || p_stream_ids[i];
            k_positions := k_positions || (v_next - p_event_counts[i] + 1);
        END IF;
        v_accepted[i] := true;
        r_outcomes[i] := 'committed';
        r_streams[i] := p_stream_ids[i];
        r_versions[i] := v_version;
    END LOOP;

    IF v_next > v_head THEN
        -- Every accepted event with its position and version, and what its hash covers after the
        -- previous hash (domain/chain.py's canonical bytes), in position order.
        SELECT array_agg(x.request ORDER BY x.position), array_agg(x.position ORDER BY x.position),
               array_agg(x.stream ORDER BY x.position),
               array_agg(x.version ORDER BY x.position), array_agg(x.kind ORDER BY x.position),
               array_agg(x.schema_version ORDER BY x.position), array_agg(x.data ORDER BY x.position),
               array_agg(x.metadata ORDER BY x.position),
               array_agg(convert_to(format('%s|%s|%s|%s|%s|%s|%s|%s|', x.position, x.stream, x.version, x.kind,
                                           x.schema_version, v_now_us, octet_length(convert_to(x.data, 'UTF8')),
                                           octet_length(convert_to(x.metadata, 'UTF8'))), 'UTF8')
                         || convert_to(x.data, 'UTF8') || convert_to(x.metadata, 'UTF8') ORDER BY x.position)
          INTO e_requests, e_positions, e_streams, e_versions, e_types, e_schema_versions, e_data, e_metadata, e_links
          FROM (SELECT a.request, a.first_position + g.j AS position, r.stream, a.first_version + g.j AS version,
                       e.kind, e.schema_version, e.data, r.metadata
                  FROM unnest(a_requests, a_first_positions, a_first_versions)
                         AS a(request, first_position, first_version)
                  JOIN (SELECT q.ord, q.stream, q.metadata, sum(q.count) OVER (ORDER BY q.ord) - q.count AS before
                          FROM unnest(p_stream_ids, p_metadata, p_event_counts) WITH ORDINALITY
                                 AS q(stream, metadata, count, ord)) r ON r.ord = a.request
                  CROSS JOIN LATERAL generate_series(0, p_event_counts[a.request] - 1) AS g(j)
                  JOIN unnest(p_event_types, p_schema_versions, p_data) WITH ORDINALITY
                         AS e(kind, schema_version, data, ord) ON e.ord = r.before + g.j + 1) x;

        -- The chain itself: each hash needs the one before it.
        FOREACH v_link IN ARRAY e_links LOOP
            v_hash := sha256(v_hash || v_link);
            e_hashes := e_hashes || v_hash;
        END LOOP;

        INSERT INTO public.events (position, stream_id, stream_version, event_type, schema_version, data, metadata,
                                   recorded_at, hash)
        SELECT u.p, u.s, u.v, u.t, u.sv, u.d::json, u.m::json, v_now, u.h
          FROM unnest(e_positions, e_streams, e_versions, e_types, e_schema_versions, e_data, e_metadata, e_hashes)
            AS u(p, s, v, t, sv, d, m, h);
        INSERT INTO public.blobs (sha256, content, size_bytes)
        SELECT b.digest, b.content, octet_length(b.content)
          FROM unnest(p_blob_requests, p_blob_digests, p_blob_contents) AS b(req, digest, content)
         WHERE v_accepted[b.req]
        ON CONFLICT DO NOTHING;
        INSERT INTO public.idempotency_keys (key, request_sha256, stream_id, position)
        SELECT * FROM unnest(k_keys, k_sha256s, k_streams, k_positions);
        -- One NOTIFY per transaction (each takes a global lock at commit), carrying the head.
        PERFORM pg_notify('audit_events', v_next::text);
    END IF;

    RETURN QUERY
    SELECT (r.i - 1)::int, r.outcome, r.stream, r.version,
           CASE WHEN r.outcome = 'committed' THEN v_now END, g.positions, g.hashes
      FROM unnest(r_outcomes, r_streams, r_versions) WITH ORDINALITY AS r(outcome, stream, version, i)
      LEFT JOIN (SELECT u.request, array_agg(u.position ORDER BY u.position) AS positions,
                        array_agg(u.hash ORDER BY u.position) AS hashes
                   FROM unnest(e_requests, e_positions, e_hashes) AS u(request, position, hash)
                  GROUP BY u.request) g ON g.request = r.i
     ORDER BY r.i;
END
$$;

ALTER FUNCTION append_events_in_bulk(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) OWNER TO audit_log_writer;
REVOKE ALL ON FUNCTION append_events_in_bulk(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) FROM PUBLIC;
-- Only append_events (which runs as audit_log_writer) calls it.

CREATE OR REPLACE FUNCTION append_events(
    p_stream_ids uuid[],
    p_expected_versions int[],
    p_keys text[],
    p_request_sha256s bytea[],
    p_metadata text[],
    p_event_counts int[],
    p_event_types text[],
    p_schema_versions int[],
    p_data text[],
    p_blob_requests int[],
    p_blob_digests bytea[],
    p_blob_contents bytea[]
) RETURNS TABLE (
    request int,               -- 0-based index into the group
    outcome text,              -- committed | replayed | key_reused | conflict
    stream_id uuid,            -- replayed: the stream the key recorded
    stream_version int,        -- committed: the new version; conflict: the stored one
    recorded_at timestamptz,   -- committed
    positions bigint[],        -- committed
    hashes bytea[]             -- committed
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_now timestamptz;
    v_last timestamptz;
    v_now_us bigint;
    v_position bigint;
    v_hash bytea;
    v_streams uuid[] := '{}';
    v_versions int[] := '{}';
    v_stored int[];
    v_repeated boolean[];
    v_tracked boolean[];
    v_keys text[];
    v_key_sha256s bytea[];
    v_key_streams uuid[];
    v_slot int;
    v_version int;
    v_event int := 0;
    v_data bytea;
    v_metadata bytea;
    v_accepted boolean[] := '{}';
    e_positions bigint[] := '{}';
    e_streams uuid[] := '{}';
    e_versions int[] := '{}';
    e_types text[] := '{}';
    e_schema_versions int[] := '{}';
    e_data text[] := '{}';
    e_metadata text[] := '{}';
    e_hashes bytea[] := '{}';
    k_keys text[] := '{}';
    k_sha256s bytea[] := '{}';
    k_streams uuid[] := '{}';
    k_positions bigint[] := '{}';
BEGIN
    -- More than 512 events (an upload group at 64 connections has 128; a bulk label request up to
    -- 10,100): built set-based.
    IF coalesce(array_length(p_data, 1), 0) > 512 THEN
        RETURN QUERY SELECT * FROM append_events_in_bulk(
            p_stream_ids, p_expected_versions, p_keys, p_request_sha256s, p_metadata, p_event_counts, p_event_types,
            p_schema_versions, p_data, p_blob_requests, p_blob_digests, p_blob_contents);
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(1635083380);  -- db/store.py APPEND_LOCK_KEY, 0x61756474 ("audt")
    -- Under the lock, in a statement that started before it was granted: read the head with
    -- queries of their own (plpgsql takes a new snapshot per query in a volatile function).
    SELECT e.position, e.hash, e.recorded_at INTO v_position, v_hash, v_last
      FROM public.events e ORDER BY e.position DESC LIMIT 1;
    -- Never before the head's time: a clock stepped back must not make the log's time run
    -- backwards (verify reports a recorded_at earlier than its predecessor's).
    v_now := greatest(clock_timestamp(), v_last);
    v_now_us := (extract(epoch FROM v_now) * 1000000)::bigint;
    v_position := coalesce(v_position, 0);
    v_hash := coalesce(v_hash, decode(repeat('00', 32), 'hex'));

    -- Each request's stream version as stored, in request order, and whether its stream appears
    -- again in this group (two labels for one prediction): set-based, so that a group of 10,000
    -- requests costs no search per request. Only repeated streams are tracked in the loop.
    SELECT coalesce(array_agg(coalesce(s.version, 0) ORDER BY u.ord), '{}'),
           coalesce(array_agg(u.nth > 1 ORDER BY u.ord), '{}'),
           coalesce(array_agg(u.count > 1 ORDER BY u.ord), '{}')
      INTO v_stored, v_repeated, v_tracked
      FROM (SELECT t.id, t.ord, row_number() OVER (PARTITION BY t.id ORDER BY t.ord) AS nth,
                   count(*) OVER (PARTITION BY t.id) AS count
              FROM unnest(p_stream_ids) WITH ORDINALITY AS t(id, ord)) u
      LEFT JOIN (SELECT e.stream_id AS id, max(e.stream_version) AS version FROM public.events e
                  WHERE e.stream_id = ANY(p_stream_ids) GROUP BY e.stream_id) s ON s.id = u.id;
    SELECT coalesce(array_agg(k.key), '{}'), coalesce(array_agg(k.request_sha256), '{}'),
           coalesce(array_agg(k.stream_id), '{}')
      INTO v_keys, v_key_sha256s, v_key_streams
      FROM public.idempotency_keys k WHERE k.key = ANY(p_keys);

    FOR i IN 1 .. coalesce(array_length(p_stream_ids, 1), 0) LOOP
        request := i - 1;
        stream_id := NULL; stream_version := NULL; recorded_at := NULL; positions := NULL; hashes := NULL;
        v_slot := CASE WHEN p_keys[i] IS NULL THEN NULL ELSE array_position(v_keys, p_keys[i]) END;
        IF v_slot IS NOT NULL THEN
            -- Committed earlier, or accepted earlier in this very group: the first answer stands.
            outcome := CASE WHEN p_request_sha256s[i] IS NOT NULL AND v_key_sha256s[v_slot] <> p_request_sha256s[i]
                            THEN 'key_reused' ELSE 'replayed' END;
            stream_id := v_key_streams[v_slot];
            v_event := v_event + p_event_counts[i];
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_slot := CASE WHEN v_repeated[i] THEN array_position(v_streams, p_stream_ids[i]) END;
        v_version := CASE WHEN v_slot IS NULL THEN v_stored[i] ELSE v_versions[v_slot] END;
        IF v_version <> p_expected_versions[i] THEN
            outcome := 'conflict';
            stream_version := v_version;
            v_event := v_event + p_event_counts[i];
            RETURN NEXT;
            CONTINUE;
        END IF;

        v_metadata := convert_to(p_metadata[i], 'UTF8');
        positions := '{}';
        hashes := '{}';
        FOR j IN 1 .. p_event_counts[i] LOOP
            v_event := v_event + 1;
            v_position := v_position + 1;
            v_version := v_version + 1;
            v_data := convert_to(p_data[v_event], 'UTF8');
            v_hash := sha256(
                v_hash
                || convert_to(format('%s|%s|%s|%s|%s|%s|%s|%s|', v_position, p_stream_ids[i], v_version,
                                     p_event_types[v_event], p_schema_versions[v_event], v_now_us,
                                     octet_length(v_data), octet_length(v_metadata)), 'UTF8')
                || v_data || v_metadata);
            e_positions := e_positions || v_position;
            e_streams := e_streams || p_stream_ids[i];
            e_versions := e_versions || v_version;
            e_types := e_types || p_event_types[v_event];
            e_schema_versions := e_schema_versions || p_schema_versions[v_event];
            e_data := e_data || p_data[v_event];
            e_metadata := e_metadata || p_metadata[i];
            e_hashes := e_hashes || v_hash;
            positions := positions || v_position;
            hashes := hashes || v_hash;
        END LOOP;
        IF v_slot IS NOT NULL THEN
            v_versions[v_slot] := v_version;
        ELSIF v_tracked[i] THEN
            v_streams := v_streams || p_stream_ids[i];
            v_versions := v_versions || v_version;
        END IF;
        IF p_keys[i] IS NOT NULL THEN
            v_keys := v_keys || p_keys[i];
            v_key_sha256s := v_key_sha256s || coalesce(p_request_sha256s[i], ''::bytea);
            v_key_streams := v_key_streams || p_stream_ids[i];
            k_keys := k_keys || p_keys[i];
            k_sha256s := k_sha256s || coalesce(p_request_sha256s[i], ''::bytea);
            k_streams := k_streams || p_stream_ids[i];
            k_positions := k_positions || positions[1];
        END IF;
        v_accepted[i] := true;
        outcome := 'committed';
        stream_id := p_stream_ids[i];
        stream_version := v_version;
        recorded_at := v_now;
        RETURN NEXT;
    END LOOP;

    IF array_length(e_positions, 1) > 0 THEN
        INSERT INTO public.events (position, stream_id, stream_version, event_type, schema_version, data, metadata,
                            recorded_at, hash)
        SELECT u.p, u.s, u.v, u.t, u.sv, u.d::json, u.m::json, v_now, u.h
          FROM unnest(e_positions, e_streams, e_versions, e_types, e_schema_versions, e_data, e_metadata, e_hashes)
            AS u(p, s, v, t, sv, d, m, h);
        INSERT INTO public.blobs (sha256, content, size_bytes)
        SELECT b.digest, b.content, octet_length(b.content)
          FROM unnest(p_blob_requests, p_blob_digests, p_blob_contents) AS b(req, digest, content)
         WHERE v_accepted[b.req]
        ON CONFLICT DO NOTHING;
        INSERT INTO public.idempotency_keys (key, request_sha256, stream_id, position)
        SELECT * FROM unnest(k_keys, k_sha256s, k_streams, k_positions);
        -- One NOTIFY per transaction (each takes a global lock at commit), carrying the head.
        PERFORM pg_notify('audit_events', v_position::text);
    END IF;
END
$$;

ALTER FUNCTION append_events(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) OWNER TO audit_log_writer;
REVOKE ALL ON FUNCTION append_events(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION append_events(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) TO audit_app;

-- migrate:down

CREATE OR REPLACE FUNCTION append_events(
    p_stream_ids uuid[],
    p_expected_versions int[],
    p_keys text[],
    p_request_sha256s bytea[],
    p_metadata text[],
    p_event_counts int[],
    p_event_types text[],
    p_schema_versions int[],
    p_data text[],
    p_blob_requests int[],
    p_blob_digests bytea[],
    p_blob_contents bytea[]
) RETURNS TABLE (
    request int,               -- 0-based index into the group
    outcome text,              -- committed | replayed | key_reused | conflict
    stream_id uuid,            -- replayed: the stream the key recorded
    stream_version int,        -- committed: the new version; conflict: the stored one
    recorded_at timestamptz,   -- committed
    positions bigint[],        -- committed
    hashes bytea[]             -- committed
)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
#variable_conflict use_variable
DECLARE
    v_now timestamptz;
    v_last timestamptz;
    v_now_us bigint;
    v_position bigint;
    v_hash bytea;
    v_streams uuid[] := '{}';
    v_versions int[] := '{}';
    v_stored int[];
    v_repeated boolean[];
    v_tracked boolean[];
    v_keys text[];
    v_key_sha256s bytea[];
    v_key_streams uuid[];
    v_slot int;
    v_version int;
    v_event int := 0;
    v_data bytea;
    v_metadata bytea;
    v_accepted boolean[] := '{}';
    e_positions bigint[] := '{}';
    e_streams uuid[] := '{}';
    e_versions int[] := '{}';
    e_types text[] := '{}';
    e_schema_versions int[] := '{}';
    e_data text[] := '{}';
    e_metadata text[] := '{}';
    e_hashes bytea[] := '{}';
    k_keys text[] := '{}';
    k_sha256s bytea[] := '{}';
    k_streams uuid[] := '{}';
    k_positions bigint[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(1635083380);  -- db/store.py APPEND_LOCK_KEY, 0x61756474 ("audt")
    -- Under the lock, in a statement that started before it was granted: read the head with
    -- queries of their own (plpgsql takes a new snapshot per query in a volatile function).
    SELECT e.position, e.hash, e.recorded_at INTO v_position, v_hash, v_last
      FROM public.events e ORDER BY e.position DESC LIMIT 1;
    -- Never before the head's time: a clock stepped back must not make the log's time run
    -- backwards (verify reports a recorded_at earlier than its predecessor's).
    v_now := greatest(clock_timestamp(), v_last);
    v_now_us := (extract(epoch FROM v_now) * 1000000)::bigint;
    v_position := coalesce(v_position, 0);
    v_hash := coalesce(v_hash, decode(repeat('00', 32), 'hex'));

    -- Each request's stream version as stored, in request order, and whether its stream appears
    -- again in this group (two labels for one prediction): set-based, so that a group of 10,000
    -- requests costs no search per request. Only repeated streams are tracked in the loop.
    SELECT coalesce(array_agg(coalesce(s.version, 0) ORDER BY u.ord), '{}'),
           coalesce(array_agg(u.nth > 1 ORDER BY u.ord), '{}'),
           coalesce(array_agg(u.count > 1 ORDER BY u.ord), '{}')
      INTO v_stored, v_repeated, v_tracked
      FROM (SELECT t.id, t.ord, row_number() OVER (PARTITION BY t.id ORDER BY t.ord) AS nth,
                   count(*) OVER (PARTITION BY t.id) AS count
              FROM unnest(p_stream_ids) WITH ORDINALITY AS t(id, ord)) u
      LEFT JOIN (SELECT e.stream_id AS id, max(e.stream_version) AS version FROM public.events e
                  WHERE e.stream_id = ANY(p_stream_ids) GROUP BY e.stream_id) s ON s.id = u.id;
    SELECT coalesce(array_agg(k.key), '{}'), coalesce(array_agg(k.request_sha256), '{}'),
           coalesce(array_agg(k.stream_id), '{}')
      INTO v_keys, v_key_sha256s, v_key_streams
      FROM public.idempotency_keys k WHERE k.key = ANY(p_keys);

    FOR i IN 1 .. coalesce(array_length(p_stream_ids, 1), 0) LOOP
        request := i - 1;
        stream_id := NULL; stream_version := NULL; recorded_at := NULL; positions := NULL; hashes := NULL;
        v_slot := CASE WHEN p_keys[i] IS NULL THEN NULL ELSE array_position(v_keys, p_keys[i]) END;
        IF v_slot IS NOT NULL THEN
            -- Committed earlier, or accepted earlier in this very group: the first answer stands.
            outcome := CASE WHEN p_request_sha256s[i] IS NOT NULL AND v_key_sha256s[v_slot] <> p_request_sha256s[i]
                            THEN 'key_reused' ELSE 'replayed' END;
            stream_id := v_key_streams[v_slot];
            v_event := v_event + p_event_counts[i];
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_slot := CASE WHEN v_repeated[i] THEN array_position(v_streams, p_stream_ids[i]) END;
        v_version := CASE WHEN v_slot IS NULL THEN v_stored[i] ELSE v_versions[v_slot] END;
        IF v_version <> p_expected_versions[i] THEN
            outcome := 'conflict';
            stream_version := v_version;
            v_event := v_event + p_event_counts[i];
            RETURN NEXT;
            CONTINUE;
        END IF;

        v_metadata := convert_to(p_metadata[i], 'UTF8');
        positions := '{}';
        hashes := '{}';
        FOR j IN 1 .. p_event_counts[i] LOOP
            v_event := v_event + 1;
            v_position := v_position + 1;
            v_version := v_version + 1;
            v_data := convert_to(p_data[v_event], 'UTF8');
            v_hash := sha256(
                v_hash
                || convert_to(format('%s|%s|%s|%s|%s|%s|%s|%s|', v_position, p_stream_ids[i], v_version,
                                     p_event_types[v_event], p_schema_versions[v_event], v_now_us,
                                     octet_length(v_data), octet_length(v_metadata)), 'UTF8')
                || v_data || v_metadata);
            e_positions := e_positions || v_position;
            e_streams := e_streams || p_stream_ids[i];
            e_versions := e_versions || v_version;
            e_types := e_types || p_event_types[v_event];
            e_schema_versions := e_schema_versions || p_schema_versions[v_event];
            e_data := e_data || p_data[v_event];
            e_metadata := e_metadata || p_metadata[i];
            e_hashes := e_hashes || v_hash;
            positions := positions || v_position;
            hashes := hashes || v_hash;
        END LOOP;
        IF v_slot IS NOT NULL THEN
            v_versions[v_slot] := v_version;
        ELSIF v_tracked[i] THEN
            v_streams := v_streams || p_stream_ids[i];
            v_versions := v_versions || v_version;
        END IF;
        IF p_keys[i] IS NOT NULL THEN
            v_keys := v_keys || p_keys[i];
            v_key_sha256s := v_key_sha256s || coalesce(p_request_sha256s[i], ''::bytea);
            v_key_streams := v_key_streams || p_stream_ids[i];
            k_keys := k_keys || p_keys[i];
            k_sha256s := k_sha256s || coalesce(p_request_sha256s[i], ''::bytea);
            k_streams := k_streams || p_stream_ids[i];
            k_positions := k_positions || positions[1];
        END IF;
        v_accepted[i] := true;
        outcome := 'committed';
        stream_id := p_stream_ids[i];
        stream_version := v_version;
        recorded_at := v_now;
        RETURN NEXT;
    END LOOP;

    IF array_length(e_positions, 1) > 0 THEN
        INSERT INTO public.events (position, stream_id, stream_version, event_type, schema_version, data, metadata,
                            recorded_at, hash)
        SELECT u.p, u.s, u.v, u.t, u.sv, u.d::json, u.m::json, v_now, u.h
          FROM unnest(e_positions, e_streams, e_versions, e_types, e_schema_versions, e_data, e_metadata, e_hashes)
            AS u(p, s, v, t, sv, d, m, h);
        INSERT INTO public.blobs (sha256, content, size_bytes)
        SELECT b.digest, b.content, octet_length(b.content)
          FROM unnest(p_blob_requests, p_blob_digests, p_blob_contents) AS b(req, digest, content)
         WHERE v_accepted[b.req]
        ON CONFLICT DO NOTHING;
        INSERT INTO public.idempotency_keys (key, request_sha256, stream_id, position)
        SELECT * FROM unnest(k_keys, k_sha256s, k_streams, k_positions);
        -- One NOTIFY per transaction (each takes a global lock at commit), carrying the head.
        PERFORM pg_notify('audit_events', v_position::text);
    END IF;
END
$$;

ALTER FUNCTION append_events(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) OWNER TO audit_log_writer;
REVOKE ALL ON FUNCTION append_events(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION append_events(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) TO audit_app;

DROP FUNCTION append_events_in_bulk(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]);
