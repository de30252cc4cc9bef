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
from domain.chain import GENESIS_HASH, link
from projections.checkpoints import ChainHeadCheckpointer, load_or_create_key, read_all
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
    return start_service(CHECKPOINT_INTERVAL_S="0.1")


@pytest.fixture
async def populated(database, app_pool):
    """A log of predictions, projected, with its head signed, as a running service leaves it
    (without paying for TensorFlow)."""
    outcomes = await EventStore(app_pool).append([prediction_request(label=str(i)) for i in range(4)])
    head = outcomes[-1].head_position
    key = load_or_create_key(Path(os.environ["CHECKPOINT_KEY"]))
    checkpointer = ChainHeadCheckpointer(database.app_dsn, Path(os.environ["CHECKPOINT_DIR"]), key, interval_s=0.05)
    await checkpointer.start()
    runner = ProjectionRunner(database.app_dsn, poll_interval_s=0.05, on_applied=checkpointer.on_applied)
    await runner.start()
    for _ in range(200):
        if runner.position == head:
            break
        await asyncio.sleep(0.05)
    await runner.stop()
    await checkpointer.stop()
    assert runner.position == head
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


async def signed_heads(owner_dsn: str) -> list:
    connection = await asyncpg.connect(owner_dsn)
    try:
        log_id = str(await connection.fetchval("SELECT log_id FROM log_identity"))
    finally:
        await connection.close()
    return read_all(Path(os.environ["CHECKPOINT_DIR"]), log_id)


def settle_checkpoints(service) -> None:
    """Stop the service: the projector finishes and the last applied head is signed."""
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
    # Every signed head on disk was checked, and the last one covers the whole log.
    kept = await signed_heads(database.owner_dsn)
    assert kept and f"outside checkpoints: {len(kept)} checked" in result.stdout
    assert kept[-1].checkpoint.position >= answers[-1]["receipt"]["events"][-1]["position"]

    forged = dict(answers[2]["receipt"])
    forged["events"] = [dict(forged["events"][0], hash="00" * 32), forged["events"][1]]
    receipt_file.write_text(json.dumps(forged))
    result = run_verify(database.owner_dsn, "--receipt", str(receipt_file))
    assert result.returncode == 1 and "receipt" in result.stdout


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


async def test_a_forward_rewrite_is_caught_by_the_outside_checkpoint(populated, database):
    connection = await asyncpg.connect(database.owner_dsn)
    try:
        async with connection.transaction():
            await connection.execute("ALTER TABLE events DISABLE TRIGGER USER")
            await connection.execute(
                "UPDATE events SET data = replace(data::text, 'digit', 'Digit')::json WHERE position = 3"
            )
            previous = GENESIS_HASH
            for row in await connection.fetch("SELECT * FROM events ORDER BY position"):
                previous = link(previous, stored_event(row).chained())
                await connection.execute("UPDATE events SET hash = $1 WHERE position = $2", previous, row["position"])
            await connection.execute("ALTER TABLE events ENABLE TRIGGER USER")
    finally:
        await connection.close()
    result = run_verify(database.owner_dsn)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "outside checkpoint" in result.stdout and "rewritten" in result.stdout


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
