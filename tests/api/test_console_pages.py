"""The console over plain HTTP (the browser suite drives the same pages in Chromium): every page
renders with its security headers, the charts carry the figures, the filters reach the SQL."""

from __future__ import annotations

import re

import pytest

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
