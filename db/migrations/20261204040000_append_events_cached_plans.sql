-- migrate:up

-- append_events plans its statements once per session instead of on every call (issue 15: fixed
-- costs at one connection). The append pool asks for custom plans on every execution
-- (db/store.py append_settings, plan_cache_mode=force_custom_plan) because generic plans made
-- while the tables were empty and never analyzed collapsed into scans as they grew. The ones
-- that collapse are the projection's joins against the read tables (a hash join over a
-- sequential scan of `inputs` or `predictions`); every query of append_events' per-event body is
-- a probe of a unique index whichever way it is planned, so planning it again on every call only
-- cost CPU (about 185 of 580 µs of PostgreSQL CPU per single-upload append). So append_events now
-- runs with plan_cache_mode=force_generic_plan, and its lookups are written so that the plan
-- cannot be anything but index probes: the stored stream versions by a LATERAL ... LIMIT 1 on
-- the unique (stream_id, stream_version) index instead of a join against a GROUP BY over
-- `stream_id = ANY(...)`, the taken keys by a LATERAL probe of idempotency_keys' primary key.
-- The key lookup and the blob and key inserts are skipped when there is nothing to look up or
-- insert (uploads carry no key unless the client sends one). append_events_in_bulk keeps custom
-- plans (its set-based queries are planned for each group's size), now said on the function,
-- since it runs inside append_events' setting. Outcomes, hashes and checks are unchanged.

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
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
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
    -- again in this group (two labels for one prediction): set-based, so that a group costs no
    -- search per request. Only repeated streams are tracked in the loop. One index probe per
    -- request (LIMIT 1 over the unique (stream_id, stream_version) index): the plan is the same
    -- whatever the table's size or statistics, so it is planned once per session.
    SELECT coalesce(array_agg(coalesce(s.version, 0) ORDER BY u.ord), '{}'),
           coalesce(array_agg(u.nth > 1 ORDER BY u.ord), '{}'),
           coalesce(array_agg(u.count > 1 ORDER BY u.ord), '{}')
      INTO v_stored, v_repeated, v_tracked
      FROM (SELECT t.id, t.ord, row_number() OVER (PARTITION BY t.id ORDER BY t.ord) AS nth,
                   count(*) OVER (PARTITION BY t.id) AS count
              FROM unnest(p_stream_ids) WITH ORDINALITY AS t(id, ord)) u
      LEFT JOIN LATERAL (SELECT e.stream_version AS version FROM public.events e
                          WHERE e.stream_id = u.id ORDER BY e.stream_version DESC LIMIT 1) s ON true;
    -- Taken keys, one index probe per key; none to look for when no request carries a key.
    IF array_length(array_remove(p_keys, NULL), 1) > 0 THEN
        SELECT coalesce(array_agg(k.key), '{}'), coalesce(array_agg(k.request_sha256), '{}'),
               coalesce(array_agg(k.stream_id), '{}')
          INTO v_keys, v_key_sha256s, v_key_streams
          FROM unnest(p_keys) AS q(key)
          CROSS JOIN LATERAL (SELECT * FROM public.idempotency_keys t WHERE t.key = q.key LIMIT 1) k;
    ELSE
        v_keys := '{}'; v_key_sha256s := '{}'; v_key_streams := '{}';
    END IF;

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
        IF cardinality(p_blob_digests) > 0 THEN
            INSERT INTO public.blobs (sha256, content, size_bytes)
            SELECT b.digest, b.content, octet_length(b.content)
              FROM unnest(p_blob_requests, p_blob_digests, p_blob_contents) AS b(req, digest, content)
             WHERE v_accepted[b.req]
            ON CONFLICT DO NOTHING;
        END IF;
        IF cardinality(k_keys) > 0 THEN
            INSERT INTO public.idempotency_keys (key, request_sha256, stream_id, position)
            SELECT * FROM unnest(k_keys, k_sha256s, k_streams, k_positions);
        END IF;
        -- One NOTIFY per transaction (each takes a global lock at commit), carrying the head.
        PERFORM pg_notify('audit_events', v_position::text);
    END IF;
END
$$;

ALTER FUNCTION append_events(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) OWNER TO audit_log_writer;
REVOKE ALL ON FUNCTION append_events(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION append_events(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) TO audit_app;

ALTER FUNCTION append_events_in_bulk(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) SET plan_cache_mode = force_custom_plan;

-- migrate:down

ALTER FUNCTION append_events_in_bulk(uuid[], int[], text[], bytea[], text[], int[], text[], int[], text[], int[], bytea[], bytea[]) RESET plan_cache_mode;

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
