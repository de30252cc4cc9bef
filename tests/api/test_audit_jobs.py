"""Verify and reproduce on request, over HTTP, run by a real service with the real commands."""

from __future__ import annotations

import time
import uuid

import asyncpg
import pytest

from tests.fixtures import digit_files

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def service_env() -> dict[str, str]:
    return {"CHECKPOINT_INTERVAL_MS": "100"}


def upload(client, index: int) -> dict:
    path, _ = digit_files()[index]
    answer = client.post("/prediction/", files={"file": (path.name, path.read_bytes(), "image/png")},
                         headers={"Prefer": "wait=checkpoint"})
    assert answer.status_code == 201, answer.text
    return answer.json()


def finished(client, job: dict, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = client.get(f"/audit/jobs/{job['id']}")
        assert answer.status_code == 200, answer.text
        if answer.json()["finished_at"] is not None:
            return answer.json()
        time.sleep(0.2)
    raise AssertionError(f"job {job['id']} did not finish: {answer.json()}")


def test_verify_on_request_passes_and_is_listed(client):
    upload(client, 0)
    answer = client.post("/audit/jobs", json={"kind": "verify"})
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/audit/jobs/{job['id']}" and job["state"] in ("waiting", "running")
    done = finished(client, job)
    assert done["state"] == "passed" and done["ok"] is True, done
    assert done["verdict"].startswith("OK: ") and done["report"]["verify"]["events"] >= 3
    assert any("signed checkpoint(s) checked" in note for note in done["report"]["notes"])
    listed = client.get("/audit/jobs", params={"kind": "verify"}).json()["items"]
    assert listed[0]["id"] == job["id"]


def test_reproduce_on_request_gives_the_verdict(client):
    made = upload(client, 1)
    job = client.post("/audit/jobs", json={"kind": "reproduce", "prediction_id": made["prediction_id"]}).json()
    done = finished(client, job)
    assert done["state"] == "passed" and done["verdict"].startswith("reproduced: "), done
    assert done["report"]["tensor_identical"] is True and done["prediction_id"] == made["prediction_id"]
    mine = client.get("/audit/jobs", params={"prediction_id": made["prediction_id"]}).json()["items"]
    assert [j["id"] for j in mine] == [job["id"]]


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"kind": "reproduce", "prediction_id": str(uuid.uuid4())}, 404, "prediction_not_found"),
    ({"kind": "reproduce"}, 422, "invalid_audit_job"),
    ({"kind": "verify", "prediction_id": str(uuid.uuid4())}, 422, "invalid_audit_job"),
    ({"kind": "rebuild"}, 400, None),
    ({"kind": "verify", "extra": 1}, 400, None),
])
def test_a_bad_request_is_a_problem(client, body, status, code):
    answer = client.post("/audit/jobs", json=body)
    assert answer.status_code == status and answer.headers["content-type"] == "application/problem+json", answer.text
    if code:
        assert answer.json()["type"] == f"urn:problem:{code}"


def test_an_unknown_job_is_404(client):
    answer = client.get("/audit/jobs/999999")
    assert answer.status_code == 404 and answer.json()["type"] == "urn:problem:audit_job_not_found"


async def test_verify_on_request_names_a_tampered_event(client, module_database):
    """Last in the module: it leaves the log tampered."""
    made = upload(client, 2)
    position = made["receipt"]["events"][1]["position"]
    connection = await asyncpg.connect(module_database.owner_dsn)
    try:
        async with connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")
            await connection.execute(
                "UPDATE events SET data = ('{\"tampered\":true,' || substr(data::text, 2))::json WHERE position = $1",
                position)
    finally:
        await connection.close()
    done = finished(client, client.post("/audit/jobs", json={"kind": "verify"}).json())
    assert done["state"] == "failed" and done["verdict"].startswith(f"FAILED: hash chain broken at position {position}:"), done
