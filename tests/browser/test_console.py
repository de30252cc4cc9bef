"""The audit console in Chromium: what an auditor does, checked as they would see it."""

from __future__ import annotations

import json
import re

import asyncpg
import httpx
import pytest
from playwright.async_api import expect

from tests.browser.conftest import screenshots, serious_accessibility_violations
from tests.fixtures import digit_files

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def service_env() -> dict[str, str]:
    return {"CHECKPOINT_INTERVAL_MS": "100"}


def upload(client, index: int = 0, *, name: str | None = None, wait: bool = False) -> dict:
    path, _ = digit_files()[index % len(digit_files())]
    answer = client.post("/prediction/", files={"file": (name or path.name, path.read_bytes(), "image/png")},
                         headers={"Prefer": "wait=checkpoint"} if wait else {})
    assert answer.status_code == 201, answer.text
    return answer.json()


async def test_new_predictions_appear_without_a_reload_and_filters_narrow_the_table(service, client, browsing):
    page = browsing.page
    upload(client, 0)
    await page.goto(f"{service.url}/")  # the root redirects to the console's overview
    await expect(page).to_have_url(re.compile(r"/ui/$"))
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    await screenshots(page, "overview")
    assert await serious_accessibility_violations(page) == []
    await page.get_by_role("link", name="Every prediction").click()
    await expect(page).to_have_url(re.compile(r"/ui/predictions$"))
    rows = page.locator("#rows tr")
    before = await rows.count()
    made = upload(client, 1)
    await expect(page.locator(f"a[href='/ui/prediction/{made['prediction_id']}']").first).to_be_visible(timeout=10_000)
    assert await rows.count() == before + 1
    wanted = made["likely_class"]
    await page.get_by_role("spinbutton", name="Class").fill(str(wanted))
    await page.get_by_role("button", name="Filter").click()
    await expect(page).to_have_url(re.compile(rf"class={wanted}"))
    classes = await page.locator("#rows tr td:nth-child(3)").all_inner_texts()
    assert classes and all(text.strip() == str(wanted) for text in classes)
    listed = client.get("/predictions/", params={"class": wanted, "limit": 500}).json()["items"]
    await expect(page.locator("#counts")).to_contain_text(f"{len(listed)} matching: {len(listed)} made, 0 failed")
    await screenshots(page, "predictions")
    assert await serious_accessibility_violations(page) == []
    assert browsing.errors == []


async def test_a_prediction_verifies_in_the_browser_and_a_tampered_event_is_named(
        service, client, module_database, browsing):
    page = browsing.page
    made = upload(client, 2, wait=True)
    await page.goto(f"{service.url}/ui/prediction/{made['prediction_id']}")
    await expect(page.get_by_role("heading", name=f"Class {made['likely_class']}")).to_be_visible()
    await expect(page.locator(".bars li")).to_have_count(10)
    await expect(page.locator(".timeline li")).to_have_count(2)
    await page.get_by_role("button", name="Verify in this browser").click()
    await expect(page.locator("#verdict")).to_contain_text("✓ All 2 events are in the signed checkpoint", timeout=15_000)
    await screenshots(page, "prediction")
    assert await serious_accessibility_violations(page) == []

    position = made["receipt"]["events"][1]["position"]
    connection = await asyncpg.connect(module_database.owner_dsn)
    try:
        async with connection.transaction():
            await connection.execute("SET LOCAL session_replication_role = replica")  # a superuser's edit
            await connection.execute(
                "UPDATE events SET data = ('{\"tampered\":true,' || substr(data::text, 2))::json WHERE position = $1",
                position)
    finally:
        await connection.close()
    await page.get_by_role("button", name="Verify in this browser").click()
    await expect(page.locator("#verdict")).to_contain_text(f"✗ the event at position {position}", timeout=15_000)
    assert browsing.errors == []


async def test_keyboard_only_reaches_verification(service, client, browsing):
    page = browsing.page
    made = upload(client, 3, wait=True)
    await page.goto(f"{service.url}/ui/prediction/{made['prediction_id']}")
    for _ in range(40):
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement && document.activeElement.id") == "verify":
            break
    else:
        pytest.fail("Tab never reached the verify button")
    await page.keyboard.press("Enter")
    await expect(page.locator("#verdict")).to_contain_text("✓", timeout=15_000)
    assert browsing.errors == []


async def tab_to(page, selector: str, presses: int = 60) -> None:
    """Press Tab until the element matching `selector` has the focus (as a keyboard user would)."""
    for _ in range(presses):
        await page.keyboard.press("Tab")
        if await page.evaluate("(s) => document.activeElement && document.activeElement.matches(s)", selector):
            return
    pytest.fail(f"Tab never reached {selector}")


async def test_keyboard_only_filtering_opening_and_labelling(service, client, browsing):
    page = browsing.page
    made = upload(client, 13, wait=True)
    await page.goto(f"{service.url}/ui/")
    await tab_to(page, "nav a[href='/ui/predictions']")
    await page.keyboard.press("Enter")
    await expect(page).to_have_url(re.compile(r"/ui/predictions$"))
    await tab_to(page, "input[name='class']")
    await page.keyboard.type(str(made["likely_class"]))
    await page.keyboard.press("Enter")  # submits the filter form
    await expect(page).to_have_url(re.compile(rf"class={made['likely_class']}"))
    await tab_to(page, f"#rows a[href='/ui/prediction/{made['prediction_id']}']")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", name=f"Class {made['likely_class']}")).to_be_visible()
    await tab_to(page, "#note")
    await page.keyboard.type("typed without a mouse")
    await page.keyboard.press("Enter")  # submits the label form with the selected label
    await expect(page.locator("dl")).to_contain_text("(correct)" if made["likely_class"] == 0 else "(wrong)")
    labels = client.get(f"/prediction/{made['prediction_id']}/labels").json()
    assert labels[-1]["note"] == "typed without a mouse"
    assert browsing.errors == []


async def test_a_hostile_filename_is_text_and_runs_nothing(service, client, browsing):
    page = browsing.page
    hostile = "<img src=x onerror=alert(1)>.png"
    made = upload(client, 4, name=hostile)
    await page.goto(f"{service.url}/ui/predictions")
    await expect(page.get_by_text(hostile).first).to_be_visible(timeout=10_000)
    await page.goto(f"{service.url}/ui/prediction/{made['prediction_id']}")
    await expect(page.locator("figcaption")).to_have_text(hostile)
    assert await page.locator("img[src='x']").count() == 0
    assert browsing.errors == []


async def test_the_log_page(service, client, browsing):
    page = browsing.page
    upload(client, 5, wait=True)
    await page.goto(f"{service.url}/ui/log")
    await expect(page.get_by_role("heading", name="Recent checkpoints")).to_be_visible()
    assert await page.locator("table tbody tr").count() >= 1
    await screenshots(page, "log")
    assert await serious_accessibility_violations(page) == []
    assert browsing.errors == []


async def test_login_scopes_and_csrf(start_service, browsing):
    page = browsing.page
    keyed = start_service(API_KEYS="auditor@audit-key:read,audit,predict;up@up-key:predict")
    await page.goto(f"{keyed.url}/ui/")
    await expect(page).to_have_url(re.compile(r"/ui/login$"))
    await screenshots(page, "login")
    assert await serious_accessibility_violations(page) == []
    await page.get_by_label("API key").fill("wrong")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("alert")).to_contain_text("not valid")
    await page.get_by_label("API key").fill("audit-key")
    await page.get_by_role("button", name="Log in").click()
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    cookie = next(c for c in await page.context.cookies() if c["name"] == "console_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    csp = (await page.request.get(f"{keyed.url}/ui/")).headers["content-security-policy"]
    assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp

    # A forged post (a wrong CSRF token) riding on the victim's session is refused, as is a login
    # post whose token does not match its double-submit cookie.
    with httpx.Client(base_url=keyed.url, cookies={"console_session": cookie["value"]}) as forger:
        assert forger.post("/ui/logout", data={"csrf": "guess"}).status_code == 403
        assert forger.post("/ui/login", data={"key": "audit-key", "csrf": "x"}).status_code == 403
    await page.get_by_role("button", name="Log out").click()
    await expect(page).to_have_url(re.compile(r"/ui/login$"))

    await page.get_by_label("API key").fill("up-key")  # a key without the read scope
    await page.get_by_role("button", name="Log in").click()
    assert (await page.request.get(f"{keyed.url}/ui/")).status == 403
    assert [e for e in browsing.errors if "403" not in e] == []


async def test_labelling_through_the_form_changes_the_models_accuracy(service, client, browsing):
    page = browsing.page
    right, wrong = upload(client, 6, wait=True), upload(client, 7, wait=True)
    sha = right["model"]["sha256"]
    for made, label in ((right, right["likely_class"]), (wrong, (wrong["likely_class"] + 1) % 10)):
        await page.goto(f"{service.url}/ui/prediction/{made['prediction_id']}")
        await page.get_by_label("Label", exact=True).select_option(str(label))
        await page.get_by_label("Note").fill("checked by hand")
        await page.get_by_role("button", name="Record label").click()
        await expect(page.locator("dl")).to_contain_text(f"{label} (" + ("correct" if made is right else "wrong"))
    labels = client.get(f"/prediction/{wrong['prediction_id']}/labels").json()
    assert labels[-1]["note"] == "checked by hand" and labels[-1]["source"] == "console"

    expected = client.get(f"/models/{sha}/quality").json()["report"]
    await page.goto(f"{service.url}/ui/models")
    await page.get_by_role("link", name=re.compile(right["model"]["name"])).click()
    await expect(page.locator("#accuracy")).to_have_text(f"{expected['accuracy'] * 100:.1f}%")
    assert 0 < expected["accuracy"] < 1 and expected["labelled"] >= 2
    await screenshots(page, "model")
    assert await serious_accessibility_violations(page) == []
    await page.goto(f"{service.url}/ui/models")
    await screenshots(page, "models")
    assert await serious_accessibility_violations(page) == []
    assert browsing.errors == []


def test_exports_stream_everything_the_filter_matches(service, client):
    for i in range(8):
        upload(client, i)
    everything = []
    cursor = None
    while True:
        page = client.get("/predictions/", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
        everything += page["items"]
        if not (cursor := page["next_cursor"]):
            break
    wanted = everything[0]["likely_class"]
    matching = [p["prediction_id"] for p in everything if p["likely_class"] == wanted]
    csv_rows = client.get("/ui/export/csv", params={"class": str(wanted), "model": "", "labelled": ""}).text.splitlines()
    assert csv_rows[0].startswith("prediction_id,recorded_at,status,likely_class")
    assert [row.split(",")[0] for row in csv_rows[1:]] == matching
    ndjson = [json.loads(line) for line in client.get("/ui/export/ndjson").text.splitlines()]
    assert [p["prediction_id"] for p in ndjson] == [p["prediction_id"] for p in everything]
    assert client.get("/ui/export/xlsx").status_code == 404


def test_forged_cookies_and_tokens_that_are_not_ascii_are_refused_not_errors(start_service):
    keyed = start_service(API_KEYS="auditor@audit-key:read")
    with httpx.Client(base_url=keyed.url, follow_redirects=False) as http:
        for cookie in ("ü.1.ü", "00.²³.x", "a.b", "%%%"):
            answer = http.get("/ui/", headers={"Cookie": f"console_session={cookie}".encode("latin-1")})
            assert answer.status_code == 303 and answer.headers["location"] == "/ui/login", cookie
        answer = http.post("/ui/login", data={"key": "audit-key", "csrf": "ü"},
                           headers={"Cookie": "console_csrf=ä".encode("latin-1")})
        assert answer.status_code == 403 and answer.headers["content-type"] == "application/problem+json"


async def test_uploading_through_the_page_shows_each_result_and_the_list_follows_without_a_reload(
        service, client, browsing, tmp_path):
    page = browsing.page
    listing = await page.context.new_page()
    await listing.goto(f"{service.url}/ui/predictions")
    await page.goto(f"{service.url}/ui/upload")
    assert await serious_accessibility_violations(page) == []
    chosen = []
    for index in (8, 9):
        path, _ = digit_files()[index]
        chosen.append(path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a picture")
    hostile = tmp_path / "<img src=x onerror=alert(1)>.png"
    hostile.write_bytes(digit_files()[14][0].read_bytes())
    await page.locator("#files").set_input_files([*chosen, broken, hostile])  # choosing uploads at once
    results = page.locator("#results li")
    await expect(results).to_have_count(4)
    await expect(page.locator("#results li.ok")).to_have_count(3, timeout=15_000)
    await expect(page.locator("#results li.ok", has_text=hostile.name)).to_be_visible()  # as text
    assert await page.locator("img[src='x']").count() == 0
    await expect(page.locator("#results li.bad")).to_contain_text("broken.png")
    for path in chosen:
        link = page.locator("#results li.ok", has_text=path.name).get_by_role("link")
        href = await link.get_attribute("href")
        # The other tab's list shows it without a reload.
        await expect(listing.locator(f"#rows a[href='{href}']").first).to_be_visible(timeout=10_000)

    # Dropping files works the same way as choosing them.
    path, _ = digit_files()[10]
    drop = await page.evaluate_handle(
        """([name, bytes]) => { const t = new DataTransfer();
             t.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"})); return t; }""",
        [path.name, list(path.read_bytes())])
    await page.dispatch_event("#drop", "drop", {"dataTransfer": drop})
    await expect(page.locator("#results li.ok", has_text=path.name)).to_be_visible(timeout=15_000)
    await screenshots(page, "upload")
    assert await serious_accessibility_violations(page) == []
    await listing.close()
    # The broken file's refusal is the only failed request (the browser logs it as an error too).
    assert browsing.errors and all("/ui/upload" in e and "415" in e for e in browsing.errors), browsing.errors


async def test_verify_and_reproduce_on_the_server_from_the_buttons(start_service, browsing):
    """On a log of its own: the module's log has been tampered with by the in-browser check's test."""
    page = browsing.page
    service = start_service(CHECKPOINT_INTERVAL_MS="100")
    with httpx.Client(base_url=service.url, timeout=30) as client:
        made = upload(client, 11, wait=True)
    await page.goto(f"{service.url}/ui/log")
    await page.get_by_role("button", name="Verify the whole log now").click()
    await expect(page.locator("#verify-job")).to_contain_text("✓ OK: ", timeout=120_000)
    await page.reload()
    await expect(page.get_by_role("table", name="Recent verifications")).to_contain_text("✓")
    await screenshots(page, "log")
    assert await serious_accessibility_violations(page) == []

    await page.goto(f"{service.url}/ui/prediction/{made['prediction_id']}")
    await page.get_by_role("button", name="Reproduce").click()
    await expect(page.locator("#reproduce-job")).to_contain_text("✓ reproduced", timeout=120_000)
    assert browsing.errors == []


async def test_the_event_feed_filters_by_type_and_position(service, client, browsing):
    page = browsing.page
    made = upload(client, 12, wait=True)
    await page.goto(f"{service.url}/ui/log")
    await page.get_by_role("link", name="The event feed").click()
    await expect(page.get_by_role("heading", name="The event feed")).to_be_visible()
    await expect(page.locator("table.feed")).to_contain_text(made["receipt"]["events"][1]["hash"][:16])
    await page.get_by_label("Type").select_option("PredictionMade")
    await page.get_by_label("After position").fill("0")
    await page.get_by_role("button", name="Show").click()
    types = await page.locator("table.feed tbody tr td:nth-child(2)").all_inner_texts()
    assert types and set(types) == {"PredictionMade"}
    await screenshots(page, "feed")
    assert await serious_accessibility_violations(page) == []
    assert browsing.errors == []
