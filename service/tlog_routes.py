"""HTTP routes of the transparency log, in the formats its ecosystem reads: the latest C2SP
checkpoint and the verifier keys (text), C2SP tlog-tiles (binary), and RFC 9162 proofs as JSON for
people without a tlog library.

Checkpoints, keys, hash tiles and proofs hold only hashes and are public (a witness or a customer
holding a receipt needs no API key); entry bundles hold the events themselves and need `audit`,
like the event feed.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Response, get
from litestar.params import QueryParameter
from litestar.types import ASGIApp, Receive, Scope, Send

from domain.chain import from_microseconds
from domain.merkle import HASH_SIZE, TILE_WIDTH, entry_bundle, parse_tile_path
from projections import tree_store
from service.bootstrap import ServicesDependency
from service.checkpoint_wait import b64
from service.openapi import ProblemOperation, problem_spec
from service.problems import Problem
from service.routes import MAX_BIGINT

IMMUTABLE = "public, max-age=31536000, immutable"
NOTE_TYPE = "text/plain"  # Litestar adds "; charset=utf-8"
BINARY = "application/octet-stream"


class InclusionProof(msgspec.Struct, frozen=True):
    position: int
    leaf_index: int
    tree_size: int
    leaf_hash: str
    proof: list[str]
    root_hash: str
    checkpoint: str | None  # the signed note of this tree size, when one was signed at it


class ConsistencyProof(msgspec.Struct, frozen=True):
    first: int
    second: int
    proof: list[str]
    first_root: str
    second_root: str


class CheckpointEntry(msgspec.Struct, frozen=True):
    tree_size: int
    root_hash: str
    chain_head: str  # hex, as the chain's hashes are everywhere else
    signed_at: datetime
    note: str


class _FullTiles:
    """Full tiles and bundles never change: kept in memory once read (an LRU bounded in bytes), so
    serving a hot one is a dictionary lookup instead of a query."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, path: str) -> bytes | None:
        found = self._items.get(path)
        if found is not None:
            self._items.move_to_end(path)
        return found

    def put(self, path: str, content: bytes) -> None:
        if path in self._items or len(content) > self._max_bytes // 16:
            return
        self._items[path] = content
        self._bytes += len(content)
        while self._bytes > self._max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)


_full_tiles = _FullTiles(64 * 1024 * 1024)


async def _latest(connection) -> tree_store.StoredCheckpoint:
    latest = await tree_store.latest_checkpoint(connection)
    if latest is None:
        raise Problem(404, "no_checkpoint", "no checkpoint has been signed yet (the tree integrator signs within seconds)")
    return latest


@get("/checkpoint", summary="The latest signed checkpoint (C2SP tlog-checkpoint signed note)", tags=["log"],
     media_type=NOTE_TYPE, operation_class=ProblemOperation, responses={404: problem_spec("No checkpoint signed yet")})
async def latest_checkpoint(services: ServicesDependency) -> Response[str]:
    async with services.reading() as connection:
        latest = await _latest(connection)
    return Response(latest.note, media_type=NOTE_TYPE, headers={"Cache-Control": "no-cache"})


@get("/checkpoint/key", summary="The verifier key of the current signing key (signed-note form)", tags=["log"],
     media_type=NOTE_TYPE, operation_class=ProblemOperation, responses={404: problem_spec("No key has signed yet")})
async def checkpoint_key(services: ServicesDependency) -> Response[str]:
    async with services.reading() as connection:
        keys = await tree_store.published_keys(connection)
    if not keys:
        raise Problem(404, "no_checkpoint", "no checkpoint has been signed yet")
    return Response(keys[0] + "\n", media_type=NOTE_TYPE, headers={"Cache-Control": "no-cache"})


@get("/checkpoint/keys", summary="Every verifier key that ever signed a checkpoint here, newest first", tags=["log"],
     media_type=NOTE_TYPE, operation_class=ProblemOperation)
async def checkpoint_keys(services: ServicesDependency) -> Response[str]:
    async with services.reading() as connection:
        keys = await tree_store.published_keys(connection)
    return Response("".join(key + "\n" for key in keys), media_type=NOTE_TYPE, headers={"Cache-Control": "no-cache"})


@get("/checkpoints", summary="Signed checkpoints, newest first", tags=["log"], operation_class=ProblemOperation,
     responses={400: problem_spec("A malformed limit or tree size")})
async def checkpoint_history(
    services: ServicesDependency,
    limit: Annotated[int, QueryParameter(ge=1, le=1000, description="At most this many")] = 50,
    before: Annotated[int | None, QueryParameter(ge=0, le=MAX_BIGINT, description="Tree sizes below this")] = None,
) -> list[CheckpointEntry]:
    async with services.reading() as connection:
        found = await tree_store.recent_checkpoints(connection, limit, before=before)
    return [
        CheckpointEntry(c.tree_size, b64(c.root_hash), c.chain_head.hex(), from_microseconds(c.signed_at_us), c.note)
        for c in found
    ]


async def _tree_size(connection, requested: int | None) -> tuple[int, str | None]:
    """The tree size to prove against (default: the latest checkpoint's) and its note, if signed."""
    if requested is None:
        latest = await _latest(connection)
        return latest.tree_size, latest.note
    integrated = (await tree_store.tree_state(connection)).size
    if requested > integrated:
        raise Problem(404, "tree_too_small", f"the tree has {integrated} leaves so far, not {requested}")
    note = await connection.fetchval("SELECT note FROM tlog_checkpoints WHERE tree_size = $1", requested)
    return requested, note


@get(
    "/events/{position:int}/inclusion",
    summary="RFC 9162 inclusion proof of the event at a position (leaf position - 1)",
    tags=["log"],
    operation_class=ProblemOperation,
    responses={404: problem_spec("The tree does not hold that leaf yet"), 400: problem_spec("Out of range")},
)
async def inclusion_proof(
    services: ServicesDependency,
    position: int,
    tree_size: Annotated[int | None, QueryParameter(ge=1, le=MAX_BIGINT, description="Default: the latest checkpoint's")] = None,
) -> InclusionProof:
    if not 1 <= position <= MAX_BIGINT:
        raise Problem(400, "bad_parameter", "a position is 1 or more")
    async with services.reading() as connection:
        size, note = await _tree_size(connection, tree_size)
        if position > size:
            if tree_size is not None:
                raise Problem(400, "bad_parameter", f"position {position} is not in a tree of {size} leaves")
            raise Problem(404, "not_yet_checkpointed",
                          f"position {position} is not in the latest checkpoint ({size} leaves) yet")
        proof = await tree_store.inclusion(connection, position - 1, size)
    return InclusionProof(position, position - 1, size, b64(proof.leaf_hash), [b64(p) for p in proof.proof],
                          b64(proof.root_hash), note)


@get(
    "/log/consistency",
    summary="RFC 9162 consistency proof between two tree sizes",
    tags=["log"],
    operation_class=ProblemOperation,
    responses={404: problem_spec("The tree is not that large yet"), 400: problem_spec("first > second")},
)
async def consistency_proof(
    services: ServicesDependency,
    first: Annotated[int, QueryParameter(ge=1, le=MAX_BIGINT, description="The older tree size")],
    second: Annotated[int | None, QueryParameter(ge=1, le=MAX_BIGINT, description="Default: the latest checkpoint's")] = None,
) -> ConsistencyProof:
    async with services.reading() as connection:
        size, _ = await _tree_size(connection, second)
        if first > size:
            raise Problem(400, "bad_parameter", f"first ({first}) is larger than second ({size})")
        proof = await tree_store.consistency(connection, first, size)
    return ConsistencyProof(first, size, [b64(p) for p in proof.proof], b64(proof.first_root), b64(proof.second_root))


def _tile_path(rest: str) -> tuple[int | str, int, int | None]:
    try:
        return parse_tile_path("tile/" + rest.lstrip("/"))
    except ValueError as error:
        raise Problem(404, "no_such_tile", str(error)) from None


def _binary(content: bytes, full: bool) -> Response[bytes]:
    return Response(content, media_type=BINARY,
                    headers={"Cache-Control": IMMUTABLE if full else "no-cache"})


@get("/tile/{rest:path}", summary="C2SP tlog-tiles: hash tiles (public) and entry bundles (audit scope)",
     tags=["log"], media_type=BINARY, operation_class=ProblemOperation, responses={404: problem_spec("No such tile (yet)")})
async def tile(services: ServicesDependency, rest: str) -> Response[bytes]:
    level, index, width = _tile_path(rest)
    if level == "entries":
        raise Problem(404, "no_such_tile", "entry bundles are served at /tile/entries/…")
    path = "tile/" + rest.lstrip("/")
    if width is None and (cached := _full_tiles.get(path)) is not None:
        return _binary(cached, True)
    async with services.reading() as connection:
        hashes = await tree_store.read_tile(connection, level, index)
    wanted = (width or TILE_WIDTH) * HASH_SIZE
    if hashes is None or len(hashes) < wanted:
        have = 0 if hashes is None else len(hashes) // HASH_SIZE
        raise Problem(404, "no_such_tile", f"tile {level}/{index} holds {have} hashes so far")
    if width is None:
        _full_tiles.put(path, hashes)
    return _binary(hashes[:wanted], width is None)


@get("/tile/entries/{rest:path}", summary="C2SP tlog-tiles entry bundle: the events' canonical bytes",
     tags=["log"], opt={"scope": "audit"}, media_type=BINARY, operation_class=ProblemOperation,
     responses={404: problem_spec("No such bundle (yet)")})
async def entries(services: ServicesDependency, rest: str) -> Response[bytes]:
    _, index, width = _tile_path("entries/" + rest.lstrip("/"))
    key = "tile/entries/" + rest.lstrip("/")
    if width is None and (cached := _full_tiles.get(key)) is not None:
        return _binary(cached, True)
    count = width or TILE_WIDTH
    async with services.reading() as connection:
        integrated = (await tree_store.tree_state(connection)).size
        if index * TILE_WIDTH + count > integrated:
            raise Problem(404, "no_such_tile", f"the tree has {integrated} leaves so far")
        bundle = entry_bundle(await tree_store.entries(connection, index, count))
    if width is None:
        _full_tiles.put(key, bundle)
    return _binary(bundle, width is None)


class CachedTiles:
    """Answers a GET of a full hash tile already in memory before the framework sees it: such a
    tile is public and never changes, and at thousands of requests a second the routing,
    dependency injection and response building cost more than the answer. Everything else
    (entry bundles, which need a scope check, partial tiles, misses) goes to the app."""

    ROUTE = "/tile/{rest:path}"

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @property
    def state(self) -> object:
        return self.app.state  # type: ignore[attr-defined]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (scope["type"] == "http" and scope["method"] == "GET" and path.startswith("/tile/")
                and not path.startswith("/tile/entries/")
                and (content := _full_tiles.get(path[1:])) is not None):
            scope["path_template"] = self.ROUTE  # for the per-route metrics
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", BINARY.encode()), (b"cache-control", IMMUTABLE.encode()),
                (b"content-length", str(len(content)).encode()),
            ]})
            await send({"type": "http.response.body", "body": content})
            return
        await self.app(scope, receive, send)


TLOG_ROUTES = [latest_checkpoint, checkpoint_key, checkpoint_keys, checkpoint_history, inclusion_proof,
               consistency_proof, tile, entries]

