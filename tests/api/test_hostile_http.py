"""Hostile requests that once escaped as 5xx or held a connection open, and settings that once
switched authentication off: each answers a problem (or refuses to start) and stores nothing."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

import asyncpg
import httpx
import msgspec
import pytest

from cli.serve import check_exposure
from infra.settings import Settings, SettingsError, parse_api_keys
from harness.live import ROOT

pytestmark = pytest.mark.timeout(180)

HEADER_TIMEOUT_S = 1.0
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def service_env() -> dict[str, str]:
    return {"HEADER_READ_TIMEOUT_S": str(HEADER_TIMEOUT_S)}


async def stored_rows(owner_dsn: str) -> tuple[int, int, int]:
    connection = await asyncpg.connect(owner_dsn)
    try:
        row = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM blobs), (SELECT count(*) FROM idempotency_keys)"
        )
        return tuple(row)  # type: ignore[return-value]
    finally:
        await connection.close()


def multipart(parts: list[bytes], boundary: bytes = b"XX") -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return body + b"--" + boundary + b"--\r\n"


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["type"] == f"urn:problem:{code}"


async def test_a_multipart_body_over_the_part_limit_is_400_and_stores_nothing(service, client, module_database):
    before = await stored_rows(module_database.owner_dsn)
    parts = [b'Content-Disposition: form-data; name="f%d"\r\n\r\nv' % i for i in range(17)]
    response = client.post(
        "/prediction/", content=multipart(parts), headers={"content-type": "multipart/form-data; boundary=XX"}
    )
    assert_problem(response, 400, "multipart_limit")
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(9))
    part = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\n' + headers + b"\r\nv"
    response = client.post(
        "/prediction/", content=multipart([part]), headers={"content-type": "multipart/form-data; boundary=XX"}
    )
    assert_problem(response, 400, "multipart_limit")
    assert await stored_rows(module_database.owner_dsn) == before


@pytest.mark.parametrize(
    "query",
    ["since=0001-01-01T00:00:00%2B01:00", "until=9999-12-31T23:59:59-14:00", "since=9999-12-31T23:59:59-00:01"],
)
def test_time_filters_outside_the_representable_range_are_400(client, query):
    assert_problem(client.get(f"/predictions/?{query}"), 400, "bad_time")


def test_a_text_filter_with_nul_is_400_not_500(client):
    # found by the OpenAPI fuzzer: PostgreSQL text cannot hold NUL
    assert_problem(client.get("/predictions/", params={"model_version": "1\x00"}), 400, "bad_parameter")


def test_the_extreme_representable_times_are_answered(client):
    response = client.get("/predictions/?since=0001-01-01T00:00:00Z&until=9999-12-31T23:59:59Z")
    assert response.status_code == 200, response.text


def read_answer(connection: socket.socket, timeout_s: float) -> bytes:
    connection.settimeout(timeout_s)
    answer = b""
    while True:
        chunk = connection.recv(4096)
        if not chunk:
            return answer
        answer += chunk


def test_headers_that_trickle_in_get_408_problem_and_the_connection_closes(service):
    request = b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    started = time.monotonic()  # before connecting: the server's deadline starts when it accepts
    with socket.create_connection(("127.0.0.1", service.port)) as connection:
        connection.settimeout(0.2)
        answer = b""
        for byte in request:  # one byte every 50 ms: 10 s for the whole request
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                break
            try:
                answer += connection.recv(4096)
            except TimeoutError:
                pass
            if b"\r\n\r\n" in answer or time.monotonic() - started > 5:
                break
        answer += read_answer(connection, 2)
        took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"application/problem+json" in answer and b"urn:problem:header_timeout" in answer
    # The event loop may run a timer up to its clock resolution early (CI measured 0.99999 s).
    assert HEADER_TIMEOUT_S - 0.01 <= took < HEADER_TIMEOUT_S + 2


def test_a_connection_that_sends_nothing_is_closed_after_the_header_deadline(service):
    with socket.create_connection(("127.0.0.1", service.port)) as connection:
        started = time.monotonic()
        answer = read_answer(connection, HEADER_TIMEOUT_S + 3)
        assert b"urn:problem:header_timeout" in answer
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 2


def test_kept_alive_connections_and_prompt_headers_are_not_cut(service):
    with httpx.Client(base_url=service.url, timeout=10) as http:
        for _ in range(3):
            assert http.get("/health/live").status_code == 200
            time.sleep(HEADER_TIMEOUT_S / 2)  # idle between requests is the keep-alive's business


def test_a_request_that_is_not_http_gets_400_problem_json(service):
    with socket.create_connection(("127.0.0.1", service.port)) as connection:
        connection.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = read_answer(connection, 5)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/problem+json" in head
    assert msgspec.json.decode(body)["status"] == 400


@pytest.mark.parametrize("spec", [";", " ", ";;", " ; "])
def test_api_keys_of_separators_or_blanks_refuse_to_start(spec):
    with pytest.raises(SettingsError):
        parse_api_keys(spec)
    env = {**os.environ, "API_KEYS": spec, "PYTHONPATH": str(ROOT), "DATABASE_URL": "postgresql://nobody@127.0.0.1:9/x"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cli", "serve"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "API_KEYS" in done.stderr
    assert time.monotonic() - started < 30  # refused before any database or model work


@pytest.mark.parametrize("spec", ["k", "k:", "k:nosuchscope", ":read", "@k:read"])
def test_malformed_api_keys_are_refused(spec):
    with pytest.raises(SettingsError):
        parse_api_keys(spec)


def test_unset_api_keys_mean_no_keys_and_a_good_spec_parses_with_names():
    assert parse_api_keys(None) == {}
    keys = parse_api_keys("a:read;labeller@b:predict,label;")
    assert sorted((key.name, sorted(key.scopes)) for key in keys.values()) == [
        (f"key-{hashlib.sha256(b'a').hexdigest()[:8]}", ["read"]),
        ("labeller", ["label", "predict"]),
    ]
    assert hashlib.sha256(b"b").digest() in keys  # the name is not part of the key


def _settings(**changes) -> Settings:
    return msgspec.structs.replace(Settings.from_env(), **changes)


def test_a_non_loopback_host_without_keys_refuses_to_start_unless_allowed():
    with pytest.raises(SystemExit, match="API_KEYS"):
        check_exposure(_settings(host="0.0.0.0", api_keys={}, allow_unauthenticated=False))
    check_exposure(_settings(host="0.0.0.0", api_keys={}, allow_unauthenticated=True))
    check_exposure(_settings(host="0.0.0.0", api_keys=parse_api_keys("k:read"), allow_unauthenticated=False))
    check_exposure(_settings(host="127.0.0.1", api_keys={}, allow_unauthenticated=False))
    check_exposure(_settings(host="::1", api_keys={}, allow_unauthenticated=False))
