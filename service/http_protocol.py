"""uvicorn's httptools protocol with two things it lacks: a deadline for the request line and
headers, and problem+json for the errors it answers itself.

uvicorn has no read timeout: a client that sends its headers one byte at a time holds a
connection (and its memory) for as long as it likes. Here a request's line and headers must
arrive within `HEADER_READ_TIMEOUT_S` of the connection opening (or of the request's first byte on
a kept-alive connection); otherwise it answers 408 and closes. The body has its own deadline in
the app (`BODY_READ_TIMEOUT_S`, service/uploads.py). Unparseable requests answer 400 as
`application/problem+json` instead of uvicorn's text/plain.
"""

from __future__ import annotations

import asyncio
import functools
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from infra.settings import Settings


@functools.cache
def _header_timeout_s() -> float:
    # uvicorn builds the protocol itself (in every worker process), so it reads its one setting
    # from the same place as everything else, once per process.
    return Settings.from_env().header_read_timeout_s


def _problem(status: int, reason: str, code: str, detail: str) -> bytes:
    body = json.dumps(
        {"type": f"urn:problem:{code}", "title": reason, "status": status, "detail": detail}
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/problem+json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


_BAD_REQUEST = _problem(400, "Bad Request", "bad_request", "the request is not valid HTTP/1.1")


class DeadlineHttpProtocol(HttpToolsProtocol):
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        self._disarm_header_deadline()
        self.transport.write(_BAD_REQUEST)
        self.transport.close()

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(_header_timeout_s(), self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # nothing of ours is being written
            timeout = _header_timeout_s()
            self.transport.write(_problem(
                408, "Request Timeout", "header_timeout",
                f"the request line and headers did not arrive within {timeout:g} s",
            ))
        self.transport.close()
