"""HTTP routes for ground truth: record a label (or a correction), withdraw the current one, read
the history. Thin: parse, call `usecases.labels`, shape the answer."""

from __future__ import annotations

import hashlib
from typing import Annotated
from uuid import UUID

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import PathParameter, QueryParameter

from domain.events import LabelBatchItem
from domain.labels import MAX_REASON_CHARS, MAX_SOURCE_CHARS, LabelEntry
from domain.rejections import Rejected
from domain.uploads import check_idempotency_key
from service.bootstrap import ServicesDependency
from service.checkpoint_wait import PREFERENCE_APPLIED, checkpointed, wants_checkpoint
from service.openapi import (
    BulkLabelOperation,
    LabelOperation,
    ProblemOperation,
    problem_spec,
)
from service.problems import TITLES, Problem, status_of
from service.responses import ChainHead, Receipt, receipt
from service.routes import IdempotencyKeyHeader
from service.security import ACTOR
from service.uploads import read_body
from usecases.labels import BulkOutcome
from usecases.predict import Recorded

MAX_LABEL_BODY_BYTES = 16 * 1024


class LabelIn(msgspec.Struct, forbid_unknown_fields=True):
    label: int
    source: str
    note: str | None = None


class LabelWritten(msgspec.Struct, frozen=True):
    prediction_id: str
    current_label: int | None  # after this write
    entry: LabelEntry
    receipt: Receipt


def _actor(request: Request) -> str | None:
    return request.scope.get("state", {}).get(ACTOR)


def _metadata(request: Request) -> dict[str, object]:
    state = request.scope.get("state", {})
    return {"request_id": state.get("request_id"), "client": request.client.host if request.client else None,
            "actor": state.get(ACTOR)}


async def _written(request: Request, services: ServicesDependency, prediction_id: UUID, recorded: Recorded,
                   entry: LabelEntry, current: int | None, status_code: int, headers: dict[str, str]) -> Response[LabelWritten]:
    log_id = await services.log.id()
    the_receipt = receipt(log_id, recorded.events, recorded.head_position, recorded.head_hash)
    if wants_checkpoint(request) and (signed := await checkpointed(services, the_receipt)) is not None:
        the_receipt, headers = signed, {**headers, **PREFERENCE_APPLIED}
    written = LabelWritten(prediction_id=str(prediction_id), current_label=current, entry=entry, receipt=the_receipt)
    return Response(written, status_code=status_code, headers=headers)


@post(
    "/prediction/{prediction_id:uuid}/labels",
    summary="Record the ground truth for a prediction (a correction is simply a newer label)",
    tags=["labels"],
    status_code=201,
    operation_class=LabelOperation,
    opt={"scope": "label"},
    responses={
        400: problem_spec("The body is not a label"),
        404: problem_spec("No such prediction"),
        408: problem_spec("The body did not arrive within the deadline"),
        422: problem_spec("The label is not a class of the model, or the source is missing"),
    },
)
async def record_label(
    request: Request, services: ServicesDependency, prediction_id: Annotated[UUID, PathParameter()]
) -> Response[LabelWritten]:
    body = await read_body(request, limit=MAX_LABEL_BODY_BYTES, deadline_s=services.settings.body_read_timeout_s)
    try:
        label = msgspec.json.decode(body, type=LabelIn)
    except msgspec.ValidationError as error:
        raise Problem(400, "bad_label_body", f"the body is not a label: {error}") from None
    except msgspec.DecodeError as error:
        raise Problem(400, "bad_json", f"the body is not JSON: {error}") from None
    recorded = await services.labels.record(
        prediction_id, label=label.label, source=label.source, note=label.note, actor=_actor(request),
        metadata=_metadata(request),
    )
    entry = LabelEntry(kind="recorded", stream_version=recorded.events[-1].stream_version, label=label.label,
                       source=label.source, note=label.note, reason=None, actor=_actor(request))
    return await _written(request, services, prediction_id, recorded, entry, label.label, 201,
                          {"Location": f"/prediction/{prediction_id}/labels"})


@delete(
    "/prediction/{prediction_id:uuid}/labels/current",
    summary="Withdraw the current label (the reason is recorded)",
    tags=["labels"],
    status_code=200,
    operation_class=ProblemOperation,
    opt={"scope": "label"},
    responses={404: problem_spec("No such prediction"), 409: problem_spec("The prediction has no current label")},
)
async def withdraw_label(
    request: Request,
    services: ServicesDependency,
    prediction_id: Annotated[UUID, PathParameter()],
    reason: Annotated[str, QueryParameter(min_length=1, max_length=MAX_REASON_CHARS, description="Why")],
) -> Response[LabelWritten]:
    recorded = await services.labels.withdraw(
        prediction_id, reason=reason, actor=_actor(request), metadata=_metadata(request)
    )
    entry = LabelEntry(kind="withdrawn", stream_version=recorded.events[-1].stream_version, label=None,
                       source=None, note=None, reason=reason, actor=_actor(request))
    return await _written(request, services, prediction_id, recorded, entry, None, 200, {})


@get(
    "/prediction/{prediction_id:uuid}/labels",
    summary="A prediction's label history, oldest first",
    tags=["labels"],
    operation_class=ProblemOperation,
    opt={"scope": "read"},
    responses={404: problem_spec("No such prediction")},
)
async def label_history(services: ServicesDependency, prediction_id: Annotated[UUID, PathParameter()]) -> list[LabelEntry]:
    return await services.labels.history(prediction_id)


class ItemOutcome(msgspec.Struct, frozen=True, omit_defaults=True):
    index: int
    prediction_id: str | None
    status: int  # 201 recorded; otherwise this item's problem's status
    stream_version: int | None = None
    position: int | None = None
    hash: str | None = None
    problem: dict[str, object] | None = None


class BatchRecord(msgspec.Struct, frozen=True):
    stream_id: str
    position: int
    hash: str


class LabelsRecorded(msgspec.Struct, frozen=True):
    accepted: int
    refused: int
    items: list[ItemOutcome]
    batch: BatchRecord  # the request's own LabelBatchRecorded event
    head: ChainHead
    log_id: str
    replayed: bool


_BULK_MEDIA_TYPES = ("application/json", "application/x-ndjson")


def _items_of(body: bytes, media_type: str) -> list[object]:
    try:
        if media_type == "application/x-ndjson":
            return [msgspec.json.decode(line) for line in body.splitlines() if line.strip()]
        items = msgspec.json.decode(body)
    except msgspec.DecodeError as error:
        raise Rejected("invalid_labels_body", f"the body is not {media_type}: {error}") from None
    if not isinstance(items, list):
        raise Rejected("invalid_labels_body", "the body is a JSON array of items (or NDJSON, one item per line)")
    return items


def _item_out(item: LabelBatchItem, outcome: BulkOutcome, request_path: str) -> ItemOutcome:
    if item.stream_version is not None:
        event = outcome.events[item.index]
        return ItemOutcome(index=item.index, prediction_id=item.prediction_id, status=201,
                           stream_version=item.stream_version, position=event.position, hash=event.hash.hex())
    code = item.code or "invalid_label_item"
    status = status_of(code)
    return ItemOutcome(index=item.index, prediction_id=item.prediction_id, status=status, problem={
        "type": f"urn:problem:{code}", "title": TITLES.get(status, "Error"), "status": status,
        "detail": item.detail or code, "instance": f"{request_path}#{item.index}",
    })


@post(
    "/labels",
    summary="Record many labels at once (a JSON array or NDJSON of {prediction_id, label, source?, note?})",
    tags=["labels"],
    status_code=200,
    operation_class=BulkLabelOperation,
    opt={"scope": "label"},
    responses={
        400: problem_spec("The body is not a JSON array or NDJSON"),
        413: problem_spec("More than 10,000 items, or over the size limit"),
        415: problem_spec("Neither application/json nor application/x-ndjson"),
        422: problem_spec("The Idempotency-Key was used for another body"),
    },
)
async def record_labels(
    request: Request,
    services: ServicesDependency,
    source: Annotated[str | None, QueryParameter(max_length=MAX_SOURCE_CHARS, description="The source of items that name none")] = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> LabelsRecorded:
    check_idempotency_key(idempotency_key)
    media_type = (request.headers.get("content-type") or "application/json").split(";")[0].strip().lower()
    if media_type not in _BULK_MEDIA_TYPES:
        raise Problem(415, "unsupported_media_type", "send application/json (an array) or application/x-ndjson")
    settings = services.settings
    body = await read_body(request, limit=settings.max_upload_bytes, deadline_s=settings.body_read_timeout_s)
    items = _items_of(body, media_type)
    fingerprint = hashlib.sha256(b"%s\n%s\n" % (media_type.encode(), (source or "").encode()) + body).digest()
    outcome = await services.labels.record_many(
        items, default_source=source, actor=_actor(request), idempotency_key=idempotency_key,
        fingerprint=fingerprint if idempotency_key else None, metadata=_metadata(request),
    )
    answers = [_item_out(item, outcome, request.url.path) for item in outcome.items]
    accepted = sum(1 for answer in answers if answer.status == 201)
    return LabelsRecorded(
        accepted=accepted, refused=len(answers) - accepted, items=answers,
        batch=BatchRecord(stream_id=str(outcome.batch.stream_id), position=outcome.batch.position,
                          hash=outcome.batch.hash.hex()),
        head=ChainHead(position=outcome.head_position, hash=outcome.head_hash.hex()),
        log_id=await services.log.id(), replayed=outcome.replayed,
    )


LABEL_ROUTES = [record_label, withdraw_label, label_history, record_labels]
