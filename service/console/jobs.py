"""The console's buttons for audit work on the server: verify the whole log (the log page) and
reproduce one prediction (its page). Each files an audit job (usecases/audit_jobs.py) and shows it
in a fragment that htmx polls until the verdict is in; without script the form posts and the page
shows the job after a redirect."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from litestar import Request, Response, get, post
from litestar.enums import RequestEncodingType
from litestar.params import Body, Parameter
from litestar.response import Redirect, Template

from service.bootstrap import ServicesDependency
from service.console.session import Viewer, check_csrf, page, viewer
from usecases.errors import Overloaded

Slot = Literal["verify-job", "reproduce-job"]
Form = Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]


@post("/ui/log/verify", include_in_schema=False, status_code=303)
async def verify_now(request: Request, services: ServicesDependency, data: Form) -> Response[Any]:
    who = viewer(request, services, "audit")
    check_csrf(request, data)
    return await _file(request, services, who, "verify", None, back="/ui/log", slot="verify-job")


@post("/ui/prediction/{prediction_id:uuid}/reproduce", include_in_schema=False, status_code=303)
async def reproduce_now(request: Request, services: ServicesDependency, prediction_id: UUID, data: Form) -> Response[Any]:
    who = viewer(request, services, "audit")
    check_csrf(request, data)
    return await _file(request, services, who, "reproduce", prediction_id, back=f"/ui/prediction/{prediction_id}",
                       slot="reproduce-job")


async def _file(request: Request, services: ServicesDependency, who: Viewer, kind: Literal["verify", "reproduce"],
                prediction_id: UUID | None, *, back: str, slot: Slot) -> Response[Any]:
    try:
        job, _ = await services.audit_jobs.request(kind, prediction_id, who.name)
        refused = None
    except Overloaded as full:
        job, refused = None, str(full)
    if request.headers.get("hx-request") != "true":
        return Redirect(back, status_code=303)  # the page shows the newest job, this one
    return page("job.html", request, who, job=job, slot=slot, refused=refused)


@get("/ui/jobs/{job_id:int}", include_in_schema=False)
async def job_fragment(request: Request, services: ServicesDependency, job_id: int,
                       slot: Annotated[Slot, Parameter(required=False)] = "verify-job") -> Template:
    """One job's state, for htmx to poll until it has a verdict."""
    who = viewer(request, services, "audit")
    return page("job.html", request, who, job=await services.audit_jobs.get(job_id), slot=slot, refused=None)
