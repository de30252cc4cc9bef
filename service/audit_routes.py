"""HTTP routes for audit work on request: verify the whole log, or reproduce one prediction, on the
server and bounded in time (usecases/audit_jobs.py runs them); the `audit` scope."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.params import PathParameter, QueryParameter

from service.bootstrap import ServicesDependency
from service.openapi import ProblemOperation, problem_spec
from service.problems import Problem
from service.routes import MAX_BIGINT
from service.security import ACTOR
from usecases.audit_jobs import AuditJob


class AuditJobRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["verify", "reproduce"]
    prediction_id: uuid.UUID | None = None  # required for reproduce


class AuditJobsPage(msgspec.Struct, frozen=True):
    items: list[AuditJob]


@post(
    "/audit/jobs",
    summary="Verify the log, or reproduce a prediction, on the server (bounded in time); poll the job",
    tags=["audit"],
    opt={"scope": "audit"},
    operation_class=ProblemOperation,
    responses={404: problem_spec("No such prediction"), 503: problem_spec("Too many audit jobs are open")},
    status_code=202,
)
async def request_job(request: Request, services: ServicesDependency, data: AuditJobRequest) -> Response[AuditJob]:
    if (data.kind == "reproduce") != (data.prediction_id is not None):
        raise Problem(422, "invalid_audit_job", "`prediction_id` is given for reproduce, and only for reproduce")
    job, _ = await services.audit_jobs.request(data.kind, data.prediction_id, request.scope.get("state", {}).get(ACTOR))
    return Response(job, status_code=202, headers={"Location": f"/audit/jobs/{job.id}"})


@get("/audit/jobs/{job_id:int}", summary="One audit job: waiting, running, or its verdict and report", tags=["audit"],
     opt={"scope": "audit"}, operation_class=ProblemOperation, responses={404: problem_spec("No such job")})
async def get_job(services: ServicesDependency,
                  job_id: Annotated[int, PathParameter(ge=1, le=MAX_BIGINT)]) -> AuditJob:
    return await services.audit_jobs.get(job_id)


@get("/audit/jobs", summary="Recent audit jobs, newest first (by hand with `just verify` too)", tags=["audit"],
     opt={"scope": "audit"}, operation_class=ProblemOperation)
async def list_jobs(
    services: ServicesDependency,
    kind: Annotated[Literal["verify", "reproduce"] | None, QueryParameter(description="Only this kind")] = None,
    prediction_id: Annotated[uuid.UUID | None, QueryParameter(description="Only this prediction's")] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=200)] = 20,
) -> AuditJobsPage:
    return AuditJobsPage(items=await services.audit_jobs.recent(kind=kind, subject=prediction_id, limit=limit))


AUDIT_ROUTES = [request_job, get_job, list_jobs]
