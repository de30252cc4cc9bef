"""The tree integrator: follows the log, appends each event as a leaf of the RFC 9162 Merkle tree,
stores the tree as C2SP tiles and signs checkpoints of it. Elected like the projection runner
(one active across all processes), and like it derived data: the log never waits for it.

One step reads a batch of events, hashes their canonical bytes into leaves, and in ONE
transaction grows the tiles and moves `merkle_tree` (size, right edge, root, chain head), so a
kill at any point resumes exactly where the last commit left it. Signing happens after a step,
at most every `interval_s`, and only for a tree that extends the last signed one: the
consistency proof between them, computed from the stored tiles, must verify against the signed
root. Otherwise it refuses, records why in `tlog_refusals` (with the evidence), logs it, and
signs nothing until an operator has looked (readiness and /metrics report it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import asyncpg
import msgspec

from domain.chain import GENESIS_HASH
from domain.merkle import (
    TILE_HEIGHT,
    TILE_WIDTH,
    ProofError,
    TreeBuilder,
    leaf_hash,
    verify_consistency,
)
from domain.signed_note import Checkpoint, NoteError
from projections import tree_store
from projections.checkpoints import (
    CHAIN_HEAD,
    NoteKey,
    file_checkpoint,
    filed_checkpoints,
    load_or_create_key,
    open_checkpoint,
    retired_keys,
    sign_checkpoint,
)
from projections.worker import ElectedFollower

log = logging.getLogger(__name__)

TREE = "merkle_tree"
CHECKPOINT_CHANNEL = "tlog_checkpoint"  # NOTIFY payload: the signed tree size

_WRITE_TILES = """
WITH new (level, tile_index, offset_bytes, hashes) AS (
    SELECT * FROM unnest($1::smallint[], $2::bigint[], $3::int[], $4::bytea[])
), grown AS (
    UPDATE merkle_tiles AS t SET hashes = t.hashes || n.hashes
    FROM new AS n
    WHERE t.level = n.level AND t.tile_index = n.tile_index
      AND n.offset_bytes > 0 AND octet_length(t.hashes) = n.offset_bytes
    RETURNING 1
), started AS (
    INSERT INTO merkle_tiles (level, tile_index, hashes)
    SELECT level, tile_index, hashes FROM new WHERE offset_bytes = 0
    RETURNING 1
)
SELECT (SELECT count(*) FROM grown) + (SELECT count(*) FROM started)
"""

_MOVE_TREE = "UPDATE merkle_tree SET size = $1, edge = $2, root = $3, chain_head = $4 WHERE size = $5"


class TreeConflict(RuntimeError):
    """The stored tree is not where this integrator left it: another writer, or a tampered store."""


class TreeIntegrator(ElectedFollower):
    def __init__(
        self,
        dsn: str,
        *,
        key_path: Path,
        checkpoint_dir: Path,
        origin: str | None = None,
        interval_s: float = 1.0,
        history_s: float = 60.0,
        batch_size: int = 20_000,
        **options,
    ) -> None:
        # Under load every group commit notifies: stepping on each would add a commit (and its
        # WAL flush) per group to the append path's; gathering a quarter of the signing interval
        # keeps the integrator to a few transactions a second at no cost to the checkpoints.
        options.setdefault("coalesce_s", interval_s / 4)
        super().__init__(dsn, name=TREE, batch_size=batch_size, **options)
        self._key_path = key_path
        self._checkpoint_dir = checkpoint_dir
        self._origin = origin
        self._interval_s = interval_s
        self._history_s = history_s
        self._builder = TreeBuilder()
        self._chain_head = GENESIS_HASH
        self._keys: list[NoteKey] = []
        self._key_stamp: tuple[int, int] | None = None
        self._signed: Checkpoint | None = None
        self._signed_at = 0.0
        self._history_at = 0.0
        self._log_id = ""
        self.refusing: str | None = None
        self.checkpoints_signed = 0

    # ---- following the log ----------------------------------------------------------------------

    async def _resume(self, connection: asyncpg.Connection) -> int:
        state = await tree_store.tree_state(connection)
        self._builder = TreeBuilder(state.size, state.edge)
        if self._builder.root() != state.root:
            raise TreeConflict(f"the stored tree's edge at size {state.size} does not give its stored root")
        self._chain_head = state.chain_head
        self._log_id = str(await connection.fetchval("SELECT log_id FROM log_identity"))
        self._origin = self._origin or f"prediction-audit/{self._log_id}"
        await asyncio.to_thread(self._load_keys)
        self._signed = await self._last_signed(connection)
        self.refusing = None
        return state.size

    async def _step(self, connection: asyncpg.Connection, position: int) -> tuple[int, int]:
        rows = await tree_store.leaf_rows(connection, position, self._batch_size)
        if rows:
            await self._integrate(connection, rows)
        if self._signing_due():
            await self._sign(connection)
        return self._builder.size, len(rows)

    def _idle_wait_s(self) -> float:
        if self._signed is not None and self._builder.size > self._signed.size and self.refusing is None:
            return max(0.0, self._signed_at + self._interval_s - time.monotonic())
        return self._poll_interval_s

    async def _stopped(self) -> None:
        """Sign what was integrated before the drain, so a stopped log's head is covered."""
        if self._signed is None or self._builder.size == self._signed.size or self.refusing:
            return
        try:
            connection = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s)
        except (OSError, asyncpg.PostgresError):
            return
        try:
            if await connection.fetchval("SELECT size FROM merkle_tree") == self._builder.size:
                await self._sign(connection)
        except Exception:  # noqa: BLE001 - shutting down: the next active integrator signs it
            log.warning("could not sign the final checkpoint", exc_info=True)
        finally:
            await connection.close()

    async def _integrate(self, connection: asyncpg.Connection, rows: list[asyncpg.Record]) -> None:
        builder = TreeBuilder(self._builder.size, self._builder.edge)
        tiles: dict[tuple[int, int], bytearray] = {}
        offsets: dict[tuple[int, int], int] = {}
        for row in rows:
            if row[0] != builder.size + 1:
                raise TreeConflict(f"expected the event at position {builder.size + 1}, read {row[0]}")
            for level, index, digest in builder.append(leaf_hash(tree_store.entry_of(row))):
                if level % TILE_HEIGHT:
                    continue
                key = (level // TILE_HEIGHT, index // TILE_WIDTH)
                if key not in tiles:
                    tiles[key] = bytearray()
                    offsets[key] = (index % TILE_WIDTH) * 32
                tiles[key] += digest
        chain_head = bytes(rows[-1][8])
        keys = sorted(tiles)
        async with connection.transaction():
            # Derived data, redone from `merkle_tree` after a crash (tiles and state commit
            # together): no need to wait for the WAL flush that the appends are waiting for.
            await connection.execute("SET LOCAL synchronous_commit = off")
            written = await connection.fetchval(
                _WRITE_TILES,
                [k[0] for k in keys], [k[1] for k in keys], [offsets[k] for k in keys], [bytes(tiles[k]) for k in keys],
            )
            if written != len(keys):
                raise TreeConflict(f"{len(keys) - written} tile(s) were not where the integrator left them")
            moved = await connection.execute(
                _MOVE_TREE, builder.size, b"".join(builder.edge), builder.root(), chain_head, self._builder.size
            )
            if moved != "UPDATE 1":
                raise TreeConflict(f"merkle_tree is no longer at size {self._builder.size}")
        self._builder, self._chain_head = builder, chain_head

    # ---- signing --------------------------------------------------------------------------------

    def _signing_due(self) -> bool:
        if self.refusing is not None and time.monotonic() - self._signed_at < 60:
            return False  # refused: try again now and then (the evidence is recorded once)
        if self._signed is None:
            return True
        return self._builder.size > self._signed.size and time.monotonic() - self._signed_at >= self._interval_s

    async def _sign(self, connection: asyncpg.Connection) -> None:
        rotated = await asyncio.to_thread(self._load_keys)
        size, root = self._builder.size, self._builder.root()
        new = Checkpoint(self._origin, size, root, (f"{CHAIN_HEAD}{self._chain_head.hex()}",))
        self._signed_at = time.monotonic()
        problem, evidence = await self._extends_signed(connection, new)
        if problem is not None:
            await self._refuse(connection, new, problem, evidence)
            return
        signers = self._keys if rotated else self._keys[-1:]
        note = sign_checkpoint(new, signers)
        async with connection.transaction():
            await connection.execute(
                "INSERT INTO tlog_checkpoints (tree_size, root_hash, chain_head, note) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT (tree_size) DO NOTHING",
                size, root, self._chain_head, note,
            )
            await connection.executemany(
                "INSERT INTO tlog_keys (verifier_key) VALUES ($1) ON CONFLICT DO NOTHING",
                [(key.verifier_key,) for key in signers],
            )
            await connection.execute("SELECT pg_notify($1, $2)", CHECKPOINT_CHANNEL, str(size))
        now = time.monotonic()
        append_history = now - self._history_at >= self._history_s
        await asyncio.to_thread(
            file_checkpoint, self._checkpoint_dir, self._log_id, size, note, append_history=append_history
        )
        if append_history:
            self._history_at = now
        if rotated:
            self._keys = self._keys[-1:]  # the retired key has signed its last checkpoint
        self._signed = new
        self.refusing = None
        self.checkpoints_signed += 1

    async def _extends_signed(self, connection: asyncpg.Connection, new: Checkpoint) -> tuple[str | None, dict]:
        old = self._signed
        if old is None or old.size == 0:
            return None, {}
        evidence = {"signed_size": old.size, "signed_root": old.root_hash.hex(), "new_size": new.size,
                    "new_root": new.root_hash.hex()}
        if new.size < old.size:
            return f"the tree ({new.size} leaves) is smaller than the signed one ({old.size})", evidence
        try:
            proof = await tree_store.consistency(connection, old.size, new.size)
        except tree_store.MissingTiles as error:
            return f"the stored tree cannot prove consistency with the signed one: {error}", evidence
        evidence["proof"] = [p.hex() for p in proof.proof]
        evidence["stored_root_at_signed_size"] = proof.first_root.hex()
        try:
            verify_consistency(old.size, new.size, old.root_hash, new.root_hash, proof.proof)
        except ProofError as error:
            return f"the tree of size {new.size} does not extend the signed tree of size {old.size}: {error}", evidence
        return None, evidence

    async def _refuse(self, connection: asyncpg.Connection, new: Checkpoint, problem: str, evidence: dict) -> None:
        first_time = self.refusing != problem
        self.refusing = problem
        log.error("refusing to sign a checkpoint: %s", problem)
        if first_time:
            old = self._signed
            await connection.execute(
                "INSERT INTO tlog_refusals (signed_size, signed_root, new_size, new_root, reason, evidence)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                old.size, old.root_hash, new.size, new.root_hash, problem, msgspec.json.encode(evidence).decode(),
            )

    async def _last_signed(self, connection: asyncpg.Connection) -> Checkpoint | None:
        """The largest checkpoint signed by one of our keys, in the database or in the folder."""
        trusted = [key.verifier_key for key in self._keys]
        notes = await asyncio.to_thread(filed_checkpoints, self._checkpoint_dir, self._log_id)
        latest = await tree_store.latest_checkpoint(connection)
        if latest is not None:
            notes.append(latest.note)
        best: Checkpoint | None = None
        for note in notes:
            try:
                checkpoint = open_checkpoint(note, trusted)
            except NoteError as error:
                log.warning("a stored checkpoint does not verify and is ignored: %s", error)
                continue
            if checkpoint.origin == self._origin and (best is None or checkpoint.size > best.size):
                best = checkpoint
        return best

    def _load_keys(self) -> bool:
        """(Re)load the signing key when its file changed; true when it was rotated meanwhile."""
        key = load_or_create_key(self._key_path)
        stat = self._key_path.stat()
        stamp = (stat.st_ino, stat.st_mtime_ns)
        if stamp == self._key_stamp:
            return False
        previous = self._keys[-1:] if self._keys else []
        self._key_stamp = stamp
        current = NoteKey(self._origin, key)
        if not previous:
            # Our retired keys still vouch for what they signed (the last signed checkpoint).
            self._keys = [NoteKey(self._origin, k) for k in retired_keys(self._key_path)] + [current]
            return False
        self._keys = previous + [current]
        return previous[0].verifier_key != current.verifier_key
