"""HTTP routes for ground truth: record a label (or a correction), withdraw the current one, read
the history. Thin: parse, call `usecases.labels`, shape the answer."""

from __future__ import annotations

from typing import Annotated
from uuid import UUID

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.params import PathParameter, QueryParameter

from domain.labels import MAX_REASON_CHARS, LabelEntry
from service.bootstrap import ServicesDependency
from service.openapi import LabelOperation, ProblemOperation, problem_spec
from service.problems import Problem
from service.responses import Receipt, receipt
from service.security import ACTOR
from service.uploads import ClientGone, read_body
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


async def _written(services: ServicesDependency, prediction_id: UUID, recorded: Recorded, entry: LabelEntry,
                   current: int | None) -> LabelWritten:
    log_id = await services.log.id()
    return LabelWritten(
        prediction_id=str(prediction_id), current_label=current, entry=entry,
        receipt=receipt(log_id, recorded.events, recorded.head_position, recorded.head_hash),
    )


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
    try:
        body = await read_body(request, limit=MAX_LABEL_BODY_BYTES, deadline_s=services.settings.body_read_timeout_s)
    except ClientGone:
        raise Problem(400, "client_disconnected", "the client went away before the body arrived") from None
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
    return Response(await _written(services, prediction_id, recorded, entry, label.label), status_code=201,
                    headers={"Location": f"/prediction/{prediction_id}/labels"})


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
) -> LabelWritten:
    recorded = await services.labels.withdraw(
        prediction_id, reason=reason, actor=_actor(request), metadata=_metadata(request)
    )
    entry = LabelEntry(kind="withdrawn", stream_version=recorded.events[-1].stream_version, label=None,
                       source=None, note=None, reason=reason, actor=_actor(request))
    return await _written(services, prediction_id, recorded, entry, None)


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


LABEL_ROUTES = [record_label, withdraw_label, label_history]
