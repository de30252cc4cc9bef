"""The transparency log over HTTP, checked the way an outsider would: only with the published
key, the RFC 9162 algorithms (domain/merkle.py, tested against the transparency-dev vectors)
and the C2SP formats, never with the service's own tables."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys

import httpx
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from domain import merkle
from domain.chain import ChainedRecord, canonical_bytes
from domain.signed_note import parse_verifier_key
from harness.live import ROOT
from projections.checkpoints import NoteKey, chain_head_of, open_checkpoint
from tests.fixtures import digit_files

pytestmark = pytest.mark.timeout(180)

WAIT = {"Prefer": "wait=checkpoint"}


@pytest.fixture(scope="module")
def service_env() -> dict[str, str]:
    return {"CHECKPOINT_INTERVAL_MS": "100"}


def upload(client, index: int = 0, headers: dict | None = None):
    path, _ = digit_files()[index % len(digit_files())]
    response = client.post("/prediction/", files={"file": (path.name, path.read_bytes(), "image/png")},
                           headers=headers or {})
    assert response.status_code == 201, response.text
    return response


def b64d(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def published_key(client) -> str:
    response = client.get("/checkpoint/key")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return response.text.strip()


def canonical(line: dict) -> bytes:
    fields = {k: line[k] for k in ("position", "stream_id", "stream_version", "schema_version", "recorded_at_us",
                                   "data", "metadata")}
    return canonical_bytes(ChainedRecord(event_type=line["type"], **fields))


def test_a_receipt_waits_for_its_checkpoint_and_proves_inclusion_with_the_published_key(client):
    response = upload(client, 0, WAIT)
    assert response.headers["preference-applied"] == "wait=checkpoint"
    receipt = response.json()["receipt"]
    key = published_key(client)
    name, _, _ = parse_verifier_key(key)
    checkpoint = open_checkpoint(receipt["checkpoint"], [key])
    assert checkpoint.origin == name
    events = client.get(f"/prediction/{receipt['stream_id']}/events").json()
    for event, line in zip(receipt["events"], events, strict=True):
        leaf = merkle.leaf_hash(canonical(line))  # from the event alone, as an auditor computes it
        assert event["leaf_index"] == line["position"] - 1 and b64d(event["leaf_hash"]) == leaf
        merkle.verify_inclusion(event["leaf_index"], checkpoint.size, leaf,
                                [b64d(p) for p in event["inclusion_proof"]], checkpoint.root_hash)
    chain_head = client.get(f"/events?after={checkpoint.size - 1}&limit=1").text
    assert chain_head_of(checkpoint).hex() == msgspec.json.decode(chain_head.splitlines()[0])["hash"]


def test_without_the_preference_the_receipt_carries_leaves_but_does_not_wait(client):
    receipt = upload(client, 1).json()["receipt"]
    assert receipt["checkpoint"] is None and all(e["inclusion_proof"] is None for e in receipt["events"])
    assert [e["leaf_index"] for e in receipt["events"]] == [e["position"] - 1 for e in receipt["events"]]


def test_proofs_by_position_and_consistency_between_checkpoints(client):
    first = upload(client, 2, WAIT).json()["receipt"]
    older = open_checkpoint(first["checkpoint"], [published_key(client)])
    for i in range(3):
        upload(client, 3 + i)
    newer_response = upload(client, 6, WAIT)
    newer = open_checkpoint(newer_response.json()["receipt"]["checkpoint"], [published_key(client)])
    assert newer.size > older.size

    position = first["events"][0]["position"]
    proof = client.get(f"/events/{position}/inclusion", params={"tree_size": newer.size}).json()
    assert proof["tree_size"] == newer.size and proof["leaf_index"] == position - 1
    merkle.verify_inclusion(position - 1, newer.size, b64d(first["events"][0]["leaf_hash"]),
                            [b64d(p) for p in proof["proof"]], newer.root_hash)

    latest = client.get(f"/events/{position}/inclusion").json()  # against the latest checkpoint
    signed = open_checkpoint(latest["checkpoint"], [published_key(client)])
    assert signed.size == latest["tree_size"] and b64d(latest["root_hash"]) == signed.root_hash

    consistency = client.get("/log/consistency", params={"first": older.size, "second": newer.size}).json()
    merkle.verify_consistency(older.size, newer.size, older.root_hash, newer.root_hash,
                              [b64d(p) for p in consistency["proof"]])
    with pytest.raises(merkle.ProofError):  # and not for another root
        merkle.verify_consistency(older.size, newer.size, hashlib.sha256(b"x").digest(), newer.root_hash,
                                  [b64d(p) for p in consistency["proof"]])

    history = client.get("/checkpoints", params={"limit": 500}).json()
    sizes = [c["tree_size"] for c in history]
    assert sizes == sorted(sizes, reverse=True) and older.size in sizes and newer.size in sizes


def test_tiles_and_entry_bundles_in_the_c2sp_layout(client):
    while open_checkpoint(client.get("/checkpoint").text, [published_key(client)]).size < 260:
        for i in range(20):
            upload(client, i)
        upload(client, 0, WAIT)
    checkpoint = open_checkpoint(client.get("/checkpoint").text, [published_key(client)])
    full = client.get("/tile/0/000")
    assert full.status_code == 200 and len(full.content) == 256 * 32
    assert full.headers["cache-control"] == "public, max-age=31536000, immutable"
    bundle = client.get("/tile/entries/000")
    entries = merkle.parse_entry_bundle(bundle.content)
    assert len(entries) == 256 and bundle.headers["cache-control"].endswith("immutable")
    leaves = [merkle.leaf_hash(entry) for entry in entries]
    assert b"".join(leaves) == full.content
    events = [msgspec.json.decode(line) for line in client.get("/events?after=0&limit=256").text.splitlines()]
    assert entries == [canonical(line) for line in events]

    # The tree of the checkpoint, from tiles only: what a tlog client does.
    width = checkpoint.size - 256
    partial = client.get(f"/tile/0/001.p/{width}")
    assert partial.status_code == 200 and len(partial.content) == width * 32
    assert partial.headers["cache-control"] == "no-cache"
    level0 = full.content + partial.content
    leaf_hashes = [level0[i : i + 32] for i in range(0, len(level0), 32)]
    assert merkle.root(leaf_hashes) == checkpoint.root_hash
    level1 = client.get("/tile/1/000.p/1")
    assert level1.content == merkle.root(leaf_hashes[:256])

    for missing in ("/tile/0/999", "/tile/0/001", "/tile/entries/x001/000", "/tile/0/01", "/tile/64/000",
                    "/tile/0/000.p/256", "/tile/0/x000/001"):
        answer = client.get(missing)
        assert answer.status_code == 404 and answer.headers["content-type"] == "application/problem+json", missing


def test_bad_proof_requests_are_problems_not_errors(client):
    head = open_checkpoint(client.get("/checkpoint").text, [published_key(client)]).size
    cases = {
        f"/events/{head + 10**6}/inclusion": 404,
        f"/events/5/inclusion?tree_size={head + 10**6}": 404,
        "/events/5/inclusion?tree_size=2": 400,
        "/events/0/inclusion": 400,
        "/log/consistency?first=5&second=3": 400,
        "/log/consistency": 400,
        "/log/consistency?first=0&second=3": 400,
    }
    for path, status in cases.items():
        answer = client.get(path)
        assert answer.status_code == status, (path, answer.text)
        assert answer.headers["content-type"] == "application/problem+json"


def run_verify_receipt(service, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "cli", "verify-receipt", *args, "--url", service.url],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_verify_receipt_checks_signature_inclusion_and_consistency(service, client, tmp_path):
    key = published_key(client)
    older = tmp_path / "older.note"
    older.write_text(client.get("/checkpoint").text)
    answer = upload(client, 7, WAIT).json()
    upload(client, 8, WAIT)
    saved = tmp_path / "answer.json"
    saved.write_text(json.dumps(answer))

    done = run_verify_receipt(service, str(saved), "--key", key, "--checkpoint", str(older))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "inclusion: 2 event(s)" in done.stdout and "consistency: " in done.stdout and "OK" in done.stdout

    forged = json.loads(json.dumps(answer))
    forged["receipt"]["events"][1]["leaf_hash"] = base64.b64encode(hashlib.sha256(b"forged").digest()).decode()
    saved.write_text(json.dumps(forged))
    done = run_verify_receipt(service, str(saved), "--key", key)
    assert done.returncode == 1 and f"event at {answer['receipt']['events'][1]['position']}" in done.stdout, done.stdout

    saved.write_text(json.dumps(answer))
    stranger = Ed25519PrivateKey.generate()
    name, _, _ = parse_verifier_key(key)
    done = run_verify_receipt(service, str(saved), "--key", NoteKey(name, stranger).verifier_key)
    assert done.returncode == 1 and "signed by no trusted key" in done.stdout, done.stdout

    body, signatures = older.read_text().rsplit("\n\n", 1)  # flip the note's last character
    older.write_text(body[:-1] + ("0" if body[-1] != "0" else "1") + "\n\n" + signatures)
    done = run_verify_receipt(service, str(saved), "--key", key, "--checkpoint", str(older))
    assert done.returncode == 1 and "--checkpoint" in done.stdout, done.stdout


def test_with_api_keys_hashes_are_public_and_entry_bundles_need_the_audit_scope(start_service):
    keyed = start_service(CHECKPOINT_INTERVAL_MS="100", API_KEYS="up@up-key:predict;aud@aud-key:audit,read")
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        path, _ = digit_files()[0]
        for i in range(130):
            answer = http.post("/prediction/", files={"file": (path.name, path.read_bytes(), "image/png")},
                               headers={"Authorization": "Bearer up-key", **(WAIT if i == 129 else {})})
            assert answer.status_code == 201
        for public in ("/checkpoint", "/checkpoint/key", "/checkpoints", "/tile/0/000", "/events/1/inclusion",
                       "/log/consistency?first=1"):
            assert http.get(public).status_code == 200, public
        auditor = {"Authorization": "Bearer aud-key"}
        bundle = http.get("/tile/entries/000", headers=auditor)
        assert bundle.status_code == 200 and len(merkle.parse_entry_bundle(bundle.content)) == 256
        # Held in memory now, and still not served without the scope (nor with another one).
        assert http.get("/tile/entries/000").status_code == 401
        assert http.get("/tile/entries/000", headers={"Authorization": "Bearer up-key"}).status_code == 403
        tile = http.get("/tile/0/000")  # a cached full tile, answered before the framework
        assert tile.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert tile.headers["content-type"] == "application/octet-stream" and len(tile.content) == 256 * 32
        assert tile.content == b"".join(merkle.leaf_hash(e) for e in merkle.parse_entry_bundle(bundle.content))
        metrics = http.get("/metrics", headers=auditor).text
        assert 'route="/tile/{rest:path}"' in metrics
