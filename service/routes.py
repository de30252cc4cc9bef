"""HTTP routes. Thin: parse, call the service layer or the read side, shape the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated
from uuid import UUID

import msgspec
from litestar import Request, Response, get, post
from litestar.params import HeaderParameter, PathParameter, QueryParameter
from litestar.response import Stream

from db.store import DatabaseUnavailable
from domain.event_lines import EventLine, ndjson
from domain.preprocessing import sniff_format
from domain.uploads import Upload, check_idempotency_key
from projections import queries
from service.bootstrap import ServicesDependency
from service.checkpoint_wait import PREFERENCE_APPLIED, checkpointed, wants_checkpoint
from service.openapi import ProblemOperation, UploadOperation, problem_spec
from service.problems import Problem
from service.responses import (
    ErrorOut,
    InputOut,
    ModelDescription,
    ModelOut,
    PredictionCreated,
    PredictionOut,
    PredictionPage,
    created,
    data_uri,
    event_out,
    receipt,
)
from service.uploads import parse_upload, read_body
from usecases.predict import Recorded

MAX_BIGINT = 2**63 - 1
# The header every appending route takes (its value is checked by domain.uploads.check_idempotency_key).
IdempotencyKeyHeader = Annotated[
    str | None,
    HeaderParameter(name="Idempotency-Key", required=False, max_length=255,
                    description="A retry with the same key returns the first answer and appends nothing"),
]
_FORMAT_MEDIA_TYPES = {
    "PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "BMP": "image/bmp",
    "TIFF": "image/tiff", "WEBP": "image/webp",
}


# ---- predictions ---------------------------------------------------------------------------


@post(
    "/prediction/",
    summary="Upload an image; get the model's prediction once its events are committed",
    tags=["predictions"],
    status_code=201,
    operation_class=UploadOperation,
    opt={"scope": "predict"},
    response_description="The prediction, its ids and the receipt of its events",
    responses={
        408: problem_spec("The body did not arrive within the deadline"),
        413: problem_spec("The upload exceeds the size limit"),
        415: problem_spec("Not an allowed image format"),
        422: problem_spec("Undecodable image, decompression bomb, bad filename or reused Idempotency-Key"),
        500: problem_spec("Inference failed: recorded as PredictionFailed, with prediction_id and receipt"),
        503: problem_spec("Overloaded or database unavailable; retry after Retry-After"),
    },
)
async def create_prediction(
    request: Request,
    services: ServicesDependency,
    idempotency_key: IdempotencyKeyHeader = None,
    filename: Annotated[str | None, QueryParameter(name="filename", required=False, description="Name of a raw-body upload")] = None,
) -> Response[PredictionCreated]:
    serving = services.model.serving()
    check_idempotency_key(idempotency_key)
    settings = services.settings
    body = await read_body(request, limit=settings.max_upload_bytes, deadline_s=settings.body_read_timeout_s)
    return await predict_and_answer(request, services, parse_upload(request, body, filename), idempotency_key)


async def predict_and_answer(request: Request, services: ServicesDependency, upload: Upload,
                             idempotency_key: str | None, **extra_metadata: str | None) -> Response[PredictionCreated]:
    """Predict, commit, answer: what an upload gets, through the API or the console."""
    serving = services.model.serving()
    recorded: Recorded = await serving.predictions.predict(
        upload,
        idempotency_key=idempotency_key,
        metadata={
            "request_id": request.scope.get("state", {}).get("request_id"),
            "client": request.client.host if request.client else None,
            "user_agent": (request.headers.get("user-agent") or "")[:256] or None,
            **extra_metadata,
        },
    )
    the_receipt = receipt(serving.log_id, recorded.events, recorded.head_position, recorded.head_hash)
    headers = {}
    if wants_checkpoint(request) and (signed := await checkpointed(services, the_receipt)) is not None:
        the_receipt, headers = signed, PREFERENCE_APPLIED
    answer = created(recorded.events, the_receipt)
    prediction_id = str(recorded.events[0].stream_id)
    if isinstance(answer, tuple):
        requested, failed = answer
        raise Problem(
            500, "inference_failed", f"the model failed for this input: {failed.message}",
            prediction_id=prediction_id, input_id=requested.input_id, error_code=failed.error_code,
            receipt=msgspec.to_builtins(the_receipt),
        )
    return Response(answer, status_code=201, headers={"Location": f"/prediction/{prediction_id}", **headers})


@get(
    "/predictions/",
    operation_class=ProblemOperation,
    summary="List predictions, newest first",
    tags=["predictions"],
    opt={"scope": "read"},
)
async def list_predictions(
    services: ServicesDependency,
    limit: Annotated[int, QueryParameter(ge=1, le=500, description="Page size")] = 50,
    cursor: Annotated[
        str | None,
        QueryParameter(pattern=r"^[0-9]{1,19}$", description="`next_cursor` of the previous page"),
    ] = None,
    likely_class: Annotated[int | None, QueryParameter(name="class", ge=0, le=1_000_000, description="Only this class")] = None,
    model_version: Annotated[str | None, QueryParameter(max_length=200, description="Only this model version")] = None,
    since: Annotated[datetime | None, QueryParameter(description="Created at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, QueryParameter(description="Created before (ISO 8601)")] = None,
    labelled: Annotated[bool | None, QueryParameter(description="Only predictions with (true) or without (false) a current label")] = None,
    correct: Annotated[bool | None, QueryParameter(description="Only labelled made predictions the model got right (true) or wrong (false)")] = None,
    confidence_below: Annotated[float | None, QueryParameter(ge=0, le=1, description="Only made predictions whose top confidence is below this")] = None,
) -> PredictionPage:
    before = int(cursor) if cursor is not None else None
    if before is not None and before > MAX_BIGINT:
        raise Problem(400, "bad_cursor", "the cursor is out of range")
    since, until = in_utc("since", since), in_utc("until", until)
    if model_version is not None and "\x00" in model_version:  # PostgreSQL text cannot hold NUL
        raise Problem(400, "bad_parameter", "`model_version` contains a NUL character")
    async with services.reading() as connection:
        # Read-your-writes for the list: answer once the projection has reached the head as it
        # was when this request started (bounded wait).
        await wait_for_projection(connection, services.settings.read_your_writes_timeout_s)
        views, next_cursor = await queries.list_predictions(
            connection, limit=limit, before_position=before, likely_class=likely_class,
            model_version=model_version, since=since, until=until, labelled=labelled, correct=correct,
            confidence_below=confidence_below,
        )
    return PredictionPage(
        items=[prediction_out(view) for view in views],
        next_cursor=str(next_cursor) if next_cursor is not None else None,
    )


@get(
    "/prediction/{prediction_id:uuid}",
    operation_class=ProblemOperation,
    summary="One prediction, with its input's metadata and the original image as a data URI",
    tags=["predictions"],
    opt={"scope": "read"},
    responses={404: problem_spec("No such prediction")},
)
async def get_prediction(services: ServicesDependency, prediction_id: Annotated[UUID, PathParameter()]) -> PredictionOut:
    view = await current_prediction(services, prediction_id)
    if view is None:
        raise Problem(404, "prediction_not_found", f"no prediction {prediction_id}")
    image = None
    if not view.erased:
        content = await services.store.read_blob(bytes.fromhex(view.blob_sha256))
        if content is not None:
            image = data_uri(_media_type(content), content)
    return prediction_out(view, image=image)


@get(
    "/input/{input_id:uuid}",
    operation_class=ProblemOperation,
    summary="The original uploaded bytes",
    tags=["predictions"],
    opt={"scope": "read"},
    media_type="application/octet-stream",
    responses={404: problem_spec("No such input"), 410: problem_spec("The input was erased")},
)
async def get_input(services: ServicesDependency, input_id: Annotated[UUID, PathParameter()]) -> Response[bytes]:
    async with services.reading() as connection:
        found = await queries.get_input(connection, input_id)
        if found is None:  # perhaps not projected yet: wait (bounded) for the head as of now
            await wait_for_projection(connection, services.settings.read_your_writes_timeout_s)
            found = await queries.get_input(connection, input_id)
    if found is None:
        raise Problem(404, "input_not_found", f"no input {input_id}")
    blob_sha256 = found.blob_sha256
    content = None if found.erased else await services.store.read_blob(bytes.fromhex(blob_sha256))
    if content is None:
        raise Problem(410, "input_erased", f"the original bytes of input {input_id} were erased")
    return Response(
        content,
        media_type=_media_type(content),
        headers={
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Content-Disposition": "attachment",
            "ETag": f'"{blob_sha256}"',
        },
    )


# ---- audit ---------------------------------------------------------------------------------


@get(
    "/prediction/{prediction_id:uuid}/events",
    operation_class=ProblemOperation,
    summary="A prediction's events in stream order, exactly as hashed",
    tags=["audit"],
    opt={"scope": "audit"},
    responses={404: problem_spec("No such prediction")},
)
async def prediction_events(services: ServicesDependency, prediction_id: Annotated[UUID, PathParameter()]) -> list[EventLine]:
    events = await services.store.read_stream(prediction_id)
    if not events:
        raise Problem(404, "prediction_not_found", f"no prediction {prediction_id}")
    return [event_out(event) for event in events]


@get(
    "/events",
    operation_class=ProblemOperation,
    summary="Events in global order, as NDJSON, with their hashes (auditor replay)",
    tags=["audit"],
    opt={"scope": "audit"},
    media_type="application/x-ndjson",
    response_description="One EventLine JSON object per line",
)
async def events(
    services: ServicesDependency,
    after: Annotated[int, QueryParameter(ge=0, le=MAX_BIGINT, description="Position to start after")] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=10_000, description="At most this many events")] = 1000,
) -> Stream:
    store = services.store
    first_page = await store.read_all(after, min(limit, 500))  # fail (503) before the 200 starts

    async def lines() -> AsyncIterator[bytes]:
        page, sent = first_page, 0
        while page:
            yield ndjson(event_out(event) for event in page)
            sent += len(page)
            if sent >= limit or len(page) < 500:
                return
            page = await store.read_all(page[-1].position, min(limit - sent, 500))

    return Stream(lines(), media_type="application/x-ndjson")


# ---- model, metrics ------------------------------------------------------------------------


@get("/model", summary="The model being served", tags=["model"], opt={"scope": "read"},
     operation_class=ProblemOperation)
async def model(services: ServicesDependency) -> ModelDescription:
    serving = services.model.serving()
    info = serving.info
    return ModelDescription(
        name=info.name,
        version=info.version,
        sha256=info.sha256,
        input_shape=list(info.input_shape),
        output_kind=info.output_kind,
        num_classes=info.num_classes,
        device=info.device,
        frameworks=dict(info.frameworks),
        preprocessing=msgspec.to_builtins(serving.spec),
    )


@get(
    "/metrics",
    operation_class=ProblemOperation,
    summary="Prometheus metrics",
    tags=["health"],
    opt={"scope": "read"},
    media_type="text/plain; version=0.0.4; charset=utf-8",
)
async def metrics(services: ServicesDependency) -> bytes:
    try:
        await services.refresh_lag()
        await services.refresh_replica()
        await services.refresh_tlog()
        await services.refresh_quality()
    except DatabaseUnavailable:
        pass  # the scrape still answers; the gauges keep their last values
    return services.metrics.render()


# ---- shaping -------------------------------------------------------------------------------


async def current_prediction(services: ServicesDependency, prediction_id: UUID) -> queries.PredictionView | None:
    """A prediction as of now: from the read tables, or from its stream when the projection has
    not applied it (or its latest label) yet, so a 2xx POST's id never answers 404 and a recorded
    label shows at once."""
    async with services.reading() as connection:
        view = await queries.get_prediction(connection, prediction_id)
    applied = max(view.position, view.labelled_at or 0) if view is not None else 0
    if view is None or await services.store.stream_head(prediction_id) > applied:
        fresh = queries.prediction_view_from_events(
            await services.store.read_stream(prediction_id), erased=view.erased if view is not None else False
        )
        view = fresh or view
    return view


async def wait_for_projection(connection, timeout_s: float) -> None:
    """Read-your-writes: wait (bounded) until the projection has applied the head as it is now."""
    head = await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")
    await queries.wait_until_projected(connection, head, timeout_s)


def in_utc(name: str, moment: datetime | None) -> datetime | None:
    """A time filter as an instant PostgreSQL can hold (Python's datetime stops at year 9999 in
    UTC, so 0001-01-01T00:00+01:00 or 9999-12-31T23:59-14:00 cannot even be converted)."""
    if moment is None or moment.tzinfo is None:
        return moment
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:
        raise Problem(400, "bad_time", f"`{name}` is outside the range of representable instants") from None


def _media_type(content: bytes) -> str:
    format_name = sniff_format(content)
    return _FORMAT_MEDIA_TYPES.get(format_name or "", "application/octet-stream")


def prediction_out(view: queries.PredictionView, *, image: str | None = None) -> PredictionOut:
    return PredictionOut(
        prediction_id=str(view.prediction_id),
        input_id=str(view.input_id),
        status=view.status,
        filename=view.filename,
        contenttype=view.content_type,
        prediction=view.output,
        likely_class=view.likely_class,
        model=ModelOut(name=view.model.name, version=view.model.version, sha256=view.model.sha256, device=view.device),
        input=InputOut(
            input_id=str(view.input_id),
            filename=view.filename,
            contenttype=view.content_type,
            size_bytes=view.size_bytes,
            blob_sha256=view.blob_sha256,
            format=view.image.format,
            mode=view.image.mode,
            width=view.image.width,
            height=view.image.height,
            tensor_sha256=view.tensor_sha256,
            erased=view.erased,
        ),
        error=ErrorOut(code=view.error.code, message=view.error.message) if view.error else None,
        position=view.position,
        created_at=view.recorded_at,
        label=view.label,
        correct=view.correct,
        image=image,
    )


ROUTES = [create_prediction, list_predictions, get_prediction, get_input, prediction_events, events, model, metrics]
