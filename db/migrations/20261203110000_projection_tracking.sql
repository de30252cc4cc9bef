-- migrate:up

-- A projection's position in the log is its "tracking" (the eventsourcing library's word): the
-- word "checkpoint" is kept for signed statements of the log's head.
ALTER TABLE projection_checkpoints RENAME TO projection_tracking;
ALTER TABLE projection_tracking RENAME CONSTRAINT projection_checkpoints_pkey TO projection_tracking_pkey;
ALTER TABLE projection_tracking RENAME CONSTRAINT projection_checkpoints_position_check TO projection_tracking_position_check;

-- migrate:down

ALTER TABLE projection_tracking RENAME CONSTRAINT projection_tracking_position_check TO projection_checkpoints_position_check;
ALTER TABLE projection_tracking RENAME CONSTRAINT projection_tracking_pkey TO projection_checkpoints_pkey;
ALTER TABLE projection_tracking RENAME TO projection_checkpoints;
