"""Tamper evidence end to end: a real service, `just verify` (python -m cli verify) as an
operator runs it, and edits made behind the service's back by a superuser."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from db.store import EventStore, stored_event
from domain import merkle
from domain.chain import GENESIS_HASH, canonical_bytes, link
from projections.checkpoints import filed_checkpoints, open_checkpoint
from projections.tree import TreeIntegrator
from projections.worker import ProjectionRunner
from harness.live import ROOT
from tests.factories import prediction_request
from tests.fixtures import digit_files

pytestmark = pytest.mark.timeout(240)


def run_verify(owner_dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": owner_dsn, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "cli", "verify", *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )


@pytest.fixture
def service(start_service):
    """A service of this test's own, on its fresh database."""
    return start_service(CHECKPOINT_INTERVAL_MS="100")


@pytest.fixture
async def populated(database, app_pool):
    """A log of predictions, projected, with its tree signed, as a running service leaves it
    (without paying for TensorFlow)."""
    outcomes = await EventStore(app_pool).append([prediction_request(label=str(i)) for i in range(4)])
    head = outcomes[-1].head_position
    integrator = TreeIntegrator(database.app_dsn, key_path=Path(os.environ["CHECKPOINT_KEY"]),
                                checkpoint_dir=Path(os.environ["CHECKPOINT_DIR"]), interval_s=0.05, poll_interval_s=0.05)
    runner = ProjectionRunner(database.app_dsn, poll_interval_s=0.05)
    await integrator.start()
    await runner.start()
    for _ in range(200):
        if runner.position == head and integrator.position == head:
            break
        await asyncio.sleep(0.05)
    await runner.stop()
    await integrator.stop()
    assert runner.position == head and integrator.position == head
    return database


def post_digits(service, count: int) -> list[dict]:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        answers = []
        for path, _ in digit_files()[:count]:
            response = http.post("/prediction/", files={"file": (path.name, path.read_bytes(), "image/png")})
            assert response.status_code == 201
            answers.append(response.json())
        # the list answers once projected: then the signed head covers these events too
        http.get("/predictions/")
    return answers


async def signed_trees(owner_dsn: str) -> tuple[list, list[str]]:
    """The checkpoints in the database, and the notes kept in CHECKPOINT_DIR."""
    connection = await asyncpg.connect(owner_dsn)
    try:
        log_id = str(await connection.fetchval("SELECT log_id FROM log_identity"))
        stored = [row["note"] for row in await connection.fetch("SELECT note FROM tlog_checkpoints ORDER BY tree_size")]
        keys = [row["verifier_key"] for row in await connection.fetch("SELECT verifier_key FROM tlog_keys")]
    finally:
        await connection.close()
    filed = filed_checkpoints(Path(os.environ["CHECKPOINT_DIR"]), log_id)
    return [open_checkpoint(note, keys) for note in stored], filed


def settle_checkpoints(service) -> None:
    """Stop the service: the projector and the integrator finish, and the last tree is signed."""
    assert service.stop_gracefully(), service.log()


async def superuser_edit(owner_dsn: str, statement: str, *args) -> None:
    connection = await asyncpg.connect(owner_dsn)
    try:
        async with connection.transaction():
            await connection.execute("ALTER TABLE events DISABLE TRIGGER USER")
            await connection.execute("ALTER TABLE blobs DISABLE TRIGGER USER")
            await connection.execute(statement, *args)
            await connection.execute("ALTER TABLE events ENABLE TRIGGER USER")
            await connection.execute("ALTER TABLE blobs ENABLE TRIGGER USER")
    finally:
        await connection.close()


async def test_green_log_and_a_kept_receipt_verify(service, database, tmp_path):
    answers = post_digits(service, 5)
    settle_checkpoints(service)
    receipt_file = tmp_path / "answer.json"
    receipt_file.write_text(json.dumps(answers[2]))
    result = run_verify(database.owner_dsn, "--receipt", str(receipt_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and "receipt: 2 event(s)" in result.stdout
    # Every signed checkpoint (database and folder) was checked, and the last one covers the whole log.
    stored, filed = await signed_trees(database.owner_dsn)
    assert filed and f"{len(stored) + len(filed)} signed checkpoint(s) checked" in result.stdout
    assert stored[-1].size >= answers[-1]["receipt"]["events"][-1]["position"]

    forged = dict(answers[2]["receipt"])
    forged["events"] = [dict(forged["events"][0], hash="00" * 32), forged["events"][1]]
    receipt_file.write_text(json.dumps(forged))
    result = run_verify(database.owner_dsn, "--receipt", str(receipt_file))
    assert result.returncode == 1 and "receipt" in result.stdout
    # Each run by hand is on record for the console's "last verification", newest last.
    connection = await asyncpg.connect(database.owner_dsn)
    try:
        filed = await connection.fetch("SELECT requested_by, ok, verdict FROM audit_jobs WHERE kind = 'verify' ORDER BY id")
    finally:
        await connection.close()
    assert [(row["requested_by"], row["ok"]) for row in filed][-2:] == [("cli", True), ("cli", False)]
    assert filed[-1]["verdict"].startswith("FAILED: ") and "receipt" in filed[-1]["verdict"]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ("UPDATE events SET data = replace(data::text, 'digit', 'Digit')::json WHERE position = 3",
         "hash chain broken at position 3"),
        ("UPDATE events SET metadata = ('{\"injected\":true,' || substr(metadata::text, 2))::json WHERE position = 5",
         "hash chain broken at position 5"),
        ("UPDATE blobs SET content = set_byte(content, 3, (get_byte(content, 3) + 1) % 256) "
         "WHERE sha256 = (SELECT sha256 FROM blobs ORDER BY stored_at DESC LIMIT 1)",
         "does not match its digest: tampered"),
        ("DELETE FROM blobs WHERE sha256 = (SELECT sha256 FROM blobs ORDER BY stored_at DESC LIMIT 1)",
         "missing and was not erased"),
        ("UPDATE predictions SET likely_class = (likely_class + 1) % 10 WHERE position = (SELECT max(position) FROM predictions)",
         "predictions: row"),
    ],
)
async def test_edits_behind_the_services_back_are_named(populated, database, edit, expected):
    assert run_verify(database.owner_dsn).returncode == 0
    await superuser_edit(database.owner_dsn, edit)
    result = run_verify(database.owner_dsn)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout


async def rewrite_forward(owner_dsn: str, position: int, *, and_the_tree: bool = False) -> None:
    """What a superuser could do: edit an event, recompute every later chain hash so the chain
    verifies on its own and, if asked, rewrite the stored Merkle tree to match too."""
    connection = await asyncpg.connect(owner_dsn)
    try:
        async with connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")  # no triggers
            await connection.execute(  # a key added to the event's JSON
                "UPDATE events SET data = ('{\"tampered\":true,' || substr(data::text, 2))::json WHERE position = $1",
                position,
            )
            previous, forged, leaves = GENESIS_HASH, merkle.TreeBuilder(), []
            for row in await connection.fetch("SELECT * FROM events ORDER BY position"):
                record = stored_event(row).chained()
                previous = link(previous, record)
                leaves.append(merkle.leaf_hash(canonical_bytes(record)))
                forged.append(leaves[-1])
                await connection.execute("UPDATE events SET hash = $1 WHERE position = $2", previous, row["position"])
            if and_the_tree:  # the log is under one tile: the leaves are the only stored tile
                await connection.execute("UPDATE merkle_tiles SET hashes = $1 WHERE level = 0", b"".join(leaves))
                await connection.execute("UPDATE merkle_tree SET edge = $1, root = $2, chain_head = $3",
                                         b"".join(forged.edge), forged.root(), previous)
    finally:
        await connection.close()


async def test_a_forward_rewrite_is_caught_by_the_stored_tree(populated, database):
    await rewrite_forward(database.owner_dsn, 3)
    result = run_verify(database.owner_dsn)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the event at position 3 does not hash to its leaf in the stored tree" in result.stdout, result.stdout


async def test_a_rewritten_event_and_tree_fail_against_the_signed_checkpoint(populated, database):
    """Rewriting the stored tree to match the edit hides it from the tiles, not from the signature."""
    await rewrite_forward(database.owner_dsn, 3, and_the_tree=True)
    result = run_verify(database.owner_dsn)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no longer give: an event at positions 1..8 was rewritten" in result.stdout, result.stdout


async def test_erasure_is_reported_as_erased_not_tampered(service, database):
    answers = post_digits(service, 3)
    erased = answers[1]
    env = {**os.environ, "DATABASE_URL": database.owner_dsn, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "cli", "erase", erased["blob_sha256"], "--reason", "right to erasure"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    with httpx.Client(base_url=service.url, timeout=30) as http:
        http.get("/predictions/")  # wait for the projection
        view = http.get(f"/prediction/{erased['prediction_id']}").json()
        assert view["image"] is None and view["input"]["erased"] is True
        assert http.get(f"/input/{erased['input_id']}").status_code == 410
        kept = http.get(f"/prediction/{answers[0]['prediction_id']}").json()
        assert kept["image"] and kept["input"]["erased"] is False
    settle_checkpoints(service)
    result = run_verify(database.owner_dsn)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 erased" in result.stdout


async def test_the_integrator_refuses_to_sign_over_a_rewritten_tree_and_says_why(start_service, database):
    service = start_service(CHECKPOINT_INTERVAL_MS="100", CHECKPOINT_WAIT_TIMEOUT_S="2")
    with httpx.Client(base_url=service.url, timeout=30) as http:
        path, _ = digit_files()[0]
        upload = {"file": (path.name, path.read_bytes(), "image/png")}
        first = http.post("/prediction/", files=upload, headers={"Prefer": "wait=checkpoint"})
        assert first.headers["preference-applied"] == "wait=checkpoint"
        signed = first.json()["receipt"]["events"][-1]["position"]  # after the model's registration
        ready = http.get("/health/ready").json()["checks"]["transparency_log"]
        assert ready["ok"] and ready["checkpoint_size"] == signed and ready["refusing"] is None

        await rewrite_forward(database.owner_dsn, signed - 1, and_the_tree=True)  # the upload's request
        late = http.post("/prediction/", files=upload, headers={"Prefer": "wait=checkpoint"})
        assert late.status_code == 201 and "preference-applied" not in late.headers  # committed, never signed
        assert late.json()["receipt"]["checkpoint"] is None
        answer = http.get("/health/ready")
        assert answer.status_code == 503
        refusing = answer.json()["checks"]["transparency_log"]["refusing"]
        assert f"does not extend the signed tree of size {signed}" in refusing
        assert "tlog_checkpoint_refusing 1.0" in http.get("/metrics").text
    assert "refusing to sign a checkpoint" in service.log()
