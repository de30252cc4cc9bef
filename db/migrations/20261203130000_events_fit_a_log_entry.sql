-- migrate:up

-- A C2SP entry bundle gives each transparency-log leaf a 2-byte length: an event's canonical bytes
-- (a header of at most 256 bytes, then data and metadata) must fit in 65,535 bytes. The store
-- refuses a larger event before sending it (db/store.py EventTooLarge); this is the table's own
-- guarantee. A log that already holds a larger event cannot be served as tiles: say which.
DO $$
DECLARE
    offender bigint;
BEGIN
    SELECT position INTO offender FROM events
    WHERE octet_length(data::text) + octet_length(metadata::text) > 65279 ORDER BY position LIMIT 1;
    IF offender IS NOT NULL THEN
        RAISE EXCEPTION 'the event at position % is larger than a transparency-log entry allows (65,535 bytes)', offender;
    END IF;
END
$$;

ALTER TABLE events ADD CONSTRAINT events_fit_a_log_entry
    CHECK (octet_length(data::text) + octet_length(metadata::text) <= 65279);

-- migrate:down

ALTER TABLE events DROP CONSTRAINT events_fit_a_log_entry;
