-- migrate:up

-- The transparency log: an RFC 9162 Merkle tree over the events (leaf i = the event at position
-- i + 1, leaf data = its canonical bytes), kept as C2SP tlog-tiles, and the signed checkpoints of
-- it. All of it is derived from the events by the tree integrator (projections/tree.py), which
-- connects as audit_app; none of it is needed to append.

-- Tiles of height 8: the row (level, tile_index) holds the hashes of tree level 8 * level, nodes
-- 256 * tile_index onwards, 32 bytes each. A tile grows until it holds 256 hashes; from then on
-- it never changes (C2SP: full tiles are immutable), which the trigger below enforces.
CREATE TABLE merkle_tiles (
    level smallint NOT NULL CHECK (level BETWEEN 0 AND 63),
    tile_index bigint NOT NULL CHECK (tile_index >= 0),
    hashes bytea NOT NULL CHECK (octet_length(hashes) BETWEEN 32 AND 8192 AND octet_length(hashes) % 32 = 0),
    PRIMARY KEY (level, tile_index)
);

CREATE FUNCTION merkle_tiles_only_grow() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND NEW.level = OLD.level AND NEW.tile_index = OLD.tile_index
       AND octet_length(OLD.hashes) < 8192
       AND octet_length(NEW.hashes) > octet_length(OLD.hashes)
       AND substring(NEW.hashes FROM 1 FOR octet_length(OLD.hashes)) = OLD.hashes THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% on merkle_tiles is not allowed: a tile only grows, and a full tile never changes', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER merkle_tiles_only_grow BEFORE UPDATE OR DELETE ON merkle_tiles
    FOR EACH ROW EXECUTE FUNCTION merkle_tiles_only_grow();
CREATE TRIGGER merkle_tiles_refuse_truncate BEFORE TRUNCATE ON merkle_tiles
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- Where the integrator is: the tree's size and its right edge (the roots of the perfect subtrees
-- that make up the tree, largest first), so it resumes without reading the tiles back. Moved in
-- the same transaction as the tiles it describes.
CREATE TABLE merkle_tree (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    size bigint NOT NULL CHECK (size >= 0),
    edge bytea NOT NULL CHECK (octet_length(edge) % 32 = 0),
    root bytea NOT NULL CHECK (octet_length(root) = 32),
    chain_head bytea NOT NULL CHECK (octet_length(chain_head) = 32),
    CHECK (octet_length(edge) / 32 = length(replace(size::bit(64)::text, '0', '')))
);
INSERT INTO merkle_tree (size, edge, root, chain_head) VALUES (0, '', sha256(''), '\x0000000000000000000000000000000000000000000000000000000000000000');

-- Every checkpoint the integrator signed: the C2SP signed note as served, and its parts. Append-only.
CREATE TABLE tlog_checkpoints (
    tree_size bigint PRIMARY KEY CHECK (tree_size >= 0),
    root_hash bytea NOT NULL CHECK (octet_length(root_hash) = 32),
    chain_head bytea NOT NULL CHECK (octet_length(chain_head) = 32),
    note text NOT NULL,
    signed_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX tlog_checkpoints_signed_at_idx ON tlog_checkpoints (signed_at);

-- Every verifier key that has signed a checkpoint, in signed-note text form. A rotated key stays
-- published: checkpoints it signed must remain checkable.
CREATE TABLE tlog_keys (
    verifier_key text PRIMARY KEY,
    first_used_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- The integrator's refusals to sign: the tree it was asked to sign does not extend the last
-- signed one. Kept as evidence; readiness reports the latest one until a later checkpoint.
CREATE TABLE tlog_refusals (
    refusal_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    refused_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    signed_size bigint NOT NULL,
    signed_root bytea NOT NULL,
    new_size bigint NOT NULL,
    new_root bytea NOT NULL,
    reason text NOT NULL,
    evidence json NOT NULL
);

CREATE TRIGGER tlog_checkpoints_refuse_update_delete BEFORE UPDATE OR DELETE ON tlog_checkpoints
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER tlog_checkpoints_refuse_truncate BEFORE TRUNCATE ON tlog_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER tlog_keys_refuse_update_delete BEFORE UPDATE OR DELETE ON tlog_keys
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER tlog_refusals_refuse_update_delete BEFORE UPDATE OR DELETE ON tlog_refusals
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

GRANT SELECT, INSERT, UPDATE ON merkle_tiles, merkle_tree TO audit_app;
GRANT SELECT, INSERT ON tlog_checkpoints, tlog_keys, tlog_refusals TO audit_app;

-- migrate:down

DROP TABLE tlog_refusals, tlog_keys, tlog_checkpoints, merkle_tree, merkle_tiles;
DROP FUNCTION merkle_tiles_only_grow();
