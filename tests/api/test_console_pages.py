"""The console over plain HTTP (the browser suite drives the same pages in Chromium): every page
renders with its security headers, the charts carry the figures, the filters reach the SQL."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import asyncpg
import pytest
from PIL import Image

from tests.fixtures import digit_files

pytestmark = pytest.mark.timeout(180)


def upload(client, index: int) -> dict:
    path, _ = digit_files()[index]
    response = client.post("/prediction/", files={"file": (path.name, path.read_bytes(), "image/png")})
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def made(client) -> list[dict]:
    return [upload(client, i) for i in range(6)]


def test_the_root_goes_to_the_overview_which_counts_this_nodes_uploads_and_the_logs_day(client, made):
    assert client.get("/").headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert re.search(r"<dt>Uploads</dt><dd>([0-9,]+)", html).group(1) == "6"
    assert "6 made" in html
    # Each chart is an SVG with a title and a description; the hour chart has the made bars.
    for chart in ("chart-throughput", "chart-latency", "chart-day"):
        assert f'id="{chart}"' in html and f'aria-labelledby="{chart}-title {chart}-desc"' in html
    assert re.search(r"<title>[0-9]{2}:00: made 6</title>", html)


def test_the_predictions_page_filters_by_time_and_confidence(client, made):
    everything = client.get("/ui/predictions").text
    assert all(m["prediction_id"] in everything for m in made)
    confidences = {m["prediction_id"]: max(m["prediction"]) for m in made}
    cut = sorted(confidences.values())[3]
    below = client.get("/ui/predictions", params={"below": repr(cut)}).text
    shown = {pid for pid in confidences if pid in below}
    assert shown == {pid for pid, c in confidences.items() if c < cut} and len(shown) >= 1
    assert client.get("/ui/predictions", params={"since": "2999-01-01T00:00"}).text.count("/ui/prediction/") == 0
    assert all(m["prediction_id"] in client.get("/ui/predictions", params={"until": "2999-01-01T00:00"}).text
               for m in made)
    bad = client.get("/ui/predictions", params={"since": "yesterday"})
    assert bad.status_code == 400 and bad.headers["content-type"].startswith("application/problem+json")
    assert client.get("/ui/predictions", params={"below": "2"}).status_code == 400
    # The same filter in the JSON API and in the exports.
    api = client.get("/predictions/", params={"confidence_below": cut}).json()["items"]
    assert {i["prediction_id"] for i in api} == {pid for pid, c in confidences.items() if c < cut}
    assert client.get("/ui/export/ndjson", params={"below": "0"}).text == ""


def test_the_counts_and_the_class_chart_follow_the_filter(client, made):
    listed = client.get("/predictions/", params={"limit": 500}).json()["items"]
    per_class = {}
    for item in listed:
        per_class[item["likely_class"]] = per_class.get(item["likely_class"], 0) + 1
    for params in ({}, {"below": "0.999999"}):  # from the kept cells, then from the rows
        counts = client.get("/ui/counts", params=params).text
        chosen = [i for i in listed if not params or max(i["prediction"]) < 0.999999]
        assert f"{len(chosen)} matching: {len(chosen)} made, 0 failed" in counts
        assert 'id="chart-classes"' in counts or not chosen
    wanted = listed[0]["likely_class"]
    counts = client.get("/ui/counts", params={"class": str(wanted)}).text
    assert f"<title>{wanted}: predictions {per_class[wanted]:,}</title>" in counts
    assert f"{per_class[wanted]} matching" in counts


def test_a_models_page_draws_quality_classes_drift_calibration_and_latency(client, made):
    sha = made[0]["model"]["sha256"]
    for index in range(3):
        pid = made[index]["prediction_id"]
        assert client.post(f"/prediction/{pid}/labels", json={"label": made[index]["likely_class"], "source": "test"}).status_code == 201
    html = client.get(f"/ui/models/{sha}").text
    for chart in ("chart-quality", "chart-classes", "chart-drift", "chart-calibration"):
        assert f'id="{chart}"' in html
    assert 'class="diagonal"' in html  # the reliability diagram's perfect-calibration line
    assert re.search(r"Over the model's last ([0-9]+) made predictions", html).group(1) == str(len(made))
    quality = client.get(f"/models/{sha}/quality").json()
    (today,) = quality["series"]
    assert sum(today["predicted_class_counts"]) == len(made) and today["predicted_class_psi"] == pytest.approx(0.0)


@pytest.fixture(scope="module")
def service_env() -> dict[str, str]:
    return {"CHECKPOINT_INTERVAL_MS": "100"}


def csrf(client) -> str:
    client.get("/ui/upload")  # any page sets the double-submit cookie
    return client.cookies["console_csrf"]


def test_uploading_through_the_console_is_the_apis_upload_behind_a_csrf_token(client, made):
    page = client.get("/ui/upload")
    assert page.status_code == 200 and 'id="upload"' in page.text and 'data-csrf="' in page.text
    token = csrf(client)
    path, _ = digit_files()[0]
    files = {"file": (path.name, path.read_bytes(), "image/png")}
    answer = client.post("/ui/upload", files=files, headers={"X-CSRF-Token": token})
    assert answer.status_code == 201, answer.text
    created = answer.json()
    assert created["likely_class"] == made[0]["likely_class"] and created["receipt"]["events"]
    events = client.get(f"/prediction/{created['prediction_id']}/events").json()
    assert '"via":"console"' in events[0]["metadata"]
    # A forged post (no token, or the wrong one) predicts nothing.
    before = client.get("/predictions/", params={"limit": 500}).json()["items"]
    assert client.post("/ui/upload", files=files).status_code == 403
    assert client.post("/ui/upload", files=files, headers={"X-CSRF-Token": "guess"}).status_code == 403
    assert len(client.get("/predictions/", params={"limit": 500}).json()["items"]) == len(before)
    # Without script the form posts the token as a field and lands on the new prediction's page.
    plain = client.post("/ui/upload", files=files, data={"csrf": token})
    assert plain.status_code == 303 and plain.headers["location"].startswith("/ui/prediction/")
    # A bad image is the API's problem, for the page to show.
    bad = client.post("/ui/upload", files={"file": ("notes.png", b"not an image", "image/png")},
                      headers={"X-CSRF-Token": token})
    assert bad.status_code in (415, 422) and bad.headers["content-type"] == "application/problem+json"


async def test_a_large_upload_has_one_thumbnail_made_once_and_its_erasure_takes_it(client, module_database):
    path, _ = digit_files()[1]
    big = io.BytesIO()
    Image.open(path).convert("RGB").resize((640, 480), Image.Resampling.NEAREST).save(big, format="PNG")
    large = client.post("/prediction/", files={"file": ("large.png", big.getvalue(), "image/png")}).json()
    small = upload(client, 2)
    listing = client.get("/ui/predictions").text
    assert f"/ui/thumb/{large['input_id']}" in listing and f"/ui/input/{small['input_id']}" in listing
    first = client.get(f"/ui/thumb/{large['input_id']}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert max(Image.open(io.BytesIO(first.content)).size) == 112
    etag = first.headers["etag"]
    assert "immutable" in first.headers["cache-control"]
    assert client.get(f"/ui/thumb/{large['input_id']}", headers={"If-None-Match": etag}).status_code == 304
    owner = await asyncpg.connect(module_database.owner_dsn)
    try:
        made_at = await owner.fetchval("SELECT made_at FROM thumbnails WHERE blob_sha256 = $1",
                                       bytes.fromhex(large["blob_sha256"]))
        assert made_at is not None
        assert client.get(f"/ui/thumb/{large['input_id']}").content == first.content
        assert await owner.fetchval("SELECT count(*) FROM thumbnails") == 1  # the small one needs none
        assert await owner.fetchval("SELECT made_at FROM thumbnails") == made_at  # read back, not made again
        assert client.get(f"/ui/thumb/{small['input_id']}").content == client.get(f"/ui/input/{small['input_id']}").content
        erased = subprocess.run(
            [sys.executable, "-m", "cli", "erase", large["blob_sha256"], "--reason", "right to erasure"],
            env={**os.environ, "DATABASE_URL": module_database.owner_dsn}, capture_output=True, text=True, timeout=120)
        assert erased.returncode == 0, erased.stderr
        assert await owner.fetchval("SELECT count(*) FROM thumbnails") == 0
    finally:
        await owner.close()
    assert client.get(f"/ui/thumb/{large['input_id']}").status_code == 410


def poll_fragment(client, fragment: str, slot: str) -> str:
    job_id = re.search(r'hx-get="/ui/jobs/([0-9]+)\?slot=' + slot, fragment).group(1)
    for _ in range(600):
        fragment = client.get(f"/ui/jobs/{job_id}", params={"slot": slot}).text
        if "hx-get" not in fragment:
            return fragment
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never finished")


def test_the_log_page_verifies_on_request_and_shows_the_delay_and_the_feed(client, made):
    page = client.get("/ui/log").text
    assert "Integration delay" in page and re.search(r"median [0-9.]+ s from commit", page)
    token = csrf(client)
    assert client.post("/ui/log/verify", data={"csrf": "guess"}).status_code == 403
    fragment = client.post("/ui/log/verify", data={"csrf": token}, headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and 'id="verify-job"' in fragment.text
    done = poll_fragment(client, fragment.text, "verify-job")
    assert "✓ OK: " in done and "the read tables match a replay" in done
    page = client.get("/ui/log").text
    assert "Recent verifications" in page and "✓ <a href=\"/audit/jobs/" in page
    # Without script: the post goes back to the log page, which shows the newest job.
    plain = client.post("/ui/log/verify", data={"csrf": token})
    assert plain.status_code == 303 and plain.headers["location"] == "/ui/log"

    feed = client.get("/ui/log/events").text
    assert all(f"<td class=\"num\">{e['position']}</td>" in feed for e in made[-1]["receipt"]["events"])
    only = client.get("/ui/log/events", params={"type": "PredictionMade", "after": 0}).text
    rows = re.findall(r'<td class="num">[0-9]+</td><td>([A-Za-z]+)</td>', only)
    assert rows and set(rows) == {"PredictionMade"}
    first = re.search(r'<td class="num">([0-9]+)</td>', client.get("/ui/log/events", params={"after": 3}).text)
    assert first.group(1) == "4"


def test_reproduce_from_a_predictions_page(client, made):
    prediction = made[3]["prediction_id"]
    page = client.get(f"/ui/prediction/{prediction}").text
    assert 'id="reproduce-job"' in page and "Never run yet." in page and "receipt.json" in page
    token = csrf(client)
    fragment = client.post(f"/ui/prediction/{prediction}/reproduce", data={"csrf": token}, headers={"HX-Request": "true"})
    done = poll_fragment(client, fragment.text, "reproduce-job")
    assert "✓ reproduced: the same tensor, the same class" in done
    assert "✓ reproduced" in client.get(f"/ui/prediction/{prediction}").text
    receipt = client.get(f"/ui/prediction/{prediction}/receipt.json")
    assert receipt.status_code == 200 and "attachment" in receipt.headers["content-disposition"]
    body = receipt.json()
    assert [e["type"] for e in body["events"]] == ["PredictionRequested", "PredictionMade"]
    assert body["checkpoint"] and all(e["inclusion_proof"] is not None for e in body["events"])
