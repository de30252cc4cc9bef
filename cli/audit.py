"""The auditors' and operators' commands over the log: `just rebuild`, `just verify`, `just replay`.

They connect with the owner URL (DATABASE_URL, or the embedded server, started if need be).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import uvloop

from infra.database import provision_database, start_or_locate_database
from infra.logs import configure_console_logging
from infra.settings import Settings
from projections.audit_checks import (
    load_receipt,
    original_bytes,
    receipt,
    transparency_log,
)
from projections.checkpoints import load_key, retired_keys
from projections.rebuild import RebuildError, rebuild
from projections.replay import replay
from projections.verify import verify
from usecases.audit_jobs import file_verdict


async def run_rebuild(settings: Settings, args: argparse.Namespace) -> int:
    target = await provision_database(settings)
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
    target = start_or_locate_database(settings)
    notes: list[str] = []
    keys = [*retired_keys(settings.checkpoint_key), load_key(settings.checkpoint_key)] if settings.checkpoint_key.exists() else []
    checks = [
        transparency_log(settings.checkpoint_dir, keys, args.key, settings.log_origin, notes),
        original_bytes(notes),
    ]
    if args.receipt is not None:
        try:
            checks.append(receipt(load_receipt(args.receipt), notes))
        except (OSError, ValueError) as error:  # msgspec's errors are ValueErrors
            print(f"verify: cannot read the receipt {args.receipt}: {error}", file=sys.stderr)
            return 2
    started_at = datetime.now(timezone.utc)
    report = await verify(target.owner_dsn, outside_checks=checks)
    print(report.describe())
    for note in notes:
        print(note)
    verdict = (f"OK: {report.events:,} events up to position {report.head_position}, the read tables match a replay"
               if report.ok else f"FAILED: {report.problem}")
    try:  # the console's "last verification" is whichever ran last, by hand or on request
        await file_verdict(target.owner_dsn, args.job, "verify", None, ok=report.ok, verdict=verdict,
                           report={"verify": report, "notes": notes}, started_at=started_at)
    except (OSError, asyncpg.PostgresError) as error:
        print(f"verify: the result could not be recorded in audit_jobs: {error}", file=sys.stderr)
        return 1
    return 0 if report.ok else 1


async def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    target = start_or_locate_database(settings)
    connection = await asyncpg.connect(target.owner_dsn)
    out = sys.stdout.buffer
    try:
        await replay(connection, out.write, after=args.after, limit=args.limit)
    finally:
        await connection.close()
        out.flush()
    return 0


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"just {command}")
    if command == "rebuild":
        parser.description = "rebuild the read tables from position 0 and swap them in"
        parser.add_argument("--batch-size", type=int, default=5000)
        parser.set_defaults(handler=run_rebuild)
    elif command == "verify":
        parser.description = "check the hash chain and diff the read tables with a replay"
        parser.add_argument("--receipt", type=Path, default=None,
                            help="also check a receipt (or a saved POST /prediction/ answer) against the log")
        parser.add_argument("--key", action="append", default=[], metavar="VERIFIER_KEY",
                            help="also trust this verifier key (<name>+<hash>+<key>) for checkpoints; repeatable")
        parser.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)  # the audit job runner's
        parser.set_defaults(handler=run_verify)
    else:
        parser.description = "events as NDJSON on stdout"
        parser.add_argument("--after", type=int, default=0, help="start after this position")
        parser.add_argument("--limit", type=int, default=None, help="at most this many events")
        parser.set_defaults(handler=run_replay)
    return parser


def main(command: str, argv: list[str] | None = None) -> int:
    args = _parser(command).parse_args(argv)
    settings = Settings.from_env()
    configure_console_logging(settings.log_level)
    return uvloop.run(args.handler(settings, args))
