-- migrate:up

-- Audit work asked for over HTTP (the console's "verify" and "reproduce" buttons, POST /audit/jobs)
-- and run by a job runner in the service process, as a child process on the owner's login:
-- verification replays into scratch tables (read_model_create), which the service's own role
-- never may. `just verify` files its results here too, so "the last
-- verification" is whichever ran last. Operational records, not events: the log is what they check.
CREATE TABLE audit_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('verify', 'reproduce')),
    subject uuid,                          -- the prediction, for reproduce
    requested_by text,                     -- the API key's name, 'cli', or NULL without keys
    requested_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    started_at timestamptz,
    finished_at timestamptz,
    ok boolean,                            -- NULL until finished
    verdict text,                          -- one line for people
    report jsonb,                          -- the command's own report
    CHECK ((kind = 'reproduce') = (subject IS NOT NULL)),
    CHECK (finished_at IS NULL OR (started_at IS NOT NULL AND ok IS NOT NULL AND verdict IS NOT NULL))
);
CREATE INDEX audit_jobs_waiting_idx ON audit_jobs (id) WHERE started_at IS NULL;
CREATE INDEX audit_jobs_kind_idx ON audit_jobs (kind, id);

-- The service's role queues jobs, and the service's job runner claims and closes them.
GRANT SELECT, INSERT, UPDATE (started_at, finished_at, ok, verdict, report) ON audit_jobs TO audit_app;

-- migrate:down

DROP TABLE audit_jobs;
