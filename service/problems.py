"""RFC 9457 problem details for every error the service answers, and the one place where the
errors of the layers below (domain rejections, use-case and store failures) get their status."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException

from db.store import (
    AppendError,
    DatabaseUnavailable,
    IdempotencyKeyReused,
    VersionConflict,
)
from domain.rejections import Rejected, RejectionCode
from usecases.errors import NotFound, NotReady, Overloaded

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"

TITLES = {
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
        "title": TITLES.get(status, "Error"),
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
    return TITLES.get(status, "error").lower().replace(" ", "_")


def handle_problem(request: Request, error: Problem) -> Response[dict[str, Any]]:
    return problem_response(request, error.status, error.code, error.detail, error.headers, **error.extra)


def handle_http_exception(request: Request, error: HTTPException) -> Response[dict[str, Any]]:
    status = error.status_code
    detail = error.detail or TITLES.get(status, "Error")
    extra: dict[str, Any] = {}
    if status == 400 and isinstance(error.extra, (dict, list)) and error.extra:
        extra["errors"] = error.extra  # parameter validation: say which parameter and why
    return problem_response(request, status, _http_code(status), str(detail), dict(error.headers or {}), **extra)


def handle_unexpected(request: Request, error: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(request, 500, "internal_error", "The service failed to handle this request.")


REJECTION_STATUS: dict[RejectionCode, int] = {
    "empty_upload": 422,
    "invalid_filename": 422,
    "invalid_content_type": 422,
    "invalid_idempotency_key": 400,
    "unsupported_format": 415,
    "undecodable_image": 422,
    "image_too_large": 422,
    "empty_image": 422,
    "unsupported_mode": 422,
    "invalid_label": 422,
    "invalid_label_source": 422,
    "invalid_label_note": 422,
    "invalid_withdraw_reason": 422,
    "no_current_label": 409,
    "invalid_labels_body": 400,
    "invalid_label_item": 400,
    "too_many_label_items": 413,
}
# Codes a use case reports as NotFound (a bulk item answers with them too).
NOT_FOUND_CODES = ("prediction_not_found", "model_not_found")


def status_of(code: str) -> int:
    """The status a problem code answers, for answers that carry several (a bulk request's items)."""
    if code in NOT_FOUND_CODES:
        return 404
    return REJECTION_STATUS.get(code, 422)  # type: ignore[call-overload]
RETRY_AFTER = {"Retry-After": "1"}


def handle_rejected(request: Request, error: Rejected) -> Response[dict[str, Any]]:
    return problem_response(request, REJECTION_STATUS[error.code], error.code, error.message)


def handle_not_ready(request: Request, error: NotReady) -> Response[dict[str, Any]]:
    return problem_response(request, 503, "warming_up", str(error), RETRY_AFTER)


def handle_overloaded(request: Request, error: Overloaded) -> Response[dict[str, Any]]:
    return problem_response(request, 503, "overloaded", str(error), {"Retry-After": str(error.retry_after_s)})


def handle_database_unavailable(request: Request, error: DatabaseUnavailable) -> Response[dict[str, Any]]:
    return problem_response(request, 503, "database_unavailable", str(error), RETRY_AFTER)


def handle_not_found(request: Request, error: NotFound) -> Response[dict[str, Any]]:
    return problem_response(request, 404, error.code, str(error))


def handle_append_error(request: Request, error: AppendError) -> Response[dict[str, Any]]:
    if isinstance(error, IdempotencyKeyReused):
        return problem_response(
            request, 422, "idempotency_key_reused", "this Idempotency-Key was already used for a different upload"
        )
    if isinstance(error, VersionConflict):  # a fresh uuid4 stream: only a bug gets here
        return problem_response(request, 409, "stream_conflict", str(error))
    return problem_response(request, 422, "not_storable", str(error))


EXCEPTION_HANDLERS = {
    Problem: handle_problem,
    Rejected: handle_rejected,
    NotReady: handle_not_ready,
    Overloaded: handle_overloaded,
    NotFound: handle_not_found,
    DatabaseUnavailable: handle_database_unavailable,
    AppendError: handle_append_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
