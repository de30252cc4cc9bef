"""The predictions list (filters, live rows, counts, exports), one prediction's page, its image
and its label form."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated, Any
from urllib.parse import urlencode
from uuid import UUID

import msgspec
from litestar import Request, Response, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import Redirect, Stream, Template

from domain.event_lines import EventLine
from domain.rejections import Rejected
from projections import queries
from service import charts
from service.bootstrap import ServicesDependency
from service.checkpoint_wait import checkpointed
from service.console.session import check_csrf, page, viewer
from service.problems import Problem
from service.responses import Receipt, event_out, receipt
from service.routes import current_prediction, prediction_out, wait_for_projection


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
    top = max(counts.classes, default=-1)
    classes = charts.stacked_bars(
        "Predicted classes (matching the filter)", "How many of the matching predictions the model put in each class",
        [str(k) for k in range(top + 1)], [(counts.classes.get(k, 0),) for k in range(top + 1)], ["predictions"])
    return page("counts.html", request, who, counts=counts, classes=classes if top >= 0 else None)


@get("/ui/prediction/{prediction_id:uuid}", include_in_schema=False)
async def prediction_page(request: Request, services: ServicesDependency, prediction_id: UUID,
                          error: Annotated[str | None, Parameter(max_length=300, required=False)] = None) -> Template:
    who = viewer(request, services)
    view = await current_prediction(services, prediction_id)
    if view is None:
        raise Problem(404, "prediction_not_found", f"no prediction {prediction_id}")
    events, reproduced = [], None
    if who.can("audit"):
        events = [event_out(event) for event in await services.store.read_stream(prediction_id)]
        reproduced = next(iter(await services.audit_jobs.recent(kind="reproduce", subject=prediction_id, limit=1)), None)
    bars = []
    if view.output:
        top = max(view.output)
        bars = [(index, value, value == top) for index, value in enumerate(view.output)]
    return page("prediction.html", request, who, view=view, events=events, bars=bars, error=error,
                job=reproduced, slot="reproduce-job", refused=None)


@get("/ui/prediction/{prediction_id:uuid}/receipt.json", include_in_schema=False)
async def prediction_receipt(request: Request, services: ServicesDependency, prediction_id: UUID) -> Response[Receipt]:
    """The prediction's receipt, as its upload answered it with `Prefer: wait=checkpoint`: its
    events' hashes and leaves, each with an inclusion proof against the first signed checkpoint
    that covers them (`just verify-receipt` checks it anywhere)."""
    viewer(request, services, "audit")
    events = await services.store.read_stream(prediction_id)
    if not events:
        raise Problem(404, "prediction_not_found", f"no prediction {prediction_id}")
    plain = receipt(await services.log.id(), events, events[-1].position, events[-1].hash)
    return Response(await checkpointed(services, plain) or plain, headers={
        "Content-Disposition": f'attachment; filename="receipt-{prediction_id}.json"', "Cache-Control": "no-store"})


@get("/ui/prediction/{prediction_id:uuid}/events.json", include_in_schema=False)
async def prediction_events(request: Request, services: ServicesDependency, prediction_id: UUID) -> list[EventLine]:
    """The events exactly as hashed, for the in-browser verification (the audit scope, as the API)."""
    viewer(request, services, "audit")
    events = await services.store.read_stream(prediction_id)
    if not events:
        raise Problem(404, "prediction_not_found", f"no prediction {prediction_id}")
    return [event_out(event) for event in events]


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


