"""RFC 9457 problem details for every error the service answers."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    413: "Upload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):
    """An error the service answers on purpose, with a stable `type` slug."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail
        self.headers = headers or {}
        self.extra = extra


def problem_response(
    request: Request, status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {
        "type": f"urn:problem:{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    request_id = request.scope.get("state", {}).get("request_id")
    if request_id:
        body["request_id"] = request_id
    body.update(extra)
    return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers or {})


def _http_code(status: int) -> str:
    return _TITLES.get(status, "error").lower().replace(" ", "_")


def handle_problem(request: Request, error: Problem) -> Response[dict[str, Any]]:
    return problem_response(request, error.status, error.code, error.detail, error.headers, **error.extra)


def handle_http_exception(request: Request, error: HTTPException) -> Response[dict[str, Any]]:
    status = error.status_code
    detail = error.detail or _TITLES.get(status, "Error")
    extra: dict[str, Any] = {}
    if status == 400 and isinstance(error.extra, (dict, list)) and error.extra:
        extra["errors"] = error.extra  # parameter validation: say which parameter and why
    return problem_response(request, status, _http_code(status), str(detail), dict(error.headers or {}), **extra)


def handle_unexpected(request: Request, error: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(request, 500, "internal_error", "The service failed to handle this request.")


EXCEPTION_HANDLERS = {
    Problem: handle_problem,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
