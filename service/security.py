"""Optional API keys with scopes: `predict` (POST), `read` (predictions, inputs, model, metrics),
`audit` (event routes), `label` (recording and withdrawing ground truth). Health and schema routes need none. Keys are parsed with the settings
(infra/settings.py), compared in constant time and never logged."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from infra.settings import ApiKey, ApiKeys
from service.problems import Problem

ACTOR = "api_key_name"  # where the guard leaves the name of the key that was presented

Guard = Callable[[ASGIConnection, BaseRouteHandler], Awaitable[None]]

def _presented_key(connection: ASGIConnection) -> str | None:
    authorization = connection.headers.get("authorization")
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return connection.headers.get("x-api-key")


def _key_of(presented: str, keys: ApiKeys) -> ApiKey | None:
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    found: ApiKey | None = None
    for known, key in keys.items():  # every key is compared: no early exit on a match
        if hmac.compare_digest(digest, known):
            found = key
    return found


def scope_guard(keys: ApiKeys) -> Guard:
    """The app-level guard, installed only when API keys are configured: a route declares the
    scope it needs in `opt["scope"]`; routes without one (health, schema) need no key."""

    async def require_route_scope(connection: ASGIConnection, route_handler: BaseRouteHandler) -> None:
        scope = route_handler.opt.get("scope")
        if scope is None:
            return
        presented = _presented_key(connection)
        if not presented:
            raise Problem(
                401, "missing_api_key", "this route needs an API key (Authorization: Bearer KEY or X-API-Key)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        key = _key_of(presented, keys)
        if key is None:
            raise Problem(401, "invalid_api_key", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        if scope not in key.scopes:
            raise Problem(403, "missing_scope", f"the API key lacks the {scope!r} scope")
        connection.scope.setdefault("state", {})[ACTOR] = key.name  # type: ignore[typeddict-item]

    return require_route_scope
