"""Ground truth over HTTP: record, correct, withdraw, read the history; scopes and the actor."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from harness.live import ROOT
from tests.fixtures import MODELS, digit_files

pytestmark = pytest.mark.timeout(180)

PROBLEM = "application/problem+json"
KEYS = {"labeller": "l-key-1", "reader": "r-key-2", "uploader": "p-key-3"}
API_KEYS = f"alice@{KEYS['labeller']}:label,read;{KEYS['reader']}:read;{KEYS['uploader']}:predict,read"


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


def predict(client, index: int = 0, headers=None) -> dict:
    path, _ = digit_files()[index]
    response = client.post("/prediction/", files={"file": (path.name, path.read_bytes(), "image/png")},
                           headers=headers or {})
    assert response.status_code == 201, response.text
    return response.json()


def assert_problem(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["type"] == f"urn:problem:{code}"


def test_a_label_is_recorded_with_a_receipt_and_shows_in_the_history(client):
    prediction = predict(client)
    pid = prediction["prediction_id"]
    response = client.post(f"/prediction/{pid}/labels", json={"label": 8, "source": "batch-1", "note": "clear 8"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["current_label"] == 8 and body["entry"]["stream_version"] == 3 and body["entry"]["actor"] is None
    (event,) = body["receipt"]["events"]
    assert event["type"] == "GroundTruthRecorded" and event["stream_version"] == 3
    assert body["receipt"]["head"]["position"] >= event["position"]
    events = client.get(f"/prediction/{pid}/events").json()
    assert events[-1]["hash"] == event["hash"]
    history = client.get(f"/prediction/{pid}/labels").json()
    assert history == [{"kind": "recorded", "stream_version": 3, "label": 8, "source": "batch-1",
                        "note": "clear 8", "reason": None, "actor": None}]


def test_a_correction_withdrawal_and_relabel_keep_every_step(client):
    pid = predict(client, 1)["prediction_id"]
    assert client.post(f"/prediction/{pid}/labels", json={"label": 1, "source": "a"}).status_code == 201
    assert client.post(f"/prediction/{pid}/labels", json={"label": 2, "source": "b"}).status_code == 201
    withdrawn = client.delete(f"/prediction/{pid}/labels/current", params={"reason": "blurred"})
    assert withdrawn.status_code == 200, withdrawn.text
    assert withdrawn.json()["current_label"] is None and withdrawn.json()["entry"]["reason"] == "blurred"
    assert_problem(client.delete(f"/prediction/{pid}/labels/current", params={"reason": "again"}), 409, "no_current_label")
    assert client.delete(f"/prediction/{pid}/labels/current").status_code == 400  # the reason is required
    assert client.post(f"/prediction/{pid}/labels", json={"label": 3, "source": "c"}).status_code == 201
    history = client.get(f"/prediction/{pid}/labels").json()
    assert [(h["kind"], h["label"], h["stream_version"]) for h in history] == [
        ("recorded", 1, 3), ("recorded", 2, 4), ("withdrawn", None, 5), ("recorded", 3, 6),
    ]


def test_concurrent_labels_for_one_prediction_all_land_in_order(client, service):
    pid = predict(client, 2)["prediction_id"]

    def label(i: int) -> int:
        with httpx.Client(base_url=service.url, timeout=30) as own:
            response = own.post(f"/prediction/{pid}/labels", json={"label": i, "source": f"s{i}"})
            assert response.status_code == 201, response.text
            return response.json()["entry"]["stream_version"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        versions = sorted(pool.map(label, range(8)))
    assert versions == list(range(3, 11))
    history = client.get(f"/prediction/{pid}/labels").json()
    assert [h["stream_version"] for h in history] == versions


def test_bad_labels_are_refused_and_store_nothing(client):
    pid = predict(client, 3)["prediction_id"]
    assert_problem(client.post(f"/prediction/{pid}/labels", json={"label": 10, "source": "a"}), 422, "invalid_label")
    assert_problem(client.post(f"/prediction/{pid}/labels", json={"label": -1, "source": "a"}), 422, "invalid_label")
    assert_problem(client.post(f"/prediction/{pid}/labels", json={"label": 1, "source": ""}), 422, "invalid_label_source")
    assert_problem(client.post(f"/prediction/{pid}/labels", json={"label": "one", "source": "a"}), 400, "bad_label_body")
    assert_problem(client.post(f"/prediction/{pid}/labels", json={"label": 1}), 400, "bad_label_body")
    assert_problem(client.post(f"/prediction/{pid}/labels", json={"label": 1, "source": "a", "x": 1}), 400, "bad_label_body")
    assert_problem(client.post(f"/prediction/{pid}/labels", content=b"{not json"), 400, "bad_json")
    assert client.get(f"/prediction/{pid}/labels").json() == []
    assert len(client.get(f"/prediction/{pid}/events").json()) == 2


def test_unknown_predictions_are_404(client):
    unknown = uuid.uuid4()
    assert_problem(client.post(f"/prediction/{unknown}/labels", json={"label": 1, "source": "a"}), 404, "prediction_not_found")
    assert_problem(client.get(f"/prediction/{unknown}/labels"), 404, "prediction_not_found")
    assert_problem(client.delete(f"/prediction/{unknown}/labels/current", params={"reason": "r"}), 404, "prediction_not_found")
    assert client.post("/prediction/not-a-uuid/labels", json={"label": 1, "source": "a"}).status_code in (400, 404)


@pytest.fixture(scope="module")
def keyed_service(start_module_service):
    return start_module_service(
        MODEL_PATH=str(MODELS / "scalar_32x32x3.keras"), API_KEYS=API_KEYS, PROJECTIONS="off",
    )


def test_a_scalar_model_takes_labels_0_and_1_and_keys_record_their_actor(keyed_service):
    with httpx.Client(base_url=keyed_service.url, timeout=30) as client:
        pid = predict(client, 4, headers=bearer("uploader"))["prediction_id"]
        url = f"/prediction/{pid}/labels"
        assert client.post(url, json={"label": 1, "source": "a"}).status_code == 401
        assert client.post(url, json={"label": 1, "source": "a"}, headers=bearer("reader")).status_code == 403
        assert client.post(url, json={"label": 1, "source": "a"}, headers=bearer("uploader")).status_code == 403
        assert_problem(client.post(url, json={"label": 2, "source": "a"}, headers=bearer("labeller")), 422, "invalid_label")
        recorded = client.post(url, json={"label": 1, "source": "a"}, headers=bearer("labeller"))
        assert recorded.status_code == 201, recorded.text
        assert recorded.json()["entry"]["actor"] == "alice"
        assert client.post(url, json={"label": 0, "source": "b"}, headers=bearer("labeller")).status_code == 201
        withdrawn = client.delete(f"{url}/current", params={"reason": "r"}, headers=bearer("labeller"))
        assert withdrawn.json()["entry"]["actor"] == "alice"
        history = client.get(url, headers=bearer("reader")).json()
        assert [(h["label"], h["actor"]) for h in history] == [(1, "alice"), (0, "alice"), (None, "alice")]
        bulk = [{"prediction_id": pid, "label": 1, "source": "bulk"}]
        assert client.post("/labels", json=bulk, headers=bearer("reader")).status_code == 403
        recorded = client.post("/labels", json=bulk, headers=bearer("labeller"))
        assert recorded.status_code == 200 and recorded.json()["accepted"] == 1
        assert client.get(url, headers=bearer("reader")).json()[-1]["actor"] == "alice"


def test_the_prediction_answers_show_the_current_label_at_once_and_the_list_filters_by_it(client):
    made = predict(client, 5)
    pid, likely = made["prediction_id"], made["likely_class"]
    assert client.get(f"/prediction/{pid}").json()["label"] is None
    assert client.post(f"/prediction/{pid}/labels", json={"label": likely, "source": "a"}).status_code == 201
    view = client.get(f"/prediction/{pid}").json()  # read-your-writes: no wait for the projection
    assert (view["label"], view["correct"]) == (likely, True)
    wrong = (likely + 1) % 10
    assert client.post(f"/prediction/{pid}/labels", json={"label": wrong, "source": "b"}).status_code == 201
    assert (client.get(f"/prediction/{pid}").json()["correct"]) is False

    def listed(**params) -> set[str]:
        response = client.get("/predictions/", params={"limit": 500, **params})
        assert response.status_code == 200, response.text
        return {item["prediction_id"] for item in response.json()["items"]}

    assert pid in listed(labelled="true") and pid not in listed(labelled="false")
    assert pid in listed(correct="false") and pid not in listed(correct="true")
    item = next(i for i in client.get("/predictions/", params={"limit": 500}).json()["items"] if i["prediction_id"] == pid)
    assert (item["label"], item["correct"]) == (wrong, False)


def test_models_and_their_quality_now_and_as_of_an_earlier_position(client):
    made = [predict(client, 6 + i) for i in range(3)]
    sha = made[0]["model"]["sha256"]
    right = client.post(f"/prediction/{made[0]['prediction_id']}/labels",
                        json={"label": made[0]["likely_class"], "source": "q"}).json()
    before_wrong = right["receipt"]["events"][0]["position"]
    wrong_label = (made[1]["likely_class"] + 1) % 10
    assert client.post(f"/prediction/{made[1]['prediction_id']}/labels",
                       json={"label": wrong_label, "source": "q"}).status_code == 201
    client.get("/predictions/")  # wait for the projection to reach the head

    models = client.get("/models/").json()
    (entry,) = [m for m in models["items"] if m["sha256"] == sha]
    assert entry["name"] == "mnist_convnet" and entry["num_classes"] == 10 and entry["predictions"] >= 3
    assert entry["labelled"] >= 2 and models["as_of_position"] >= before_wrong
    every = client.get("/predictions/", params={"limit": 500}).json()["items"]
    times = sorted(i["created_at"] for i in every if i["model"]["sha256"] == sha)
    assert (entry["first_used"], entry["last_used"]) == (times[0], times[-1])  # exact, to the microsecond

    now = client.get(f"/models/{sha}/quality", params={"bucket": "hour"})
    assert now.status_code == 200, now.text
    body = now.json()
    report = body["report"]
    assert report["labelled"] == sum(map(sum, body["confusion"])) == entry["labelled"]
    assert 0 <= report["accuracy"] <= 1 and report["ece"] is not None and report["brier"] is not None
    assert sum(b["count"] for b in body["calibration"]) == report["labelled"]
    assert sum(s["predictions"] for s in body["series"]) == report["predictions"]
    assert body["drift"]["measures"]["predicted_class_psi"] is not None
    assert body["confusion"][wrong_label][made[1]["likely_class"]] >= 1

    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in client.get("/metrics").text.splitlines()
               if line.startswith("model_")}
    labels = 'model="mnist_convnet",version="1.0.0"'
    for window in ("hour", "day"):
        assert metrics[f'model_accuracy{{{labels},window="{window}"}}'] == pytest.approx(report["accuracy"])
        assert metrics[f'model_label_coverage{{{labels},window="{window}"}}'] == pytest.approx(report["label_coverage"])
    assert metrics[f"model_predicted_class_psi{{{labels}}}"] == pytest.approx(0.0, abs=1e-9)  # today is day one

    earlier = client.get(f"/models/{sha}/quality", params={"as_of": before_wrong}).json()
    assert earlier["as_of_position"] == before_wrong
    assert earlier["report"]["labelled"] == report["labelled"] - 1  # the wrong label came later
    assert earlier["confusion"][wrong_label][made[1]["likely_class"]] == body["confusion"][wrong_label][made[1]["likely_class"]] - 1


def test_quality_refuses_unknown_models_and_malformed_windows(client):
    assert_problem(client.get(f"/models/{'0' * 64}/quality"), 404, "model_not_found")
    assert client.get("/models/not-a-digest/quality").status_code == 400
    sha = client.get("/models/").json()["items"][0]["sha256"]
    assert client.get(f"/models/{sha}/quality", params={"bucket": "week"}).status_code == 400
    assert_problem(client.get(f"/models/{sha}/quality", params={"as_of": 2**62}), 400, "as_of_beyond_head")
    assert_problem(client.get(f"/models/{sha}/quality", params={"since": "0001-01-01T00:00:00+01:00"}), 400, "bad_time")


def test_bulk_labels_answer_per_item_and_a_retry_with_the_same_key_appends_nothing(client):
    made = [predict(client, 10 + i) for i in range(5)]
    unknown = str(uuid.uuid4())
    items = [{"prediction_id": m["prediction_id"], "label": m["likely_class"]} for m in made]
    items += [{"prediction_id": unknown, "label": 1}, {"prediction_id": made[0]["prediction_id"], "label": 99},
              {"label": 3}, "not an object"]
    first = client.post("/labels", params={"source": "batch-9"}, json=items, headers={"Idempotency-Key": "bulk-1"})
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["accepted"], body["refused"]) == (5, 4) and body["replayed"] is False
    statuses = [item["status"] for item in body["items"]]
    assert statuses == [201] * 5 + [404, 422, 400, 400]
    assert body["items"][5]["problem"]["type"] == "urn:problem:prediction_not_found"
    assert body["items"][6]["problem"]["type"] == "urn:problem:invalid_label"
    assert body["items"][7]["problem"]["type"] == "urn:problem:invalid_label_item"
    events = client.get(f"/prediction/{made[2]['prediction_id']}/events").json()
    assert events[-1]["hash"] == body["items"][2]["hash"] and events[-1]["type"] == "GroundTruthRecorded"
    assert client.get(f"/prediction/{made[2]['prediction_id']}/labels").json()[0]["source"] == "batch-9"
    head = client.get("/events", params={"after": body["head"]["position"] - 1}).text.splitlines()

    again = client.post("/labels", params={"source": "batch-9"}, json=items, headers={"Idempotency-Key": "bulk-1"})
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["items"] == body["items"] and again.json()["batch"] == body["batch"]
    assert len(client.get("/events", params={"after": body["head"]["position"] - 1}).text.splitlines()) == len(head)
    reused = client.post("/labels", params={"source": "other"}, json=items[:2], headers={"Idempotency-Key": "bulk-1"})
    assert_problem(reused, 422, "idempotency_key_reused")


def test_bulk_labels_as_ndjson_and_malformed_bodies(client):
    made = predict(client, 15)
    ndjson = (f'{{"prediction_id": "{made["prediction_id"]}", "label": 1, "source": "nd"}}\n\n'
              f'{{"prediction_id": "{made["prediction_id"]}", "label": 2, "source": "nd", "note": "fix"}}\n')
    response = client.post("/labels", content=ndjson, headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 200, response.text
    assert [i["stream_version"] for i in response.json()["items"]] == [3, 4]
    assert client.get(f"/prediction/{made['prediction_id']}").json()["label"] == 2
    assert_problem(client.post("/labels", content=b"{}", headers={"content-type": "application/json"}), 400, "invalid_labels_body")
    assert_problem(client.post("/labels", content=b"[{", headers={"content-type": "application/json"}), 400, "invalid_labels_body")
    assert_problem(client.post("/labels", content=b"x", headers={"content-type": "text/csv"}), 415, "unsupported_media_type")
    too_many = [{"prediction_id": made["prediction_id"], "label": 1, "source": "s"}] * 10_001
    assert_problem(client.post("/labels", json=too_many), 413, "too_many_label_items")


def test_labels_import_sends_a_csv_in_batches_reports_refusals_and_is_idempotent(client, service, tmp_path):
    made = [predict(client, 20 + i) for i in range(7)]
    rows = ["prediction_id,label,source,note"] + [f"{m['prediction_id']},{m['likely_class']},,ok" for m in made]
    rows += [f"{uuid.uuid4()},1,,unknown", f"{made[0]['prediction_id']},x,,not a number"]
    # A correction in the next batch, while the batch with the first label may still be in flight:
    # the file's order decides which label is current.
    corrected = (made[6]["likely_class"] + 1) % 10
    rows += [f"{made[6]['prediction_id'].upper()},{corrected},,corrected"]
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("\n".join(rows) + "\n")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", "labels-import", str(labels_csv), "--url", service.url,
                               "--batch-size", "3"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    first = run()
    assert first.returncode == 1, first.stderr  # something was refused
    assert "accepted 8 (0 already recorded" in first.stdout and "refused 2" in first.stdout
    assert "prediction_not_found: 1" in first.stdout and "invalid_label: 1" in first.stdout
    refused = [line for line in (tmp_path / "labels.csv.refused.ndjson").read_text().splitlines()]
    assert [json.loads(line)["line"] for line in refused] == [9, 10]
    assert "labels" in first.stderr and "/s" in first.stderr  # the progress line
    history = client.get(f"/prediction/{made[3]['prediction_id']}/labels").json()
    assert [(h["source"], h["note"]) for h in history] == [("labels.csv", "ok")]
    history = client.get(f"/prediction/{made[6]['prediction_id']}/labels").json()
    assert [h["note"] for h in history] == ["ok", "corrected"] and history[-1]["label"] == corrected

    second = run()
    assert "accepted 8 (8 already recorded by an earlier run)" in second.stdout
    assert len(client.get(f"/prediction/{made[3]['prediction_id']}/labels").json()) == 1


def _labels_waited(client) -> tuple[int, float]:
    """bulk_labels_wait_seconds: how many bulk requests took a turn, and their waits' sum."""
    text = client.get("/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("bulk_labels_wait_seconds_")}
    return int(values["bulk_labels_wait_seconds_count"]), values["bulk_labels_wait_seconds_sum"]


def test_uploads_come_first_bulk_labels_wait_their_turn_while_uploads_arrive(start_service):
    """With LABELS_SHARE_WHILE_UPLOADING=0.05, a bulk request right after another waits about 19
    times as long as that one took while uploads arrive; once they stop, it goes at once."""
    service = start_service(LABELS_SHARE_WHILE_UPLOADING="0.05")
    with httpx.Client(base_url=service.url, timeout=60) as client:
        ids = [predict(client, i % 4)["prediction_id"] for i in range(40)]
        body = [{"prediction_id": pid, "label": 1, "source": "pacing"} for pid in ids]
        uploading = True

        def upload_until_told() -> int:
            sent = 0
            with httpx.Client(base_url=service.url, timeout=60) as uploader:
                while uploading:
                    predict(uploader, sent % 4)
                    sent += 1
            return sent

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            uploads = pool.submit(upload_until_told)
            first = client.post("/labels", json=body)
            assert first.status_code == 200, first.text
            count, waited = _labels_waited(client)
            second = client.post("/labels", json=body)
            assert second.status_code == 200 and second.json()["accepted"] == len(ids), second.text
            uploading = False
            assert uploads.result() > 0
        count_after, waited_after = _labels_waited(client)
        assert count_after == count + 1
        paused = waited_after - waited
        assert paused > 0.05, paused  # the second waited for its turn while uploads went on

        time.sleep(0.6)  # no upload for longer than the batcher's "busy" window
        third = client.post("/labels", json=body)
        assert third.status_code == 200, third.text
        count_last, waited_last = _labels_waited(client)
        assert count_last == count + 2 and waited_last - waited_after < 0.05  # uploads stopped: no pause
