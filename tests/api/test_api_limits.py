"""The API under tight settings: a model that fails, a tiny queue, a short body deadline, a small
upload limit and API keys with scopes. One real service process for the module."""

from __future__ import annotations

import asyncio
import io
import socket
import time

import httpx
import pytest
from PIL import Image

from tests.fixtures import MODELS, digit_files
from tests.processes import projection_workers

pytestmark = pytest.mark.timeout(180)

KEYS = {"predict": "p-key-123", "read": "r-key-456", "audit": "a-key-789", "all": "all-key-000"}
API_KEYS = f"{KEYS['predict']}:predict;{KEYS['read']}:read;{KEYS['audit']}:audit;{KEYS['all']}:predict,read,audit"
ALL = {"Authorization": f"Bearer {KEYS['all']}"}


@pytest.fixture(scope="module")
def service_env() -> dict[str, str]:
    return {
        "MODEL_PATH": str(MODELS / "nan_out.keras"),
        "MAX_QUEUE": "1",
        "MAX_BATCH": "1",
        "BODY_READ_TIMEOUT_S": "1",
        "MAX_UPLOAD_BYTES": str(64 * 1024),
        "API_KEYS": API_KEYS,
        "PROJECTIONS": "inline",  # the other modules run the default (a child process)
    }


def png(color: int, size: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def post(client, content: bytes, headers=ALL):
    return client.post("/prediction/", files={"file": ("x.png", content, "image/png")}, headers=headers)


def test_an_inference_failure_is_recorded_and_answered_500_with_ids_and_receipt(client):
    response = post(client, png(255))  # the NaN model's trigger: a bright image
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == "urn:problem:inference_failed" and body["error_code"] == "non_finite_output"
    assert [e["type"] for e in body["receipt"]["events"]] == ["PredictionRequested", "PredictionFailed"]
    view = client.get(f"/prediction/{body['prediction_id']}", headers=ALL).json()
    assert view["status"] == "failed" and view["prediction"] is None and view["likely_class"] is None
    assert view["error"]["code"] == "non_finite_output" and view["input_id"] == body["input_id"]
    # a dark image through the same model succeeds
    assert post(client, png(0)).status_code == 201


def test_api_keys_and_scopes(client):
    digit = digit_files()[0][0].read_bytes()
    assert post(client, digit, headers={}).status_code == 401
    assert post(client, digit, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert post(client, digit, headers={"X-API-Key": KEYS["read"]}).status_code == 403
    created = post(client, digit, headers={"X-API-Key": KEYS["predict"]})
    assert created.status_code == 201
    prediction = f"/prediction/{created.json()['prediction_id']}"
    for path, scope in [
        ("/predictions/", "read"), (prediction, "read"), ("/model", "read"), ("/metrics", "read"),
        (f"/input/{created.json()['input_id']}", "read"), ("/events", "audit"), (prediction + "/events", "audit"),
    ]:
        assert client.get(path).status_code == 401, path
        wrong = "audit" if scope == "read" else "read"
        denied = client.get(path, headers={"X-API-Key": KEYS[wrong]})
        assert denied.status_code == 403 and denied.headers["content-type"].startswith("application/problem+json")
        assert client.get(path, headers={"X-API-Key": KEYS[scope]}).status_code == 200, path
    for open_path in ("/health/live", "/health/ready", "/schema/openapi.json"):
        assert client.get(open_path).status_code == 200


def test_keys_never_appear_in_logs(service, client):
    client.get("/events", headers={"X-API-Key": "a-secret-that-is-wrong"})
    post(client, png(0), headers={"Authorization": f"Bearer {KEYS['all']}"})
    log = service.log()
    assert "a-secret-that-is-wrong" not in log and KEYS["all"] not in log


def test_upload_limit_is_a_setting(client):
    big = png(0, size=600) + b"\x00" * (70 * 1024)
    response = post(client, big)
    assert response.status_code == 413 and response.json()["max_bytes"] == 64 * 1024


async def test_a_full_queue_answers_503_with_retry_after_and_stores_nothing_for_it(service):
    digits = [path.read_bytes() for path, _ in digit_files()]
    async with httpx.AsyncClient(base_url=service.url, timeout=60, limits=httpx.Limits(max_connections=200)) as http:
        responses = await asyncio.gather(*(
            http.post("/prediction/", files={"file": ("q.png", digits[i % len(digits)], "image/png")}, headers=ALL)
            for i in range(200)
        ))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {201, 503}
        rejected = [r for r in responses if r.status_code == 503]
        assert rejected, "a queue of one never overflowed under 200 concurrent uploads"
        assert all(r.headers["retry-after"] == "1" and r.json()["type"] == "urn:problem:overloaded" for r in rejected)
        accepted = {r.json()["prediction_id"] for r in responses if r.status_code == 201}
        for prediction_id in accepted:
            assert (await http.get(f"/prediction/{prediction_id}", headers=ALL)).status_code == 200


def raw_request(port: int, head: bytes, body: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(head + body)
    return connection


def test_a_body_that_does_not_arrive_in_time_is_408(service, client):
    events_before = len(client.get("/events", params={"limit": 10000}, headers=ALL).text.splitlines())
    head = (
        b"POST /prediction/ HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Authorization: Bearer " + KEYS["all"].encode() + b"\r\nContent-Length: 5000\r\n\r\n"
    )
    connection = raw_request(service.port, head, b"\x89PNG\r\n\x1a\n")
    started = time.monotonic()
    answer = connection.recv(65536)
    elapsed = time.monotonic() - started
    connection.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"application/problem+json" in answer
    assert elapsed < 2 * 1 + 1  # the deadline is 1 s: bounded by twice the setting, plus slack
    assert len(client.get("/events", params={"limit": 10000}, headers=ALL).text.splitlines()) == events_before


def test_a_client_that_disconnects_mid_upload_leaves_nothing_and_harms_nobody(service, client):
    events_before = len(client.get("/events", params={"limit": 10000}, headers=ALL).text.splitlines())
    head = (
        b"POST /prediction/ HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Authorization: Bearer " + KEYS["all"].encode() + b"\r\nContent-Length: 5000\r\n\r\n"
    )
    for _ in range(5):
        raw_request(service.port, head, b"\x89PNG\r\n\x1a\n" + b"\x00" * 100).close()
    assert post(client, png(0)).status_code == 201
    time.sleep(0.2)
    assert len(client.get("/events", params={"limit": 10000}, headers=ALL).text.splitlines()) == events_before + 2


def test_projections_inline_run_in_the_service_and_keep_read_your_writes(service, client):
    ready = client.get("/health/ready").json()["checks"]["projection"]
    assert ready["runs"] == "inline" and ready["active_here"] is True
    assert projection_workers(service.process.pid) == []
    content = digit_files()[0][0].read_bytes()
    created = client.post("/prediction/", files={"file": ("d.png", content, "image/png")}, headers=ALL)
    assert created.status_code == 201, created.text  # the NaN model fails bright images only: a digit is dark
    listed = client.get("/predictions/", headers=ALL)
    assert created.json()["prediction_id"] in [item["prediction_id"] for item in listed.json()["items"]]
