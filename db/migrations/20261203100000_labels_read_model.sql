-- migrate:up

-- Ground truth in the read model: each prediction's current label (and the position of the label
-- event that set it), and every label event in `labels`, with the position where the next one
-- superseded it, so that "which label was current at position P" is a query, not a replay.
-- The table definitions live in read_model_create (rebuild and verify build from it), replaced
-- here; the live tables get the same columns and indexes. The log held no label events before
-- this migration, so nothing needs a backfill.

-- Every label event, so that the label current at any earlier position is a query: a row is
-- current from its position until `superseded_at` (the next label event of the same prediction;
-- NULL while it is the latest). A withdrawal is a row with no label. A function of its own
-- because this migration also adds the table to the live schema.
CREATE FUNCTION read_model_create_labels(target_schema text) RETURNS void LANGUAGE plpgsql AS $function$
BEGIN
    EXECUTE format($ddl$
        CREATE TABLE %1$I.labels (
            position bigint NOT NULL,          -- of the label event
            prediction_id uuid NOT NULL,
            kind text NOT NULL,
            label integer,
            source text,
            note text,
            reason text,
            actor text,
            recorded_at timestamptz NOT NULL,
            superseded_at bigint,
            CONSTRAINT labels_pkey PRIMARY KEY (position),
            CONSTRAINT labels_kind_check CHECK (kind IN ('recorded', 'withdrawn'))
        )$ddl$, target_schema);
    -- Applying a label event looks up the label it supersedes: needed while replaying, too.
    EXECUTE format('CREATE INDEX labels_prediction_id_idx ON %1$I.labels (prediction_id, position)', target_schema);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %1$I.labels TO audit_app', target_schema);
END
$function$;

CREATE OR REPLACE FUNCTION read_model_add_indexes(target_schema text) RETURNS void LANGUAGE plpgsql AS $function$
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
    -- `labelled=true` lists newest first.
    EXECUTE format('CREATE INDEX predictions_labelled_idx ON %1$I.predictions (position) WHERE label IS NOT NULL',
                   target_schema);
END
$function$;

CREATE OR REPLACE FUNCTION read_model_create(target_schema text, with_indexes boolean DEFAULT true) RETURNS void
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
            label integer,                     -- the current ground truth (NULL: none, or withdrawn)
            labelled_at bigint,                -- position of the label event that set `label`
            CONSTRAINT predictions_pkey PRIMARY KEY (prediction_id),
            CONSTRAINT predictions_status_check CHECK (status IN ('made', 'failed'))
        )$ddl$, target_schema);

    PERFORM read_model_create_labels(target_schema);

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

ALTER TABLE public.predictions ADD COLUMN label integer, ADD COLUMN labelled_at bigint;
SELECT read_model_create_labels('public');
CREATE INDEX predictions_labelled_idx ON public.predictions (position) WHERE label IS NOT NULL;
REVOKE ALL ON FUNCTION read_model_create_labels(text) FROM PUBLIC;

-- migrate:down

DROP TABLE public.labels;
DROP FUNCTION read_model_create_labels(text);
DROP INDEX public.predictions_labelled_idx;
ALTER TABLE public.predictions DROP COLUMN label, DROP COLUMN labelled_at;
