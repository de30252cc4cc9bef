"""Who is looking at the console, and the page and form rules every console route follows.

With API keys configured, a key is asked once (the login form) and kept as a session cookie
(HttpOnly, SameSite=Strict, Secure behind TLS): the cookie is `<key digest>.<expiry>.<HMAC>`,
keyed by a secret derived from the configured keys, so every node with the same API_KEYS accepts
it and removing a key ends its sessions. Every form carries a CSRF token (a double-submit cookie).
Pages are sent with a Content-Security-Policy that allows no inline script; Jinja2 escapes every
value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path
from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.enums import RequestEncodingType
from litestar.params import Body
from litestar.response import Redirect, Template

from infra.settings import ApiKey, ApiKeys
from service.bootstrap import ServicesDependency
from service.problems import Problem

HERE = Path(__file__).parent.parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
SESSION = "console_session"
CSRF = "console_csrf"
SESSION_S = 8 * 3600
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-store"}


class LoginRequired(Exception):
    """No valid session: the console answers with its login page."""


class Viewer:
    """Who is looking: the key's name and scopes (everything when no keys are configured)."""

    def __init__(self, name: str | None, scopes: frozenset[str], session: str | None) -> None:
        self.name, self.scopes, self.session = name, scopes, session

    def can(self, scope: str) -> bool:
        return scope in self.scopes


def _secret(keys: ApiKeys) -> bytes:
    return hashlib.sha256(b"console-session\n" + b"".join(sorted(keys))).digest()


def _sign(keys: ApiKeys, text: str) -> str:
    return base64.urlsafe_b64encode(hmac.new(_secret(keys), text.encode(), hashlib.sha256).digest()).decode().rstrip("=")


def _session_for(keys: ApiKeys, digest: bytes) -> str:
    text = f"{digest.hex()}.{int(time.time()) + SESSION_S}"
    return f"{text}.{_sign(keys, text)}"


def _key_of_session(keys: ApiKeys, value: str | None) -> ApiKey | None:
    if not value or value.count(".") != 2:
        return None
    digest_hex, expires, signature = value.split(".")
    # Bytes, not str: compare_digest refuses non-ASCII str, and a cookie is the client's to choose.
    expected = _sign(keys, f"{digest_hex}.{expires}").encode()
    if not hmac.compare_digest(signature.encode("utf-8", "surrogateescape"), expected):
        return None
    if not re.fullmatch(r"[0-9]{1,12}", expires) or int(expires) < time.time():
        return None
    try:
        return keys.get(bytes.fromhex(digest_hex))
    except ValueError:
        return None


def viewer(request: Request, services: ServicesDependency, scope: str = "read") -> Viewer:
    """The console's guard: no keys, everyone; else a valid session with `scope`, or the login."""
    keys = services.settings.api_keys
    if not keys:
        return Viewer(None, frozenset({"predict", "read", "audit", "label"}), None)
    session = request.cookies.get(SESSION)
    key = _key_of_session(keys, session)
    if key is None:
        raise LoginRequired
    if scope not in key.scopes:
        raise Problem(403, "missing_scope", f"the API key lacks the {scope!r} scope")
    return Viewer(key.name, key.scopes, session)


def page(name: str, request: Request, who: Viewer | None, **context: Any) -> Template:
    """A page, with the CSRF token its forms carry: a random value also set as an HttpOnly,
    SameSite=Strict cookie, which a cross-site form post never carries (double submit)."""
    token = request.cookies.get(CSRF) or secrets.token_urlsafe(24)
    response = Template(template_name=name, context={"who": who, "csrf": token, "path": request.url.path, **context},
                        headers=PAGE_HEADERS)
    if request.cookies.get(CSRF) != token:
        response.cookies.append(Cookie(key=CSRF, value=token, httponly=True, samesite="strict", path="/",
                                       secure=request.url.scheme == "https"))
    return response


def check_csrf(request: Request, form: dict[str, str]) -> None:
    expected = request.cookies.get(CSRF)
    given = form.get("csrf", "").encode("utf-8", "surrogateescape")
    if not expected or not hmac.compare_digest(expected.encode("utf-8", "surrogateescape"), given):
        raise Problem(403, "csrf", "the form is stale or was not sent by this site; reload the page")


@get("/", include_in_schema=False)
async def root() -> Redirect:
    return Redirect("/ui/")


@get("/favicon.ico", include_in_schema=False, status_code=204)
async def favicon() -> None:
    """Browsers ask for it on any page, JSON answers included: nothing, rather than a 404 each time."""


# ---- login ---------------------------------------------------------------------------------------


@get("/ui/login", include_in_schema=False)
async def login_form(request: Request, error: str | None = None) -> Template:
    return page("login.html", request, None, error=error)


@post("/ui/login", include_in_schema=False, status_code=303)
async def login(request: Request, services: ServicesDependency,
                data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]) -> Response[Any]:
    check_csrf(request, data)
    keys = services.settings.api_keys
    digest = hashlib.sha256(data.get("key", "").strip().encode("utf-8", "surrogateescape")).digest()
    if not keys or keys.get(digest) is None:
        return Redirect("/ui/login?error=1")
    response = Redirect("/ui/")
    response.cookies.append(Cookie(key=SESSION, value=_session_for(keys, digest), httponly=True, samesite="strict",
                                   path="/", secure=request.url.scheme == "https", max_age=SESSION_S))
    return response


@post("/ui/logout", include_in_schema=False, status_code=303)
async def logout(request: Request, services: ServicesDependency,
                 data: Annotated[dict[str, str], Body(media_type=RequestEncodingType.URL_ENCODED)]) -> Response[Any]:
    check_csrf(request, data)
    response = Redirect("/ui/login")
    response.cookies.append(Cookie(key=SESSION, value="", max_age=0, path="/", httponly=True, samesite="strict"))
    return response



def to_login(request: Request, _: LoginRequired) -> Response[Any]:
    return Redirect("/ui/login", status_code=303)
