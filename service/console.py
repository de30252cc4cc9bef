"""The audit console: server-rendered pages under /ui/ (Jinja2 templates, htmx for partial updates,
one small script of our own; every file served from the repository, no CDN).

It reads through the same query code as the JSON API (`projections.queries`, `tree_store`, the
event store) and has the same scopes. With API keys configured, a key is asked once (the login
form) and kept as a session cookie (HttpOnly, SameSite=Strict, Secure behind TLS): the cookie is
`<key digest>.<expiry>.<HMAC>`, keyed by a secret derived from the configured keys, so every node
with the same API_KEYS accepts it and removing a key ends its sessions. Every form carries a CSRF
token derived from the session (the login form: a double-submit cookie). Pages are sent with a
Content-Security-Policy that allows no inline script; Jinja2 escapes every value.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import hmac
import io
import re
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode
from uuid import UUID

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.datastructures import Cookie
from litestar.di import Provide
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import Redirect, Stream, Template
from litestar.static_files import create_static_files_router

from domain.event_lines import EventLine
from domain.rejections import Rejected
from infra.settings import ApiKey, ApiKeys
from projections import quality, queries, tree_store
from service import charts
from service.bootstrap import ServicesDependency
from service.checkpoint_wait import b64
from service.problems import Problem
from service.quality_routes import measure
from service.responses import event_out
from service.routes import current_prediction, prediction_out, wait_for_projection

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
SESSION = "console_session"
CSRF = "console_csrf"
SESSION_S = 8 * 3600
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store"}


class LoginRequired(Exception):
    """No valid session: the console answers with its login page."""


class Viewer:
    """Who is looking: the key's name and scopes (everything when no keys are configured)."""

    def __init__(self, name: str | None, scopes: frozenset[str], session: str | None) -> None:
        self.name, self.scopes, self.session = name, scopes, session

    def can(self, scope: str) -> bool:
        return scope in self.scopes


def _secret(keys: ApiKeys) -> bytes:
    return hashlib.sha256(b"console-session\n" + b"".join(sorted(keys))).digest()


def _sign(keys: ApiKeys, text: str) -> str:
    return base64.urlsafe_b64encode(hmac.new(_secret(keys), text.encode(), hashlib.sha256).digest()).decode().rstrip("=")


def _session_for(keys: ApiKeys, digest: bytes) -> str:
    text = f"{digest.hex()}.{int(time.time()) + SESSION_S}"
    return f"{text}.{_sign(keys, text)}"


def _key_of_session(keys: ApiKeys, value: str | None) -> ApiKey | None:
    if not value or value.count(".") != 2:
        return None
    digest_hex, expires, signature = value.split(".")
    # Bytes, not str: compare_digest refuses non-ASCII str, and a cookie is the client's to choose.
    expected = _sign(keys, f"{digest_hex}.{expires}").encode()
    if not hmac.compare_digest(signature.encode("utf-8", "surrogateescape"), expected):
        return None
    if not re.fullmatch(r"[0-9]{1,12}", expires) or int(expires) < time.time():
        return None
    try:
        return keys.get(bytes.fromhex(digest_hex))
    except ValueError:
        return None


def viewer(request: Request, services: ServicesDependency, scope: str = "read") -> Viewer:
    """The console's guard: no keys, everyone; else a valid session with `scope`, or the login."""
    keys = services.settings.api_keys
    if not keys:
        return Viewer(None, frozenset({"predict", "read", "audit", "label"}), None)
    session = request.cookies.get(SESSION)
    key = _key_of_session(keys, session)
    if key is None:
        raise LoginRequired
    if scope not in key.scopes:
        raise Problem(403, "missing_scope", f"the API key lacks the {scope!r} scope")
    return Viewer(key.name, key.scopes, session)


def page(name: str, request: Request, who: Viewer | None, **context: Any) -> Template:
    """A page, with the CSRF token its forms carry: a random value also set as an HttpOnly,
    SameSite=Strict cookie, which a cross-site form post never carries (double submit)."""
    token = request.cookies.get(CSRF) or secrets.token_urlsafe(24)
    response = Template(template_name=name, context={"who": who, "csrf": token, "path": request.url.path, **context},
                        headers=PAGE_HEADERS)
    if request.cookies.get(CSRF) != token:
        response.cookies.append(Cookie(key=CSRF, value=token, httponly=True, samesite="strict", path="/",
                                       secure=request.url.scheme == "https"))
    return response


def check_csrf(request: Request, form: dict[str, str]) -> None:
    expected = request.cookies.get(CSRF)
    given = form.get("csrf", "").encode("utf-8", "surrogateescape")
    if not expected or not hmac.compare_digest(expected.encode("utf-8", "surrogateescape"), given):
        raise Problem(403, "csrf", "the form is stale or was not sent by this site; reload the page")


@get("/", include_in_schema=False)
async def root() -> Redirect:
    return Redirect("/ui/")


@get("/favicon.ico", include_in_schema=False, status_code=204)
async def favicon() -> None:
    """Browsers ask for it on any page, JSON answers included: nothing, rather than a 404 each time."""


# ---- login ---------------------------------------------------------------------------------------


@get("/ui/login", include_in_schema=False)
async def login_form(request: Request, error: str | None = None) -> Template:
    return page("login.html", request, None, error=error)


@post("/ui/login", include_in_schema=False, status_code=303)
async def login(request: Request, services: ServicesDependency,
                data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]) -> Response[Any]:
    check_csrf(request, data)
    keys = services.settings.api_keys
    digest = hashlib.sha256(data.get("key", "").strip().encode("utf-8", "surrogateescape")).digest()
    if not keys or keys.get(digest) is None:
        return Redirect("/ui/login?error=1")
    response = Redirect("/ui/")
    response.cookies.append(Cookie(key=SESSION, value=_session_for(keys, digest), httponly=True, samesite="strict",
                                   path="/", secure=request.url.scheme == "https", max_age=SESSION_S))
    return response


@post("/ui/logout", include_in_schema=False, status_code=303)
async def logout(request: Request, services: ServicesDependency,
                 data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]) -> Response[Any]:
    check_csrf(request, data)
    response = Redirect("/ui/login")
    response.cookies.append(Cookie(key=SESSION, value="", max_age=0, path="/", httponly=True, samesite="strict"))
    return response


# ---- predictions -----------------------------------------------------------------------------------


def list_filters(
    likely_class: Annotated[str | None, Parameter(query="class", pattern=r"^[0-9]{0,7}$", required=False)] = None,
    labelled: Annotated[str | None, Parameter(pattern="^(|yes|no)$", required=False)] = None,
    correct: Annotated[str | None, Parameter(pattern="^(|yes|no)$", required=False)] = None,
    model_version: Annotated[str | None, Parameter(query="model", required=False)] = None,
    since: Annotated[str | None, Parameter(required=False)] = None,
    until: Annotated[str | None, Parameter(required=False)] = None,
    confidence_below: Annotated[str | None, Parameter(query="below", pattern=r"^(|0(\.[0-9]{1,17})?|1(\.0{1,17})?)$",
                                                      required=False)] = None,
) -> dict[str, Any]:
    """The list's filters from the query (the form's fields): an empty field means any, as a form
    sends every field. Times are UTC (a `datetime-local` field has no zone). One dependency for
    the page, its live rows, its counts and its exports."""

    def flag(value: str | None) -> bool | None:
        return {"yes": True, "no": False}.get(value or "")

    if model_version is not None and ("\x00" in model_version or len(model_version) > 200):
        raise Problem(400, "bad_parameter", "`model_version` is at most 200 characters, without NUL")
    return {"likely_class": int(likely_class) if likely_class else None, "labelled": flag(labelled),
            "correct": flag(correct), "model_version": model_version or None, "since": _utc("since", since),
            "until": _utc("until", until), "confidence_below": float(confidence_below) if confidence_below else None}


def _utc(name: str, text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise Problem(400, "bad_parameter", f"`{name}` is a date and time, e.g. 2026-12-03T14:00") from None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


async def _rows(services: ServicesDependency, filters: dict, before: int | None, limit: int = 50
                ) -> tuple[list, int | None]:
    async with services.reading() as connection:
        if before is None:  # the first page: read-your-writes, as the API's list
            await wait_for_projection(connection, services.settings.read_your_writes_timeout_s)
        return await queries.list_predictions(connection, limit=limit, before_position=before, **filters)


@get("/ui/", include_in_schema=False)
async def overview_page(request: Request, services: ServicesDependency) -> Template:
    """The landing page: this node's last hour minute by minute, the log's last day hour by hour."""
    who = viewer(request, services)
    minutes = services.metrics.recent.last_hour()
    labels = [datetime.fromtimestamp(m.start_s, timezone.utc).strftime("%H:%M") for m in minutes]
    node = {
        "throughput": charts.lines(
            "Uploads per minute (this node)", "Uploads answered by this node in each of the last 60 minutes",
            labels, {"uploads": [m.uploads for m in minutes], "5xx": [m.server_errors for m in minutes]}),
        "latency": charts.lines(
            "Upload latency, ms (this node)", "Median and 99th percentile upload latency per minute",
            labels, {"p50": [m.upload_p50_ms for m in minutes], "p99": [m.upload_p99_ms for m in minutes]}),
        "uploads": sum(m.uploads for m in minutes), "requests": sum(m.requests for m in minutes),
        "client_errors": sum(m.client_errors for m in minutes),
        "server_errors": sum(m.server_errors for m in minutes), "overloaded": sum(m.overloaded for m in minutes),
    }
    now = datetime.now(timezone.utc)
    until = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    since = until - timedelta(hours=24)
    hours = [since + timedelta(hours=h) for h in range(24)]
    made, failed, used = [0] * 24, [0] * 24, []
    async with services.reading() as connection:
        await wait_for_projection(connection, services.settings.read_your_writes_timeout_s)
        lag = await queries.lag(connection)
        position = await queries.tracked_position(connection)
        for entry in await quality.models(connection):
            if entry.last_used is None or entry.last_used < since:
                continue
            buckets = await quality.bucket_counts(connection, entry.sha256, entry.num_classes, position=position,
                                                  current=True, since=since, until=until, bucket="hour")
            for b in buckets:
                slot = hours.index(b.start.replace(tzinfo=timezone.utc))
                made[slot] += b.counts.predictions
                failed[slot] += b.counts.failed
            total = quality.total(buckets, entry.num_classes)
            used.append({"model": entry, "classes": total.predicted_class_counts,
                         "peak": max(total.predicted_class_counts, default=0), "made": total.predictions,
                         "failed": total.failed})
    day = charts.stacked_bars("Predictions per hour (every node)", "Made and failed predictions in each of the last 24 hours",
                              [h.strftime("%H:00") for h in hours], list(zip(made, failed, strict=True)),
                              ["made", "failed"])
    return page("overview.html", request, who, node=node, day=day, used=used, lag=lag, position=position,
                made=sum(made), failed=sum(failed))


@get("/ui/predictions", include_in_schema=False)
async def predictions_page(
    request: Request, services: ServicesDependency, filters: dict[str, Any],
    cursor: Annotated[int | None, Parameter(ge=0, le=2**63 - 1, required=False)] = None,
) -> Template:
    who = viewer(request, services)
    rows, next_cursor = await _rows(services, filters, cursor)
    shown = {True: "yes", False: "no", None: ""}

    def local(moment: datetime | None) -> str:
        return moment.strftime("%Y-%m-%dT%H:%M") if moment else ""

    form = {"class": "" if filters["likely_class"] is None else filters["likely_class"],
            "labelled": shown[filters["labelled"]], "correct": shown[filters["correct"]],
            "model": filters["model_version"] or "", "since": local(filters["since"]),
            "until": local(filters["until"]),
            "below": "" if filters["confidence_below"] is None else repr(filters["confidence_below"])}
    query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "cursor"])
    return page("predictions.html", request, who, rows=rows, next_cursor=next_cursor, cursor=cursor,
                query=query, form=form)


@get("/ui/rows", include_in_schema=False)
async def prediction_rows(request: Request, services: ServicesDependency, filters: dict[str, Any]) -> Template:
    """The first page's rows, for htmx to swap in: new predictions appear without a reload."""
    who = viewer(request, services)
    rows, _ = await _rows(services, filters, None)
    return page("rows.html", request, who, rows=rows)


@get("/ui/counts", include_in_schema=False)
async def prediction_counts(request: Request, services: ServicesDependency, filters: dict[str, Any]) -> Template:
    """The counts above the table, for the active filter: loaded after the page (a count over a
    large log must not slow the first rows down) and refreshed with them."""
    who = viewer(request, services)
    async with services.reading() as connection:
        counts = await queries.count_predictions(connection, **filters)
    return page("counts.html", request, who, counts=counts)


@get("/ui/prediction/{prediction_id:uuid}", include_in_schema=False)
async def prediction_page(request: Request, services: ServicesDependency, prediction_id: UUID,
                          error: Annotated[str | None, Parameter(max_length=300, required=False)] = None) -> Template:
    who = viewer(request, services)
    view = await current_prediction(services, prediction_id)
    if view is None:
        raise Problem(404, "prediction_not_found", f"no prediction {prediction_id}")
    events = [event_out(event) for event in await services.store.read_stream(prediction_id)] if who.can("audit") else []
    bars = []
    if view.output:
        top = max(view.output)
        bars = [(index, value, value == top) for index, value in enumerate(view.output)]
    return page("prediction.html", request, who, view=view, events=events, bars=bars, error=error)


@get("/ui/prediction/{prediction_id:uuid}/events.json", include_in_schema=False)
async def prediction_events(request: Request, services: ServicesDependency, prediction_id: UUID) -> list[EventLine]:
    """The events exactly as hashed, for the in-browser verification (the audit scope, as the API)."""
    viewer(request, services, "audit")
    events = await services.store.read_stream(prediction_id)
    if not events:
        raise Problem(404, "prediction_not_found", f"no prediction {prediction_id}")
    return [event_out(event) for event in events]


@get("/ui/input/{input_id:uuid}", include_in_schema=False)
async def input_image(request: Request, services: ServicesDependency, input_id: UUID) -> Response[bytes]:
    """The original image for an <img>: immutable (its ETag is the bytes' sha256)."""
    viewer(request, services)
    async with services.reading() as connection:
        found = await queries.get_input(connection, input_id)
        content = None if found is None or found.erased else await connection.fetchval(
            "SELECT content FROM blobs WHERE sha256 = $1", bytes.fromhex(found.blob_sha256))
    if content is None:
        raise Problem(404 if found is None else 410, "input_unavailable", "no such input, or it was erased")
    etag = f'"{found.blob_sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(b"", status_code=304, headers={"ETag": etag})
    kind = _image_type(bytes(content))
    return Response(bytes(content), media_type=kind, headers={
        "ETag": etag, "Cache-Control": "private, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox"})


def _image_type(content: bytes) -> str:
    for magic, kind in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp")):
        if content.startswith(magic):
            return kind
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"  # an <img> will not render it: nothing is sniffed


@post("/ui/prediction/{prediction_id:uuid}/label", include_in_schema=False, status_code=303)
async def label(request: Request, services: ServicesDependency, prediction_id: UUID,
                data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]) -> Response[Any]:
    """The label form: the same use case as POST /prediction/{id}/labels, with the key's name as actor."""
    who = viewer(request, services, "label")
    check_csrf(request, data)
    back = f"/ui/prediction/{prediction_id}"
    try:
        value = int(data.get("label", ""))
    except ValueError:
        return Redirect(f"{back}?{urlencode({'error': 'the label is a class number'})}")
    state = request.scope.get("state", {})
    try:
        await services.labels.record(
            prediction_id, label=value, source=data.get("source") or "console", note=data.get("note") or None,
            actor=who.name, metadata={"request_id": state.get("request_id"), "actor": who.name, "via": "console"},
        )
    except Rejected as refused:
        return Redirect(f"{back}?{urlencode({'error': refused.message[:300]})}")
    return Redirect(back)


# ---- models --------------------------------------------------------------------------------------


@get("/ui/models", include_in_schema=False)
async def models_page(request: Request, services: ServicesDependency) -> Template:
    who = viewer(request, services)
    async with services.reading() as connection:
        entries = await quality.models(connection)
    return page("models.html", request, who, models=entries)


@get("/ui/models/{sha256:str}", include_in_schema=False)
async def model_page(request: Request, services: ServicesDependency, sha256: str) -> Template:
    who = viewer(request, services)
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise Problem(404, "model_not_found", "a model is named by its sha256")
    async with services.reading() as connection:  # a label recorded a moment ago counts
        await wait_for_projection(connection, services.settings.read_your_writes_timeout_s)
    measured = await measure(services, sha256)
    async with services.reading() as connection:
        latency = await queries.model_latency(connection, sha256)
    counts = measured.counts
    top = max((n for row in measured.confusion for n in row), default=0)
    shade = [[(0 if not top else min(9, round(9 * n / top))) for n in row] for row in measured.confusion]
    peak = max(counts.predicted_class_counts, default=0)
    days = [b.start.strftime("%m-%d") for b in measured.series]
    classes = [str(k) for k in range(measured.model.num_classes)]
    graphs = {
        "quality": charts.lines(
            "Accuracy and label coverage per day", "The share of labelled predictions that were right, and the "
            "share of predictions that have a label, each day", days,
            {"accuracy": [b.accuracy for b in measured.series], "coverage": [b.label_coverage for b in measured.series]},
            top=1.0, percent=True),
        "classes": charts.stacked_bars(
            "Predicted classes per day", "How many predictions of each class the model made each day", days,
            [b.predicted_class_counts for b in measured.series], classes),
        "drift": charts.lines(
            "Drift per day against the reference (PSI)", "Population stability index of each day's predicted "
            "classes and top confidences against the reference window", days,
            {"classes": [b.predicted_class_psi for b in measured.series],
             "confidence": [b.confidence_psi for b in measured.series]}),
        "calibration": charts.reliability(
            "Calibration: accuracy against confidence", "For each confidence bin with labels, the mean top "
            "confidence against the share that was right; a calibrated model follows the diagonal",
            [(b.mean_confidence, b.accuracy) for b in measured.calibration]),
    }
    return page("model.html", request, who, q=measured, shade=shade, peak=peak, graphs=graphs, latency=latency,
                series_peak=max((b.predictions for b in measured.series), default=0))


# ---- exports -------------------------------------------------------------------------------------


@get("/ui/export/{kind:str}", include_in_schema=False)
async def export(request: Request, services: ServicesDependency, kind: str, filters: dict[str, Any]) -> Stream:
    """Everything the filter matches (not only the page on screen), streamed page by page."""
    viewer(request, services)
    if kind not in ("csv", "ndjson"):
        raise Problem(404, "no_such_export", "exports are .csv or .ndjson")
    async def lines() -> AsyncIterator[bytes]:
        if kind == "csv":
            yield (",".join(EXPORT_COLUMNS) + "\r\n").encode()
        before = None
        while True:
            rows, before = await _rows(services, filters, before, limit=500)
            for view in rows:
                if kind == "csv":
                    yield _csv_line(view)
                else:
                    yield msgspec.json.encode(prediction_out(view)) + b"\n"
            if before is None:
                return

    media = "text/csv; charset=utf-8" if kind == "csv" else "application/x-ndjson"
    return Stream(lines(), media_type=media, headers={
        "Content-Disposition": f'attachment; filename="predictions.{kind}"', "X-Content-Type-Options": "nosniff"})


EXPORT_COLUMNS = ("prediction_id", "recorded_at", "status", "likely_class", "confidence", "label", "correct",
                  "model_name", "model_version", "model_sha256", "filename", "input_id", "blob_sha256", "position")


def _csv_line(view: queries.PredictionView) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerow([
        view.prediction_id, view.recorded_at.isoformat(), view.status, view.likely_class,
        max(view.output) if view.output else "", "" if view.label is None else view.label,
        "" if view.correct is None else str(view.correct).lower(), view.model.name, view.model.version,
        view.model.sha256, _spreadsheet_safe(view.filename or ""), view.input_id, view.blob_sha256, view.position,
    ])
    return buffer.getvalue().encode()


def _spreadsheet_safe(text: str) -> str:
    """A file name that a spreadsheet would run as a formula gets a leading quote (CSV injection)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


# ---- the log -------------------------------------------------------------------------------------


@get("/ui/log", include_in_schema=False)
async def log_page(request: Request, services: ServicesDependency) -> Template:
    who = viewer(request, services)
    async with services.reading() as connection:
        head = await connection.fetchrow("SELECT position, hash FROM events ORDER BY position DESC LIMIT 1")
        lag = await queries.lag(connection)
        tree = await tree_store.tree_state(connection)
        checkpoints = await tree_store.recent_checkpoints(connection, 20)
        erasures = await connection.fetchval("SELECT count(*) FROM events WHERE event_type = 'BlobErased'")
        now_us = await connection.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
    signed = [{"size": c.tree_size, "root": b64(c.root_hash), "chain_head": c.chain_head.hex(),
               "age_s": (now_us - c.signed_at_us) / 1e6,
               "at": datetime.fromtimestamp(c.signed_at_us / 1e6, timezone.utc)} for c in checkpoints]
    return page("log.html", request, who, head=head, lag=lag, tree=tree, checkpoints=signed,
                erasures=erasures)


def _to_login(request: Request, _: LoginRequired) -> Response[Any]:
    return Redirect("/ui/login", status_code=303)


CONSOLE = Router(
    path="/",
    route_handlers=[
        root, favicon, login_form, login, logout, overview_page, predictions_page, prediction_rows, prediction_counts, prediction_page, prediction_events,
        input_image, label, models_page, model_page, export, log_page,
        create_static_files_router(path="/ui/static", directories=[STATIC], name="console-static",
                                   include_in_schema=False, cache_control=None),
    ],
    exception_handlers={LoginRequired: _to_login},
    dependencies={"filters": Provide(list_filters, sync_to_thread=False)},
    include_in_schema=False,
)
