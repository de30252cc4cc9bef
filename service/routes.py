"""HTTP routes. Thin: parse, call the service layer or the read side, shape the answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, RequestBody, Schema
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, PathParameter, QueryParameter
from litestar.response import Stream

from db.store import DatabaseUnavailable
from domain.preprocessing import sniff_format
from domain.uploads import UploadRejected, check_idempotency_key
from projections import queries
from service.predictions import Recorded
from service.problems import PROBLEM_MEDIA_TYPE, Problem
from service.responses import (
    ErrorOut,
    EventOut,
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
from service.security import require_scope
from service.uploads import ClientGone, parse_upload, read_body

MAX_BIGINT = 2**63 - 1
_IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/bmp", "image/tiff", "image/webp"]
_FORMAT_MEDIA_TYPES = {
    "PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "BMP": "image/bmp",
    "TIFF": "image/tiff", "WEBP": "image/webp",
}


def _problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=dict[str, Any], description=description, media_type=PROBLEM_MEDIA_TYPE)


_PROBLEM_SCHEMA = Schema(
    type="object",  # type: ignore[arg-type]
    description="RFC 9457 problem details (extra members such as prediction_id or receipt may follow)",
    properties={
        "type": Schema(type="string"),  # type: ignore[arg-type]
        "title": Schema(type="string"),  # type: ignore[arg-type]
        "status": Schema(type="integer"),  # type: ignore[arg-type]
        "detail": Schema(type="string"),  # type: ignore[arg-type]
        "instance": Schema(type="string"),  # type: ignore[arg-type]
        "request_id": Schema(type="string"),  # type: ignore[arg-type]
    },
    required=["type", "title", "status", "detail"],
)


@dataclass
class ProblemOperation(Operation):
    """Every error answer is documented as application/problem+json (Litestar's generated 400
    would say application/json)."""

    def __post_init__(self) -> None:
        for status, response in (self.responses or {}).items():
            if isinstance(response, OpenAPIResponse) and status[:1] in ("4", "5"):
                response.content = {PROBLEM_MEDIA_TYPE: OpenAPIMediaType(schema=_PROBLEM_SCHEMA)}


_CREATED_EXAMPLE = {
    "filename": "7000_8.png",
    "contenttype": "image/png",
    "prediction": [1.2e-09, 3.4e-08, 2.1e-06, 4.5e-05, 1.1e-09, 2.2e-07, 6.0e-10, 1.8e-06, 0.99994, 8.7e-06],
    "likely_class": 8,
    "input_id": "0b6f3c1e-5d2a-4f4b-9a53-7f7f2b0f9e11",
    "prediction_id": "5a4f6f38-2d8e-4c5b-8f0e-3c2b1a09d7e4",
    "blob_sha256": "3f1c…e9",
    "model": {"name": "mnist_convnet", "version": "1.0.0", "sha256": "8a587a84…c0df", "device": "/device:CPU:0"},
    "receipt": {
        "log_id": "c2b4b7a0-1f1e-4a8e-9d43-2f6d0b5e7a10",
        "stream_id": "5a4f6f38-2d8e-4c5b-8f0e-3c2b1a09d7e4",
        "events": [
            {"position": 41, "stream_version": 1, "type": "PredictionRequested", "hash": "9e0d…41"},
            {"position": 42, "stream_version": 2, "type": "PredictionMade", "hash": "77ab…0c"},
        ],
        "head": {"position": 57, "hash": "1c2d…aa"},
    },
    "created_at": "2026-11-26T11:47:11.123456Z",
}
_PROBLEM_EXAMPLE = {
    "type": "urn:problem:unsupported_format",
    "title": "Unsupported media type",
    "status": 415,
    "detail": "the upload is not an image in an allowed format (PNG, JPEG, GIF, BMP, TIFF, WEBP)",
    "instance": "/prediction",
    "request_id": "4be1a8f0c3a54b0f8f6d2d9f5e1b7c2a",
}


@dataclass
class UploadOperation(ProblemOperation):
    """The upload body is read by hand (multipart or raw image); this documents both forms."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for status, response in (self.responses or {}).items():
            if not isinstance(response, OpenAPIResponse):
                continue
            for media in (response.content or {}).values():
                media.example = _CREATED_EXAMPLE if status == "201" else (_PROBLEM_EXAMPLE if status == "415" else None)
        binary = Schema(type="string", format="binary")  # type: ignore[arg-type]
        self.request_body = RequestBody(
            required=True,
            description="An image as the multipart field `file`, or the image itself as the body "
            "(name it with `?filename=` or a percent-encoded `X-Filename` header).",
            content={
                "multipart/form-data": OpenAPIMediaType(
                    schema=Schema(type="object", properties={"file": binary}, required=["file"])  # type: ignore[arg-type]
                ),
                **{media: OpenAPIMediaType(schema=binary) for media in [*_IMAGE_TYPES, "application/octet-stream"]},
            },
        )


# ---- predictions ---------------------------------------------------------------------------


@post(
    "/prediction/",
    summary="Upload an image; get the model's prediction once its events are committed",
    tags=["predictions"],
    status_code=201,
    operation_class=UploadOperation,
    guards=[require_scope("predict")],
    response_description="The prediction, its ids and the receipt of its events",
    responses={
        408: _problem_spec("The body did not arrive within the deadline"),
        413: _problem_spec("The upload exceeds the size limit"),
        415: _problem_spec("Not an allowed image format"),
        422: _problem_spec("Undecodable image, decompression bomb, bad filename or reused Idempotency-Key"),
        500: _problem_spec("Inference failed: recorded as PredictionFailed, with prediction_id and receipt"),
        503: _problem_spec("Overloaded or database unavailable; retry after Retry-After"),
    },
)
async def create_prediction(
    request: Request,
    state: State,
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(name="Idempotency-Key", required=False, max_length=255,
                  description="A retry with the same key returns the first answer and appends nothing"),
    ] = None,
    filename: Annotated[str | None, QueryParameter(name="filename", required=False, description="Name of a raw-body upload")] = None,
) -> Response[PredictionCreated]:
    runtime = state.runtime
    runtime.require_model()
    try:
        check_idempotency_key(idempotency_key)
    except UploadRejected as rejected:
        raise Problem(rejected.status, rejected.code, rejected.message) from None
    try:
        body = await read_body(
            request, limit=runtime.settings.max_upload_bytes, deadline_s=runtime.settings.body_read_timeout_s
        )
    except ClientGone:
        raise Problem(400, "client_disconnected", "the client went away before the body arrived") from None
    upload = parse_upload(request, body, filename)
    recorded: Recorded = await runtime.predictions.predict(
        upload,
        idempotency_key=idempotency_key,
        metadata={
            "request_id": request.scope.get("state", {}).get("request_id"),
            "client": request.client.host if request.client else None,
            "user_agent": (request.headers.get("user-agent") or "")[:256] or None,
        },
    )
    the_receipt = receipt(runtime.log_id, recorded.events, recorded.head_position, recorded.head_hash)
    answer = created(recorded.events, the_receipt)
    prediction_id = str(recorded.events[0].stream_id)
    if isinstance(answer, tuple):
        requested, failed = answer
        raise Problem(
            500, "inference_failed", f"the model failed for this input: {failed.message}",
            prediction_id=prediction_id, input_id=requested.input_id, error_code=failed.error_code,
            receipt=msgspec.to_builtins(the_receipt),
        )
    return Response(answer, status_code=201, headers={"Location": f"/prediction/{prediction_id}"})


@get(
    "/predictions/",
    operation_class=ProblemOperation,
    summary="List predictions, newest first",
    tags=["predictions"],
    guards=[require_scope("read")],
)
async def list_predictions(
    state: State,
    limit: Annotated[int, QueryParameter(ge=1, le=500, description="Page size")] = 50,
    cursor: Annotated[
        str | None,
        QueryParameter(pattern=r"^[0-9]{1,19}$", description="`next_cursor` of the previous page"),
    ] = None,
    likely_class: Annotated[int | None, QueryParameter(name="class", ge=0, le=1_000_000, description="Only this class")] = None,
    model_version: Annotated[str | None, QueryParameter(max_length=200, description="Only this model version")] = None,
    since: Annotated[datetime | None, QueryParameter(description="Created at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, QueryParameter(description="Created before (ISO 8601)")] = None,
) -> PredictionPage:
    runtime = state.runtime
    before = int(cursor) if cursor is not None else None
    if before is not None and before > MAX_BIGINT:
        raise Problem(400, "bad_cursor", "the cursor is out of range")
    async with runtime.reading() as connection:
        # Read-your-writes for the list: answer once the projection has reached the head as it
        # was when this request started (bounded wait).
        head = await _head_position(connection)
        await queries.wait_for_checkpoint(connection, head, runtime.settings.read_your_writes_timeout_s)
        views, next_cursor = await queries.list_predictions(
            connection, limit=limit, before_position=before, likely_class=likely_class,
            model_version=model_version, since=since, until=until,
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
    guards=[require_scope("read")],
    responses={404: _problem_spec("No such prediction")},
)
async def get_prediction(state: State, prediction_id: Annotated[UUID, PathParameter()]) -> PredictionOut:
    runtime = state.runtime
    async with runtime.reading() as connection:
        view = await queries.get_prediction(connection, prediction_id)
    if view is None:
        # Not projected yet? The stream is the truth: a 2xx POST's id never answers 404.
        view = queries.prediction_view_from_events(await runtime.store.read_stream(prediction_id))
    if view is None:
        raise Problem(404, "prediction_not_found", f"no prediction {prediction_id}")
    image = None
    if not view.erased:
        content = await runtime.store.read_blob(bytes.fromhex(view.blob_sha256))
        if content is not None:
            image = data_uri(_media_type(content), content)
    return prediction_out(view, image=image)


@get(
    "/input/{input_id:uuid}",
    operation_class=ProblemOperation,
    summary="The original uploaded bytes",
    tags=["predictions"],
    guards=[require_scope("read")],
    media_type="application/octet-stream",
    responses={404: _problem_spec("No such input"), 410: _problem_spec("The input was erased")},
)
async def get_input(state: State, input_id: Annotated[UUID, PathParameter()]) -> Response[bytes]:
    runtime = state.runtime
    async with runtime.reading() as connection:
        found = await queries.get_input(connection, input_id)
        if found is None:  # perhaps not projected yet: wait (bounded) for the head as of now
            head = await _head_position(connection)
            await queries.wait_for_checkpoint(connection, head, runtime.settings.read_your_writes_timeout_s)
            found = await queries.get_input(connection, input_id)
    if found is None:
        raise Problem(404, "input_not_found", f"no input {input_id}")
    blob_sha256 = found.blob_sha256
    content = None if found.erased else await runtime.store.read_blob(bytes.fromhex(blob_sha256))
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
    guards=[require_scope("audit")],
    responses={404: _problem_spec("No such prediction")},
)
async def prediction_events(state: State, prediction_id: Annotated[UUID, PathParameter()]) -> list[EventOut]:
    events = await state.runtime.store.read_stream(prediction_id)
    if not events:
        raise Problem(404, "prediction_not_found", f"no prediction {prediction_id}")
    return [event_out(event) for event in events]


@get(
    "/events",
    operation_class=ProblemOperation,
    summary="Events in global order, as NDJSON, with their hashes (auditor replay)",
    tags=["audit"],
    guards=[require_scope("audit")],
    media_type="application/x-ndjson",
    response_description="One EventOut JSON object per line",
)
async def events(
    state: State,
    after: Annotated[int, QueryParameter(ge=0, le=MAX_BIGINT, description="Position to start after")] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=10_000, description="At most this many events")] = 1000,
) -> Stream:
    store = state.runtime.store
    first_page = await store.read_all(after, min(limit, 500))  # fail (503) before the 200 starts

    async def lines() -> AsyncIterator[bytes]:
        encoder = msgspec.json.Encoder()
        page, sent = first_page, 0
        while page:
            for event in page:
                yield encoder.encode(event_out(event)) + b"\n"
            sent += len(page)
            if sent >= limit or len(page) < 500:
                return
            page = await store.read_all(page[-1].position, min(limit - sent, 500))

    return Stream(lines(), media_type="application/x-ndjson")


# ---- model, metrics ------------------------------------------------------------------------


@get("/model", summary="The model being served", tags=["model"], guards=[require_scope("read")],
     operation_class=ProblemOperation)
async def model(state: State) -> ModelDescription:
    runtime = state.runtime
    info = runtime.require_model()
    return ModelDescription(
        name=info.name,
        version=info.version,
        sha256=info.sha256,
        input_shape=list(info.input_shape),
        output_kind=info.output_kind,
        num_classes=info.num_classes,
        device=info.device,
        frameworks=dict(info.frameworks),
        preprocessing=msgspec.to_builtins(runtime.predictions.spec),
    )


@get(
    "/metrics",
    operation_class=ProblemOperation,
    summary="Prometheus metrics",
    tags=["health"],
    guards=[require_scope("read")],
    media_type="text/plain; version=0.0.4; charset=utf-8",
)
async def metrics(state: State) -> bytes:
    runtime = state.runtime
    try:
        await runtime.refresh_lag()
    except DatabaseUnavailable:
        pass  # the scrape still answers; the gauges keep their last values
    return runtime.metrics.render()


# ---- shaping -------------------------------------------------------------------------------


async def _head_position(connection) -> int:
    return await connection.fetchval("SELECT coalesce(max(position), 0) FROM events")


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
        image=image,
    )


ROUTES = [create_prediction, list_predictions, get_prediction, get_input, prediction_events, events, model, metrics]
