"""`python -m service`: find or start the database, migrate it, then serve with uvicorn."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal

import uvicorn

from db.dsn import redacted
from service.config import Settings
from service.database import prepare
from service.observability import configure_logging
from service.projector_process import ProjectorProcess

log = logging.getLogger("service")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _exit_after_drain(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    if not settings.api_keys and not _is_loopback(settings.host) and os.environ.get("ALLOW_UNAUTHENTICATED") != "1":
        raise SystemExit(
            f"refusing to listen on {settings.host} without API keys: set API_KEYS, "
            "or ALLOW_UNAUTHENTICATED=1 if something in front of the service authenticates"
        )
    target = asyncio.run(prepare(settings))
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


def _serve(settings: Settings) -> None:
    uvicorn.run(
        "service.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        log_config=None,  # keep our JSON logging
        access_log=False,  # the app logs failed requests itself, with their request id
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
