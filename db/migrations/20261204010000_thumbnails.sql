-- migrate:up

-- The console's thumbnails of large uploads, made once (on first view) and kept: a cache, not a
-- record (nothing in the log refers to them, and any may be dropped and made again). Keyed by the
-- original's digest, so an erasure, which deletes the original, deletes its thumbnail with it.
CREATE TABLE thumbnails (
    blob_sha256 bytea PRIMARY KEY REFERENCES blobs (sha256) ON DELETE CASCADE,
    content bytea NOT NULL,
    media_type text NOT NULL,
    made_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
GRANT SELECT, INSERT ON thumbnails TO audit_app;

-- migrate:down

DROP TABLE thumbnails;
