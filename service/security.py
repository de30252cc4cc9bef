"""Optional API keys with scopes: `predict` (POST), `read` (predictions, inputs, model, metrics),
`audit` (event routes). Health and schema routes need none. Keys are compared in constant time
and never logged."""

from __future__ import annotations

import hashlib
import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from service.problems import Problem

SCOPES = ("predict", "read", "audit")


def parse_api_keys(spec: str) -> dict[bytes, frozenset[str]]:
    """`key1:predict,read;key2:audit` -> {sha256(key): scopes}. Only digests are kept in memory."""
    keys: dict[bytes, frozenset[str]] = {}
    for entry in filter(None, (part.strip() for part in spec.split(";"))):
        key, _, scopes = entry.rpartition(":")
        if not key:
            raise ValueError("API_KEYS entries look like KEY:scope1,scope2")
        wanted = frozenset(s.strip() for s in scopes.split(",") if s.strip())
        unknown = wanted - set(SCOPES)
        if unknown or not wanted:
            raise ValueError(f"unknown API key scopes {sorted(unknown)}; use {SCOPES}")
        keys[hashlib.sha256(key.encode()).digest()] = wanted
    return keys


def _presented_key(connection: ASGIConnection) -> str | None:
    authorization = connection.headers.get("authorization")
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return connection.headers.get("x-api-key")


def _scopes_of(presented: str, keys: dict[bytes, frozenset[str]]) -> frozenset[str] | None:
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    found: frozenset[str] | None = None
    for known, scopes in keys.items():  # every key is compared: no early exit on a match
        if hmac.compare_digest(digest, known):
            found = scopes
    return found


async def require_route_scope(connection: ASGIConnection, route_handler: BaseRouteHandler) -> None:
    """The app-level guard, installed only when API keys are configured: a route declares the
    scope it needs in `opt["scope"]`; routes without one (health, schema) need no key."""
    scope = route_handler.opt.get("scope")
    if scope is None:
        return
    keys: dict[bytes, frozenset[str]] = connection.app.state.runtime.api_keys
    presented = _presented_key(connection)
    if not presented:
        raise Problem(
            401, "missing_api_key", "this route needs an API key (Authorization: Bearer KEY or X-API-Key)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scopes = _scopes_of(presented, keys)
    if scopes is None:
        raise Problem(401, "invalid_api_key", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    if scope not in scopes:
        raise Problem(403, "missing_scope", f"the API key lacks the {scope!r} scope")
