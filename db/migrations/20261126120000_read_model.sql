-- migrate:up

-- The read model: `inputs` and `predictions` (normalized: a prediction names its input) and
-- `projection_errors` (events the projection could not apply: reported, never looped on).
-- Every id and cursor in them comes from the events (stream id, input id, position), never from a
-- sequence, so a rebuild reproduces them exactly.
--
-- The tables are defined once, here, because three places build them: this migration (schema
-- `public`, the live tables), `python -m projections rebuild` (a fresh schema, swapped in
-- atomically) and `verify` (pg_temp, a scratch copy inside one snapshot). A bulk replay creates
-- the tables bare (`with_indexes => false`: only the keys that applying events relies on) and
-- adds the rest with `read_model_add_indexes` once the rows are in, which is several times
-- faster than maintaining every index row by row. Constraint and index names are explicit so
-- that a rebuilt copy carries the same names. A later migration that changes the read model
-- replaces these functions too.
CREATE FUNCTION read_model_add_indexes(target_schema text) RETURNS void LANGUAGE plpgsql AS $function$
BEGIN
    EXECUTE format('ALTER TABLE %1$I.predictions ADD CONSTRAINT predictions_input_id_fkey
                        FOREIGN KEY (input_id) REFERENCES %1$I.inputs (input_id)', target_schema);
    -- The list is newest first by position; each filter gets an index that yields its rows in
    -- position order.
    EXECUTE format('ALTER TABLE %1$I.predictions ADD CONSTRAINT predictions_position_key UNIQUE (position)',
                   target_schema);
    EXECUTE format('CREATE INDEX predictions_likely_class_idx ON %1$I.predictions (likely_class, position)', target_schema);
    EXECUTE format('CREATE INDEX predictions_model_version_idx ON %1$I.predictions (model_version, position)', target_schema);
    EXECUTE format('CREATE INDEX predictions_recorded_at_idx ON %1$I.predictions (recorded_at)', target_schema);
    -- An erasure marks the earlier inputs of the erased blob.
    EXECUTE format('CREATE INDEX inputs_blob_sha256_idx ON %1$I.inputs (blob_sha256)', target_schema);
END
$function$;

CREATE FUNCTION read_model_create(target_schema text, with_indexes boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql AS $function$
BEGIN
    EXECUTE format($ddl$
        CREATE TABLE %1$I.inputs (
            input_id uuid NOT NULL,
            stream_id uuid NOT NULL,
            position bigint NOT NULL,          -- of the PredictionRequested event
            blob_sha256 text NOT NULL,
            filename text,
            content_type text,
            size_bytes bigint NOT NULL,
            image_format text NOT NULL,
            image_mode text NOT NULL,
            image_width integer NOT NULL,
            image_height integer NOT NULL,
            image_frames integer NOT NULL,
            tensor_sha256 text NOT NULL,
            preprocessing jsonb NOT NULL,      -- jsonb, not json: comparable (verify diffs it)
            idempotency_key text,
            recorded_at timestamptz NOT NULL,
            erased_at timestamptz,             -- recorded_at of the BlobErased event
            CONSTRAINT inputs_pkey PRIMARY KEY (input_id),
            -- an outcome finds its input by stream
            CONSTRAINT inputs_stream_id_key UNIQUE (stream_id)
        )$ddl$, target_schema);

    EXECUTE format($ddl$
        CREATE TABLE %1$I.predictions (
            prediction_id uuid NOT NULL,       -- the stream id
            input_id uuid NOT NULL,
            position bigint NOT NULL,          -- of the outcome event: the list cursor
            status text NOT NULL,
            output float8[],                   -- exact doubles (NULL when failed)
            likely_class integer,
            model_name text NOT NULL,
            model_version text NOT NULL,
            model_sha256 text NOT NULL,
            device text NOT NULL,
            batch_size integer,
            batch_index integer,
            error_code text,
            error_message text,
            recorded_at timestamptz NOT NULL,  -- of the outcome event
            CONSTRAINT predictions_pkey PRIMARY KEY (prediction_id),
            CONSTRAINT predictions_status_check CHECK (status IN ('made', 'failed'))
        )$ddl$, target_schema);

    EXECUTE format($ddl$
        CREATE TABLE %1$I.projection_errors (
            position bigint NOT NULL,
            stream_id uuid NOT NULL,
            event_type text NOT NULL,
            reason text NOT NULL,              -- unknown_event | undecodable | rejected
            detail text NOT NULL,
            CONSTRAINT projection_errors_pkey PRIMARY KEY (position)
        )$ddl$, target_schema);

    IF with_indexes THEN
        PERFORM read_model_add_indexes(target_schema);
    END IF;

    -- The in-process worker runs as the service's role, which owns no table.
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %1$I.inputs, %1$I.predictions, %1$I.projection_errors TO audit_app',
                   target_schema);
END
$function$;
REVOKE ALL ON FUNCTION read_model_create(text, boolean), read_model_add_indexes(text) FROM PUBLIC;

SELECT read_model_create('public');

-- Where each projection has got to. Moved in the same transaction as its read-table writes, by
-- compare-and-set. Not part of the swapped tables: a rebuild catches up to it instead.
CREATE TABLE projection_checkpoints (
    name text PRIMARY KEY,
    position bigint NOT NULL CHECK (position >= 0)
);
INSERT INTO projection_checkpoints (name, position) VALUES ('read_model', 0);
GRANT SELECT, INSERT, UPDATE, DELETE ON projection_checkpoints TO audit_app;

-- migrate:down

DROP TABLE predictions, inputs, projection_errors, projection_checkpoints;
DROP FUNCTION read_model_create(text, boolean), read_model_add_indexes(text);
