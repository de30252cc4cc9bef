"""Small helpers over PostgreSQL connection URLs (no I/O)."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

APP_ROLE = "audit_app"


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def with_user(dsn: str, user: str, password: str | None = None) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    auth = quote(user) + (":" + quote(password) if password else "")
    return urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


def database_name(dsn: str) -> str:
    return unquote(urlsplit(dsn).path.lstrip("/")) or "postgres"


def dbmate_url(dsn: str) -> str:
    """dbmate (lib/pq) spells a socket directory `socket=` where libpq spells it `host=`."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    socket_dir = query.pop("host", None)
    netloc = parts.netloc
    if socket_dir is not None:
        query["socket"] = socket_dir
        netloc = netloc.rpartition("@")[0] + "@" if "@" in netloc else ""
    query.setdefault("sslmode", "disable")
    return urlunsplit(("postgres", netloc, parts.path, urlencode(query), ""))


def redacted(dsn: str) -> str:
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    if ":" in user:
        user = user.partition(":")[0] + ":***"
    return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host))
