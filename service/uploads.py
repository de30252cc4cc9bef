"""Reading an upload off the wire: a size limit, a deadline, and multipart or a raw body.

uvicorn has no read timeout for bodies, so the deadline is ours. The whole body is held in memory
(bounded by the upload limit): it is stored byte for byte anyway, and parsing multipart from
memory avoids Litestar's spooled temporary file per upload.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

from litestar import Request
from litestar._multipart import parse_content_header
from multipart import (  # type: ignore[import-untyped]
    MultipartError,
    MultipartSegment,
    ParserLimitReached,
    PushMultipartParser,
)

from domain.uploads import Upload
from service.problems import Problem

FILE_FIELD = "file"
MAX_PARTS = 16
MAX_PART_HEADERS = 8
MAX_TEXT_FIELD = 256  # bytes of a form's text field that `parse_upload(form=...)` keeps


async def read_body(request: Request, *, limit: int, deadline_s: float) -> bytes:
    """The whole body, or a Problem: 413 over `limit`, 408 past the deadline, 400 when the client
    went away before it arrived (nothing is stored either way)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise Problem(400, "bad_content_length", "Content-Length is not a number") from None
    chunks: list[bytes] = []
    received = 0
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise Problem(400, "client_disconnected", "the client went away before the body arrived")
                body = message.get("body", b"")
                if body:
                    received += len(body)
                    if received > limit:
                        raise _too_large(limit)
                    chunks.append(body)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise Problem(
            408, "body_timeout", f"the request body did not arrive within {deadline_s:g} s",
            headers={"Connection": "close"},
        ) from None
    return b"".join(chunks)


def _too_large(limit: int) -> Problem:
    return Problem(413, "upload_too_large", f"uploads are limited to {limit} bytes", max_bytes=limit)


def parse_upload(request: Request, body: bytes, filename: str | None = None, *,
                 form: dict[str, str] | None = None) -> Upload:
    """A multipart form with a `file` field, or the image itself as the body (named by the
    `filename` query parameter or the X-Filename header). With `form`, the multipart form's short
    text fields named by its keys are put there (the console's CSRF token)."""
    media_type, options = parse_content_header(request.headers.get("content-type", ""))
    if media_type == "multipart/form-data":
        return _from_multipart(body, options.get("boundary"), form)
    if media_type in ("application/x-www-form-urlencoded", "text/plain", "application/json"):
        raise Problem(
            415, "unsupported_media_type",
            "send the image as multipart/form-data (field `file`) or as the raw body with its image type",
        )
    if filename is None and (header := request.headers.get("x-filename")) is not None:
        try:  # headers are Latin-1 on the wire: X-Filename carries percent-encoded UTF-8
            filename = unquote(header, errors="strict")
        except UnicodeDecodeError:
            raise Problem(400, "bad_filename_header", "X-Filename must be percent-encoded UTF-8") from None
    return Upload(content=body, filename=filename, content_type=media_type or None)


def _from_multipart(body: bytes, boundary: str | None, form: dict[str, str] | None = None) -> Upload:
    if not boundary:
        raise Problem(400, "bad_multipart", "multipart/form-data needs a boundary")
    try:
        parser = PushMultipartParser(
            boundary.encode(), max_header_count=MAX_PART_HEADERS, max_segment_count=MAX_PARTS, strict=False
        )
        segment: MultipartSegment | None = None
        found: tuple[MultipartSegment, bytearray] | None = None
        current = bytearray()
        for event in parser.parse(body):
            if isinstance(event, MultipartSegment):
                segment, current = event, bytearray()
            elif event is None:
                if segment is not None and segment.name == FILE_FIELD and found is None:
                    found = (segment, current)
                elif segment is not None and form is not None and segment.name in form and len(current) <= MAX_TEXT_FIELD:
                    form[segment.name] = current.decode("utf-8", "replace")
                segment = None
            elif segment is not None and ((segment.name == FILE_FIELD and found is None)
                                          or (form is not None and segment.name in form)):
                current += event
        parser.close()
    except ParserLimitReached as error:
        raise Problem(
            400, "multipart_limit",
            f"the multipart body exceeds a limit ({MAX_PARTS} parts, {MAX_PART_HEADERS} headers per part): {error}",
        ) from None
    except MultipartError as error:
        raise Problem(400, "bad_multipart", f"the multipart body is malformed: {error}") from None
    if found is None:
        raise Problem(422, "missing_file", f"the multipart form has no `{FILE_FIELD}` field")
    segment, content = found
    return Upload(content=bytes(content), filename=segment.filename, content_type=segment.content_type)
