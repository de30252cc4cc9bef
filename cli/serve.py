"""`just serve`: find or start the database, migrate it, then serve with uvicorn; with
`PROJECTIONS=process` the projection worker runs as a supervised child process."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal

import uvicorn

from cli.supervisor import ProjectorProcess
from db.dsn import redacted
from infra.database import provision_database
from infra.logs import configure_json_logging
from infra.settings import Settings, SettingsError
from service.http_protocol import DeadlineHttpProtocol

log = logging.getLogger("service")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _exit_after_drain(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def check_exposure(settings: Settings) -> None:
    """Refuse to listen beyond loopback without API keys, unless told something in front
    authenticates."""
    if not settings.api_keys and not _is_loopback(settings.host) and not settings.allow_unauthenticated:
        raise SystemExit(
            f"refusing to listen on {settings.host} without API keys: set API_KEYS, "
            "or ALLOW_UNAUTHENTICATED=1 if something in front of the service authenticates"
        )


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="just serve",
        description="Serve the API on HOST:PORT; every setting comes from the environment (README, Settings).",
    ).parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as error:
        raise SystemExit(f"refusing to start: {error}") from None
    configure_json_logging(settings.log_level)
    check_exposure(settings)
    target = asyncio.run(provision_database(settings))
    log.info("database %s migrated; the service connects as %s", redacted(target.owner_dsn), redacted(target.app_dsn))
    # Worker processes read their database from the environment (the embedded server stays owned
    # by this process and stops with it).
    os.environ["DATABASE_URL"] = target.owner_dsn
    os.environ["APP_DATABASE_URL"] = target.app_dsn
    # uvicorn drains on SIGTERM, then re-raises it under the handler that was installed before it
    # started: exit through SystemExit, so atexit runs and stops the embedded PostgreSQL too.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    projector = ProjectorProcess() if settings.projections == "process" else None
    if projector is not None:
        projector.start()
    try:
        _serve(settings)
    finally:
        # After uvicorn has drained: the worker applies what was committed, then stops; only
        # then may atexit stop an embedded PostgreSQL.
        if projector is not None:
            projector.stop()
    return 0


def _serve(settings: Settings) -> None:
    uvicorn.run(
        "service.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http=DeadlineHttpProtocol,  # httptools, with a header deadline and problem+json 400s
        log_level=settings.log_level.lower(),
        log_config=None,  # keep our JSON logging
        access_log=False,  # the app logs failed requests itself, with their request id
        timeout_graceful_shutdown=30,
    )
