"""The HTTP API over real HTTP, against a real `python -m cli serve` and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import time
import uuid

import asyncpg
import numpy as np
import httpx
import pytest
from PIL import Image

from tests.fixtures import digit_files

pytestmark = pytest.mark.timeout(180)

PROBLEM = "application/problem+json"


def digit(i: int = 0) -> tuple[bytes, int, str]:
    path, label = digit_files()[i]
    return path.read_bytes(), label, path.name


def upload(client: httpx.Client, content: bytes, filename: str = "d.png", content_type: str = "image/png", **kw):
    return client.post("/prediction/", files={"file": (filename, content, content_type)}, **kw)


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body = response.json()
    assert body["status"] == status and body["type"].startswith("urn:problem:") and body["detail"]
    return body


def test_upload_answers_201_with_the_seed_fields_model_and_receipt(client):
    content, label, name = digit(3)
    response = upload(client, content, filename=name)
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/prediction/{body['prediction_id']}"
    assert response.headers["x-request-id"]
    for seed_field in ("filename", "contenttype", "prediction", "likely_class", "input_id", "prediction_id"):
        assert seed_field in body
    assert body["filename"] == name and body["contenttype"] == "image/png"
    assert len(body["prediction"]) == 10 and abs(sum(body["prediction"]) - 1) < 1e-4
    assert body["likely_class"] == label
    assert body["input_id"] != body["prediction_id"]
    assert body["blob_sha256"] == hashlib.sha256(content).hexdigest()
    assert body["model"]["name"] == "mnist_convnet" and len(body["model"]["sha256"]) == 64
    assert body["model"]["device"].endswith("CPU:0")
    receipt = body["receipt"]
    assert [e["type"] for e in receipt["events"]] == ["PredictionRequested", "PredictionMade"]
    assert receipt["head"]["position"] >= receipt["events"][-1]["position"]
    assert receipt["stream_id"] == body["prediction_id"] and uuid.UUID(receipt["log_id"])


def test_raw_body_upload_gives_the_same_answer_without_multipart(client):
    content, label, _ = digit(5)
    response = client.post(
        "/prediction/", content=content, params={"filename": "raw name.png"}, headers={"content-type": "image/png"}
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["filename"] == "raw name.png" and body["likely_class"] == label
    header_named = client.post(
        "/prediction/", content=content,
        headers={"content-type": "image/png", "x-filename": "%C3%BCber%2Fdigit.png"},
    )
    assert header_named.status_code == 201 and header_named.json()["filename"] == "über/digit.png"


def test_read_your_writes_get_and_list_right_after_post(client):
    content, label, name = digit(7)
    created = upload(client, content, filename=name).json()
    got = client.get(f"/prediction/{created['prediction_id']}")
    assert got.status_code == 200, got.text
    view = got.json()
    assert view["prediction_id"] == created["prediction_id"] and view["input_id"] == created["input_id"]
    assert view["prediction"] == created["prediction"] and view["likely_class"] == label
    assert view["status"] == "made" and view["error"] is None
    prefix = "data:image/png;base64,"
    assert view["image"].startswith(prefix) and base64.b64decode(view["image"][len(prefix):]) == content
    listed = client.get("/predictions/", params={"limit": 5}).json()
    assert listed["items"][0]["prediction_id"] == created["prediction_id"]
    assert "image" not in listed["items"][0] or listed["items"][0]["image"] is None


def test_list_is_newest_first_paginates_by_cursor_and_filters(client):
    made = [upload(client, digit(i)[0], filename=f"page{i}.png").json() for i in range(10, 16)]
    seen, cursor = [], None
    while True:
        params = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        page = client.get("/predictions/", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        seen += [item["prediction_id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    ours = [m["prediction_id"] for m in reversed(made)]
    assert [s for s in seen if s in ours] == ours  # newest first
    positions = [item["position"] for item in client.get("/predictions/", params={"limit": 500}).json()["items"]]
    assert positions == sorted(positions, reverse=True)

    label = made[0]["likely_class"]
    by_class = client.get("/predictions/", params={"class": label, "limit": 500}).json()["items"]
    assert by_class and all(item["likely_class"] == label for item in by_class)
    version = made[0]["model"]["version"]
    assert client.get("/predictions/", params={"model_version": version}).json()["items"]
    assert client.get("/predictions/", params={"model_version": "no-such-version"}).json()["items"] == []
    newest = client.get(f"/prediction/{made[-1]['prediction_id']}").json()["created_at"]
    until_items = client.get("/predictions/", params={"until": newest, "limit": 500}).json()["items"]
    assert made[-1]["prediction_id"] not in [i["prediction_id"] for i in until_items]
    since_items = client.get("/predictions/", params={"since": newest, "limit": 500}).json()["items"]
    assert made[-1]["prediction_id"] in [i["prediction_id"] for i in since_items]


def test_input_returns_the_original_bytes_with_a_sniffed_type(client):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(digit(20)[0])).save(buffer, format="JPEG", quality=95)
    jpeg = buffer.getvalue()
    created = upload(client, jpeg, filename="x.png", content_type="image/png").json()  # declared wrongly
    response = client.get(f"/input/{created['input_id']}")
    assert response.status_code == 200
    assert response.content == jpeg
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert_problem(client.get(f"/input/{uuid.uuid4()}"), 404)


def auditor_hash(previous: bytes, line: dict) -> bytes:
    """The README's hash format, written from the documentation alone (not domain/chain.py)."""
    data, metadata = line["data"].encode(), line["metadata"].encode()
    header = "|".join(
        str(part) for part in (
            line["position"], line["stream_id"], line["stream_version"], line["type"],
            line["schema_version"], line["recorded_at_us"], len(data), len(metadata),
        )
    ) + "|"
    return hashlib.sha256(previous + header.encode() + data + metadata).digest()


def test_events_as_ndjson_verify_with_an_auditors_own_script(client):
    created = upload(client, digit(30)[0]).json()
    response = client.get("/events", params={"after": 0, "limit": 10_000})
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.text.splitlines()]
    previous = bytes(32)
    for expected_position, line in enumerate(lines, start=1):
        assert line["position"] == expected_position
        previous = auditor_hash(previous, line)
        assert previous.hex() == line["hash"]
    receipt = {e["position"]: e["hash"] for e in created["receipt"]["events"]}
    assert all(lines[p - 1]["hash"] == h for p, h in receipt.items())
    page = client.get("/events", params={"after": 2, "limit": 3}).text.splitlines()
    assert [json.loads(line)["position"] for line in page] == [3, 4, 5]
    stream = client.get(f"/prediction/{created['prediction_id']}/events").json()
    assert [e["type"] for e in stream] == ["PredictionRequested", "PredictionMade"]
    assert json.loads(stream[1]["data"])["output"] == created["prediction"]


def test_model_and_openapi_and_metrics(client):
    model = client.get("/model").json()
    assert model["name"] == "mnist_convnet" and model["input_shape"] == [28, 28, 1]
    assert model["output_kind"] == "vector" and model["num_classes"] == 10 and model["device"]
    assert model["preprocessing"]["height"] == 28
    schema = client.get("/schema/openapi.json").json()
    assert "/prediction" in schema["paths"] and "/events" in schema["paths"]
    assert "multipart/form-data" in schema["paths"]["/prediction"]["post"]["requestBody"]["content"]
    assert upload(client, digit(0)[0]).status_code == 201
    hostile = "/prediction/' OR 1=1 --"
    assert_problem(client.get(hostile), 404)  # not a route: an id that is not a UUID matches none
    assert_problem(client.get(f"/prediction/{uuid.uuid4()}"), 404)
    metrics = client.get("/metrics").text
    assert 'route="/prediction/{prediction_id}"' in metrics and 'route="/prediction"' in metrics
    assert "OR 1=1" not in metrics
    assert "inference_batch_size_bucket" in metrics and "projection_lag_events" in metrics
    assert "event_commit_group_size_count" in metrics


def test_readiness_reports_every_check(client):
    body = client.get("/health/ready").json()
    assert body["status"] == "ready"
    assert set(body["checks"]) >= {"database", "migrations", "model", "projection"}
    assert body["checks"]["model"]["warm"] and body["checks"]["model"]["registered"]
    assert body["checks"]["projection"]["lag_events"] >= 0


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        ({"files": {"file": ("t.txt", b"hello, I am text", "text/plain")}}, 415),
        ({"files": {"file": ("e.png", b"", "image/png")}}, 422),
        ({"files": {"file": ("r.png", bytes(range(256)) * 4, "image/png")}}, 415),
        ({"files": {"file": ("t.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png")}}, 422),
        ({"files": {"other": ("d.png", b"x", "image/png")}}, 422),
        ({"content": b"plain text", "headers": {"content-type": "text/plain"}}, 415),
        ({"content": b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
          "headers": {"content-type": "image/svg+xml"}}, 415),
        ({"content": b"<html><script>alert(1)</script></html>", "headers": {"content-type": "image/png"}}, 415),
        ({"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}}, 400),
    ],
)
def test_bad_uploads_get_a_clear_problem_and_store_nothing(client, request_kwargs, status):
    before = client.get("/events", params={"after": 0, "limit": 10_000}).text.count("\n")
    assert_problem(client.post("/prediction/", **request_kwargs), status)
    assert client.get("/events", params={"after": 0, "limit": 10_000}).text.count("\n") == before


def test_truncated_png_is_422(client):
    content = digit(1)[0]
    assert_problem(upload(client, content[: len(content) // 2]), 422)


def test_decompression_bomb_is_refused_fast(client):
    buffer = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buffer, format="PNG")  # 100 Mpx, a few KB compressed
    started = time.monotonic()
    response = upload(client, buffer.getvalue())
    assert time.monotonic() - started < 1.0  # refused from the header, before any decoding
    body = assert_problem(response, 422)
    assert "pixels" in body["detail"] or "large" in body["detail"]


def test_too_large_upload_is_413(client):
    assert_problem(upload(client, b"\x89PNG" + b"\x00" * (10 * 1024 * 1024 + 10)), 413)


@pytest.mark.parametrize(
    "filename",
    [
        "'; DROP TABLE events; --.png",
        "../../etc/passwd",
        "dir\\sub\\x.png",
        "ünïcødé 数字 🙂.png",
        "x" * 1000 + ".png",
        "quote\"and'apostrophe.png",
    ],
)
def test_hostile_filenames_are_data_stored_and_returned_verbatim(client, filename):
    response = client.post(
        "/prediction/", content=digit(2)[0], params={"filename": filename}, headers={"content-type": "image/png"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == filename
    assert client.get(f"/prediction/{response.json()['prediction_id']}").json()["filename"] == filename


def test_filenames_postgres_cannot_hold_or_too_long_are_422(client):
    for filename in ("nul\x00byte.png", "y" * 10_000):
        response = client.post(
            "/prediction/", content=digit(2)[0], params={"filename": filename}, headers={"content-type": "image/png"}
        )
        assert_problem(response, 422)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/prediction/not-a-uuid", 404),
        ("/prediction/12345678-1234-1234-1234-1234567890ab", 404),
        ("/prediction/00000000-0000-0000-0000-000000000000/events", 404),
        ("/input/%27%20OR%201%3D1", 404),
        ("/events?after=-1", 400),
        ("/events?after=9223372036854775808", 400),
        ("/events?after=99999999999999999999999999", 400),
        ("/events?limit=0", 400),
        ("/events?limit=100001", 400),
        ("/predictions/?limit=0", 400),
        ("/predictions/?cursor=abc", 400),
        ("/predictions/?cursor=99999999999999999999", 400),
        ("/predictions/?class=-1", 400),
        ("/predictions/?since=yesterday", 400),
    ],
)
def test_malformed_ids_and_parameters_are_4xx_problems(client, path, status):
    assert_problem(client.get(path), status)


def test_wrong_method_is_405_problem(client):
    assert_problem(client.delete("/predictions/"), 405)


def test_bad_idempotency_key_is_400(client):
    assert_problem(upload(client, digit(0)[0], headers={"Idempotency-Key": "spaces are not allowed"}), 400)


async def count_events(dsn: str, stream_ids: list[str]) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        return await connection.fetchval(
            "SELECT count(*) FROM events WHERE stream_id = ANY($1::uuid[])", [uuid.UUID(s) for s in stream_ids]
        )
    finally:
        await connection.close()


async def test_idempotent_retries_sequential_and_concurrent_append_nothing(service, module_database):
    content = digit(40)[0]
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
        async def post(key: str, body: bytes = content):
            return await http.post(
                "/prediction/", files={"file": ("k.png", body, "image/png")}, headers={"Idempotency-Key": key}
            )

        first = await post("seq-key-1")
        again = await post("seq-key-1")
        assert first.status_code == again.status_code == 201
        assert again.json()["prediction_id"] == first.json()["prediction_id"]
        assert again.json()["prediction"] == first.json()["prediction"]
        assert again.json()["receipt"]["events"] == first.json()["receipt"]["events"]

        concurrent = await asyncio.gather(*(post("concurrent-key-1") for _ in range(12)))
        assert {r.status_code for r in concurrent} == {201}
        ids = {r.json()["prediction_id"] for r in concurrent}
        assert len(ids) == 1
        assert await count_events(module_database.owner_dsn, [first.json()["prediction_id"], *ids]) == 4

        reused = await post("seq-key-1", digit(41)[0])
        assert_problem(reused, 422)


async def _young_collections(http: httpx.AsyncClient) -> float:
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith('python_gc_collections_total{generation="0"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no python_gc_collections_total in /metrics")


async def test_300_concurrent_uploads_with_default_settings(service, module_database):
    files = digit_files()
    async with httpx.AsyncClient(base_url=service.url, timeout=120, limits=httpx.Limits(max_connections=300)) as http:
        async def post(i: int):
            path, _ = files[i % len(files)]
            return await http.post("/prediction/", files={"file": (f"c{i}.png", path.read_bytes(), "image/png")})

        collections_before = await _young_collections(http)
        responses = await asyncio.gather(*(post(i) for i in range(300)))
        collections = await _young_collections(http) - collections_before
    assert [r.status_code for r in responses] == [201] * 300, {r.status_code: r.text for r in responses}
    # Objects of requests in flight die by refcount: the collector has no business walking them
    # (with Python's default gen-0 threshold this load ran 10 collections; with ours, none).
    assert collections <= 3, collections
    ids = [r.json()["prediction_id"] for r in responses]
    assert len(set(ids)) == 300
    assert len({r.json()["input_id"] for r in responses}) == 300
    assert await count_events(module_database.owner_dsn, ids) == 600


def _image_bytes(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def _hostile_images() -> dict[str, tuple[bytes, int]]:
    base = Image.open(io.BytesIO(digit(9)[0])).convert("L")
    frames = [base, base.rotate(90), base.rotate(180)]
    sixteen = Image.fromarray((np.asarray(base, dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "16-bit PNG": (_image_bytes(sixteen, "PNG"), 201),
        "CMYK JPEG": (_image_bytes(base.convert("CMYK"), "JPEG"), 201),
        "palette GIF": (_image_bytes(base.convert("P"), "GIF"), 201),
        "animated GIF": (_image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]), 201),
        "RGBA PNG": (_image_bytes(base.convert("RGBA"), "PNG"), 201),
        "1-pixel PNG": (_image_bytes(Image.new("L", (1, 1), 255), "PNG"), 201),
        "10000-pixel-wide PNG": (_image_bytes(Image.new("L", (10_000, 3), 0), "PNG"), 201),
        "TIFF": (_image_bytes(base, "TIFF"), 201),
        "BMP": (_image_bytes(base, "BMP"), 201),
        "WEBP": (_image_bytes(base, "WEBP", lossless=True), 201),
        "ICO (not allowed)": (_image_bytes(base, "ICO"), 415),
        "PPM (not allowed)": (_image_bytes(base, "PPM"), 415),
    }


@pytest.mark.parametrize("name", list(_hostile_images()))
def test_image_catalogue_gets_a_correct_2xx_or_a_clear_4xx(client, name):
    content, status = _hostile_images()[name]
    response = upload(client, content, filename=name)
    assert response.status_code == status, response.text
    if status == 201:
        body = response.json()
        assert 0 <= body["likely_class"] <= 9
        assert client.get(f"/input/{body['input_id']}").content == content  # byte for byte
    else:
        assert response.headers["content-type"].startswith(PROBLEM)


def _decode_counts(client: httpx.Client) -> dict[str, float]:
    counts = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("image_decodes_total{"):
            where = line.split('where="')[1].split('"')[0]
            counts[where] = float(line.rsplit(" ", 1)[1])
    return counts


def test_small_images_decode_on_the_loop_large_ones_in_threads_with_the_same_answer(client):
    content, label, name = digit(5)
    large = _image_bytes(Image.open(io.BytesIO(content)).resize((400, 400)), "PNG")  # > 128×128
    before = _decode_counts(client)
    small_answer = upload(client, content, filename=name)
    middle = _decode_counts(client)
    large_answer = upload(client, large, filename="large.png")
    after = _decode_counts(client)
    assert small_answer.status_code == large_answer.status_code == 201, (small_answer.text, large_answer.text)
    assert middle["inline"] == before.get("inline", 0) + 1 and middle.get("thread", 0) == before.get("thread", 0)
    assert after["thread"] == middle.get("thread", 0) + 1 and after["inline"] == middle["inline"]
    assert small_answer.json()["likely_class"] == large_answer.json()["likely_class"] == label


def _stage_totals(client: httpx.Client) -> dict[str, tuple[float, float]]:
    """prediction_stage_seconds by stage: (count, sum)."""
    found: dict[str, list[float]] = {}
    for line in client.get("/metrics").text.splitlines():
        for part, index in (("_count{", 0), ("_sum{", 1)):
            if line.startswith(f"prediction_stage_seconds{part}"):
                stage = line.split('stage="')[1].split('"')[0]
                found.setdefault(stage, [0.0, 0.0])[index] = float(line.rsplit(" ", 1)[1])
    return {stage: (count, total) for stage, (count, total) in found.items()}


def test_each_upload_reports_its_time_in_each_stage(client):
    content, _, name = digit(3)
    before = _stage_totals(client)
    started = time.perf_counter()
    assert upload(client, content, filename=name).status_code == 201
    elapsed = time.perf_counter() - started
    after = _stage_totals(client)
    assert set(after) == {"decode", "inference", "record"}
    for stage, (count, total) in after.items():
        earlier_count, earlier_total = before.get(stage, (0.0, 0.0))
        assert count == earlier_count + 1, stage
        assert 0 < total - earlier_total < elapsed, stage
