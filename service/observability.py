"""Request ids and per-route metrics, in one thin ASGI middleware (log lines are formatted by
infra/logs.py, which reads the request id this sets)."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Any

from litestar.types import Message, Receive, Scope, Send

from infra.logs import request_id_var
from service.metrics import Metrics

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class Observed:
    """Wraps the whole app (so unrouted 404s are counted and carry a request id too): request id
    in, request id out, per-route metrics, an access log line for errors."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.log = logging.getLogger("service.access")

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _CLIENT_REQUEST_ID.match(incoming) else _new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        request_id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), request_id_header]  # type: ignore[typeddict-unknown-key]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("path_template") or "unmatched"  # set by Litestar's router
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(elapsed)
            self.metrics.recent.observe(route, status, elapsed)
            if status >= 500 or self.log.isEnabledFor(logging.DEBUG):
                self.log.info(
                    "%s %s %d", method, route, status,
                    extra={"method": method, "route": route, "status": status,
                           "duration_ms": round(elapsed * 1000, 3)},
                )
            request_id_var.reset(token)


# Request ids correlate log lines; they need to be unique, not secret: a per-process random tag
# and a counter cost no system call (uuid4 per request was measurable under load).
_PROCESS_TAG = os.urandom(4).hex()
_request_counter = itertools.count(1)


def _new_request_id() -> str:
    return f"{_PROCESS_TAG}{next(_request_counter):012x}"


_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
