"""Upload from the browser: drop one or many images; each is sent on its own (console.js) through
the same use case and answer as POST /prediction/, and its result shows as it returns."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Redirect, Template

from service.bootstrap import ServicesDependency
from service.console.session import check_csrf, page, viewer
from service.routes import predict_and_answer
from service.uploads import parse_upload, read_body

CSRF_HEADER = "x-csrf-token"  # how console.js sends the token; a plain form sends it as a field


@get("/ui/upload", include_in_schema=False)
async def upload_page(request: Request, services: ServicesDependency) -> Template:
    who = viewer(request, services, "predict")
    return page("upload.html", request, who, max_bytes=services.settings.max_upload_bytes)


@post("/ui/upload", include_in_schema=False)
async def upload(request: Request, services: ServicesDependency) -> Response[Any]:
    """One image: the API's answer (JSON, or a problem) for the page's script; without script,
    the form's post goes on to the new prediction's page."""
    who = viewer(request, services, "predict")
    settings = services.settings
    body = await read_body(request, limit=settings.max_upload_bytes, deadline_s=settings.body_read_timeout_s)
    form = {"csrf": ""}
    image = parse_upload(request, body, form=form)
    scripted = request.headers.get(CSRF_HEADER)
    check_csrf(request, {"csrf": scripted if scripted is not None else form["csrf"]})
    answer = await predict_and_answer(request, services, image, None, via="console", actor=who.name)
    if scripted is None:
        return Redirect(f"/ui/prediction/{answer.content.prediction_id}", status_code=303)
    return answer
