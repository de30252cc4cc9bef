"""`just project`: the projection worker as its own process (several may run; one is active).

It connects as the service's own role. SIGTERM or SIGINT drains the batch in hand; with
`--exit-with-parent PID` (how `just serve` starts it) it also stops once that process is gone,
even after a SIGKILL that gave the service no chance to stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

import uvloop

from db.dsn import redacted
from infra.database import provision_database
from infra.logs import configure_json_logging
from infra.settings import Settings
from projections.process import ProjectionWorker
from projections.read_model import READ_MODEL

log = logging.getLogger("projections")


async def run(settings: Settings, exit_with_parent: int | None) -> int:
    target = await provision_database(settings)
    log.info("projection worker for %s on %s", READ_MODEL, redacted(target.app_dsn))
    worker = await ProjectionWorker.start(target.app_dsn, settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    orphan_watch = asyncio.create_task(_stop_when_orphaned(exit_with_parent, stopping))
    await stopping.wait()
    orphan_watch.cancel()
    log.info("stopping: draining the batch in hand")
    await worker.stop()
    log.info("stopped at position %s", worker.runner.position)
    return 0


async def _stop_when_orphaned(parent_pid: int | None, stopping: asyncio.Event) -> None:
    if parent_pid is None:
        return
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    log.warning("the service (pid %d) is gone; stopping", parent_pid)
    stopping.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just project", description=__doc__.splitlines()[0])
    parser.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                        help="stop when process PID (the service that started this worker) is gone")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_json_logging(settings.log_level)  # JSON lines, like the service it may run beside
    return uvloop.run(run(settings, args.exit_with_parent))
