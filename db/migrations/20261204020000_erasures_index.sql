-- migrate:up

-- The console's log page counts erasures on every view: without this index that was a scan of the
-- whole event table (496 ms at 2M events, bench/console_bench.py); with it, a few index entries.
CREATE INDEX events_erasures_idx ON events (position) WHERE event_type = 'BlobErased';

-- migrate:down

DROP INDEX events_erasures_idx;
