-- migrate:up

-- The service connects as this LOGIN role. It owns nothing, so it can neither disable the
-- triggers below nor drop or alter the tables (a `SET ROLE` would not bind: the session could
-- `RESET ROLE`). Roles are cluster-wide, hence the idempotent create.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'audit_app') THEN
        CREATE ROLE audit_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    END IF;
END
$$;

-- One row: the random identity of this log. Outside checkpoints of the chain head are filed
-- under it, so two databases never share a checkpoint folder. It may only change while the log
-- is empty (a test database cloned from a template takes a fresh identity before its first event).
CREATE TABLE log_identity (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    log_id uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
INSERT INTO log_identity DEFAULT VALUES;

-- The append-only event log. `data` and `metadata` are `json`, not `jsonb`: json keeps the exact
-- text that was hashed (jsonb would reorder keys and respell numbers).
CREATE TABLE events (
    position bigint PRIMARY KEY CHECK (position > 0),
    stream_id uuid NOT NULL,
    stream_version integer NOT NULL CHECK (stream_version > 0),
    event_type text NOT NULL CHECK (event_type ~ '^[A-Za-z][A-Za-z0-9_]*$'),
    schema_version integer NOT NULL CHECK (schema_version > 0),
    data json NOT NULL,
    metadata json NOT NULL,
    recorded_at timestamptz NOT NULL,
    hash bytea NOT NULL CHECK (octet_length(hash) = 32),
    CONSTRAINT events_stream_version_unique UNIQUE (stream_id, stream_version)
);

-- Original uploads, byte for byte, keyed by their sha256. Written in the same transaction as the
-- events that name them; never updated; deleted only by the erasure path.
CREATE TABLE blobs (
    sha256 bytea PRIMARY KEY CHECK (octet_length(sha256) = 32),
    content bytea NOT NULL,
    size_bytes bigint NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (size_bytes = octet_length(content))
);

-- Client-chosen idempotency keys: the unique constraint makes a retry, even one on another
-- process, find the first request's stream instead of appending a second one.
CREATE TABLE idempotency_keys (
    key text PRIMARY KEY,
    request_sha256 bytea NOT NULL,
    stream_id uuid NOT NULL,
    position bigint NOT NULL
);

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % is not allowed: the table is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_refuse_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER events_refuse_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER idempotency_refuse_update_delete BEFORE UPDATE OR DELETE ON idempotency_keys
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER idempotency_refuse_truncate BEFORE TRUNCATE ON idempotency_keys
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER blobs_refuse_update BEFORE UPDATE ON blobs
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER blobs_refuse_truncate BEFORE TRUNCATE ON blobs
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- A blob may only be deleted by the erasure path, which names the blob in this transaction-local
-- setting before deleting it (and records a BlobErased event in the same transaction).
CREATE FUNCTION refuse_blob_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('audit.erasing_blob', true) IS DISTINCT FROM encode(OLD.sha256, 'hex') THEN
        RAISE EXCEPTION 'DELETE on blobs is only allowed through the erasure path'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN OLD;
END
$$;
CREATE TRIGGER blobs_refuse_delete BEFORE DELETE ON blobs
    FOR EACH ROW EXECUTE FUNCTION refuse_blob_delete();

CREATE FUNCTION refuse_identity_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR EXISTS (SELECT FROM events) THEN
        RAISE EXCEPTION 'the log identity is fixed once the log has events'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER log_identity_fixed BEFORE UPDATE OR DELETE ON log_identity
    FOR EACH ROW EXECUTE FUNCTION refuse_identity_change();
CREATE TRIGGER log_identity_refuse_truncate BEFORE TRUNCATE ON log_identity
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

REVOKE ALL ON log_identity, events, blobs, idempotency_keys FROM PUBLIC;
GRANT SELECT ON log_identity TO audit_app;
GRANT SELECT, INSERT ON events, blobs, idempotency_keys TO audit_app;
GRANT SELECT ON schema_migrations TO audit_app;  -- readiness: are all migrations applied?

-- migrate:down

DROP TABLE idempotency_keys, blobs, events, log_identity;
DROP FUNCTION refuse_change(), refuse_blob_delete(), refuse_identity_change();
