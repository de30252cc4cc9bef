-- migrate:up

-- Ground truth in the read model: each prediction's current label (and the position of the label
-- event that set it), every label event in `labels`, with the position where the next one
-- superseded it, so that "which label was current at position P" is a query, not a replay, and
-- `quality_cells`, the counts that model quality is computed from, kept current.
-- The table definitions live in read_model_create (rebuild and verify build from it), replaced
-- here; the live tables get the same columns and indexes. The log held no label events before
-- this migration, so nothing needs a backfill.

-- The two tables this migration adds, in a function of their own because it also adds them to
-- the live schema.
--
-- `labels`: every label event. A row is current from its position until `superseded_at` (the
-- next label event of the same prediction; NULL while it is the latest). A withdrawal is a row
-- with no label.
--
-- `quality_cells`: per model and UTC hour of the outcome, how many predictions fall in each cell
-- of (status, predicted class, current true label, top-confidence bin), with their confidence and
-- Brier sums (domain/quality.py's sufficient statistics). -1 stands for "none" (a failed
-- prediction has no class or bin; an unlabelled one no label), since key columns cannot be NULL.
-- The sums are numeric, so a label that moves a prediction out of a cell and back leaves exactly
-- what a replay from position 0 builds (float sums would differ in the last bits, and verify
-- compares the two as text).
CREATE FUNCTION read_model_create_ground_truth(target_schema text) RETURNS void LANGUAGE plpgsql AS $function$
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
    EXECUTE format($ddl$
        CREATE TABLE %1$I.quality_cells (
            model_sha256 text NOT NULL,
            hour timestamp NOT NULL,           -- UTC hour of the outcome
            status text NOT NULL,
            likely_class integer NOT NULL,     -- -1: failed
            truth integer NOT NULL,            -- the current label; -1: none
            bin integer NOT NULL,              -- top-confidence bin 0..9; -1: failed
            n bigint NOT NULL,
            confidence_sum numeric NOT NULL,
            brier_sum numeric NOT NULL,        -- 0 unless labelled and made
            CONSTRAINT quality_cells_pkey PRIMARY KEY (model_sha256, hour, status, likely_class, truth, bin)
        )$ddl$, target_schema);
    -- Cells a label emptied are deleted after each batch: this finds them without a scan.
    EXECUTE format('CREATE INDEX quality_cells_empty_idx ON %1$I.quality_cells (model_sha256) WHERE n = 0', target_schema);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON %1$I.labels, %1$I.quality_cells TO audit_app',
                   target_schema);
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
    -- A model's first and last use (GET /models/, the drift reference's default day).
    EXECUTE format('CREATE INDEX predictions_model_recorded_at_idx ON %1$I.predictions (model_sha256, recorded_at)',
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

    PERFORM read_model_create_ground_truth(target_schema);

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
SELECT read_model_create_ground_truth('public');
CREATE INDEX predictions_labelled_idx ON public.predictions (position) WHERE label IS NOT NULL;
CREATE INDEX predictions_model_recorded_at_idx ON public.predictions (model_sha256, recorded_at);
-- Every model the service has served, without a scan of the log.
CREATE INDEX events_model_registrations_idx ON events (position) WHERE event_type = 'ModelRegistered';
REVOKE ALL ON FUNCTION read_model_create_ground_truth(text) FROM PUBLIC;

-- migrate:down

DROP TABLE public.labels, public.quality_cells;
DROP FUNCTION read_model_create_ground_truth(text);
DROP INDEX public.predictions_labelled_idx, public.predictions_model_recorded_at_idx,
    public.events_model_registrations_idx;
ALTER TABLE public.predictions DROP COLUMN label, DROP COLUMN labelled_at;
