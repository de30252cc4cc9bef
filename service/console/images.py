"""The uploads as pictures: the original bytes for a prediction's page, and a thumbnail of a large
one for the lists, made once and kept (the `thumbnails` table). Both are immutable: the ETag is the
original's sha256."""

from __future__ import annotations

import asyncio
from uuid import UUID

import asyncpg
from litestar import Request, Response, get

from domain.thumbnails import thumbnail_if_large
from projections import queries
from service.bootstrap import ServicesDependency
from service.console.session import viewer
from service.problems import Problem
from service.routes import wait_for_projection

IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable", "X-Content-Type-Options": "nosniff",
             "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox"}


@get("/ui/input/{input_id:uuid}", include_in_schema=False)
async def input_image(request: Request, services: ServicesDependency, input_id: UUID) -> Response[bytes]:
    """The original image for an <img>."""
    viewer(request, services)
    async with services.reading() as connection:
        found = await _input(services, connection, input_id)
        content = None if found is None or found.erased else await connection.fetchval(
            "SELECT content FROM blobs WHERE sha256 = $1", bytes.fromhex(found.blob_sha256))
    if content is None:
        raise Problem(404 if found is None else 410, "input_unavailable", "no such input, or it was erased")
    return _immutable(request, f'"{found.blob_sha256}"', bytes(content), _image_type(bytes(content)))


@get("/ui/thumb/{input_id:uuid}", include_in_schema=False)
async def thumbnail_image(request: Request, services: ServicesDependency, input_id: UUID) -> Response[bytes]:
    """A large upload's thumbnail: made on its first view, then read back (never made per request)."""
    viewer(request, services)
    async with services.reading() as connection:
        found = await _input(services, connection, input_id)
        if found is None or found.erased:
            raise Problem(404 if found is None else 410, "input_unavailable", "no such input, or it was erased")
        if request.headers.get("if-none-match") == _thumb_etag(found.blob_sha256):
            return Response(b"", status_code=304, headers={"ETag": _thumb_etag(found.blob_sha256)})
        digest = bytes.fromhex(found.blob_sha256)
        kept = await connection.fetchrow("SELECT content, media_type FROM thumbnails WHERE blob_sha256 = $1", digest)
        original = None if kept else await connection.fetchval("SELECT content FROM blobs WHERE sha256 = $1", digest)
    if kept is not None:
        return _immutable(request, _thumb_etag(found.blob_sha256), bytes(kept["content"]), kept["media_type"])
    if original is None:  # erased since the read above
        raise Problem(410, "input_unavailable", "the input was erased")
    made = await asyncio.get_running_loop().run_in_executor(services.decoder, thumbnail_if_large, bytes(original))
    if made is None:  # already small: the original is its own thumbnail
        return _immutable(request, _thumb_etag(found.blob_sha256), bytes(original), _image_type(bytes(original)))
    small, media_type = made
    async with services.pool.acquire() as connection:  # the primary: a replica is read-only
        await connection.execute(
            "INSERT INTO thumbnails (blob_sha256, content, media_type) SELECT $1, $2, $3 "
            "WHERE EXISTS (SELECT 1 FROM blobs WHERE sha256 = $1) ON CONFLICT DO NOTHING", digest, small, media_type)
    return _immutable(request, _thumb_etag(found.blob_sha256), small, media_type)


async def _input(services: ServicesDependency, connection: asyncpg.Connection, input_id: UUID) -> queries.InputView | None:
    """The input, also when the page asks for it the moment its upload answered (read-your-writes)."""
    found = await queries.get_input(connection, input_id)
    if found is None:
        await wait_for_projection(connection, services.settings.read_your_writes_timeout_s)
        found = await queries.get_input(connection, input_id)
    return found


def _thumb_etag(blob_sha256: str) -> str:
    return f'"{blob_sha256}-thumb"'


def _immutable(request: Request, etag: str, content: bytes, media_type: str) -> Response[bytes]:
    if request.headers.get("if-none-match") == etag:
        return Response(b"", status_code=304, headers={"ETag": etag})
    return Response(content, media_type=media_type, headers={"ETag": etag, **IMMUTABLE})


def _image_type(content: bytes) -> str:
    for magic, kind in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                        (b"BM", "image/bmp")):
        if content.startswith(magic):
            return kind
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"  # an <img> will not render it: nothing is sniffed
