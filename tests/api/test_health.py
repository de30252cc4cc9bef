"""Health endpoints over HTTP against a real database (and against one that is not there)."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
from litestar.testing import TestClient

from service.app import create_app
from infra.settings import Settings


def settings(**changes) -> Settings:
    return msgspec.structs.replace(Settings.from_env(), **changes)


def wait_ready(client, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get("/health/ready")
        if response.status_code == 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_live_at_once_and_ready_once_the_model_is_warm(database):
    app = create_app(settings(), database.app_dsn)
    with TestClient(app) as client:
        assert client.get("/health/live").json() == {"status": "live"}
        response = wait_ready(client)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "ready"
        assert body["checks"]["database"]["ok"] and body["checks"]["migrations"] == {"ok": True, "pending": []}
        assert body["checks"]["model"]["warm"] and body["checks"]["model"]["registered"]
        # the model's registration event is projected shortly after readiness
        deadline = time.monotonic() + 10
        while client.get("/health/ready").json()["checks"]["projection"]["lag_events"] != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_ready_is_red_with_problem_free_details_when_the_database_is_unreachable():
    app = create_app(settings(connect_timeout_s=2.0), "postgresql://audit_app@127.0.0.1:9/nowhere")
    with TestClient(app) as client:
        assert client.get("/health/live").status_code == 200
        response = client.get("/health/ready")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["checks"]["database"]["ok"] is False
        # The model cannot be registered without a database, so the service is not ready to
        # predict: 503 warming_up (an outage after start-up answers database_unavailable:
        # tests/test_faults.py drills that path).
        upload = client.post("/prediction/", content=b"x", headers={"content-type": "image/png"})
        assert upload.status_code == 503 and upload.headers["retry-after"] == "1"
        assert upload.headers["content-type"].startswith("application/problem+json")
        assert upload.json()["type"] == "urn:problem:warming_up"
        # a read that needs the database says so
        listed = client.get("/predictions/")
        assert listed.status_code == 503 and listed.json()["type"] == "urn:problem:database_unavailable"


def test_unknown_route_and_wrong_method_answer_problem_json(database):
    app = create_app(settings(model_path=Path("/nonexistent/model.keras")), database.app_dsn)
    with TestClient(app) as client:
        response = client.get("/no/such/route")
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == 404
        response = client.post("/health/live")
        assert response.status_code == 405
        assert response.headers["content-type"].startswith("application/problem+json")
