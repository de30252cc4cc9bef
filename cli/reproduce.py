"""`just reproduce ID`: re-run a past prediction from the log alone and compare (usecases/reproduce.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from datetime import datetime, timezone

import asyncpg
import msgspec

from infra.database import start_or_locate_database
from infra.settings import Settings
from usecases.audit_jobs import file_verdict
from usecases.errors import NotFound
from usecases.reproduce import Report, reproduce


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just reproduce", description="re-run a past prediction from the log and compare")
    parser.add_argument("prediction_id", type=uuid.UUID)
    parser.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)  # the audit job runner's
    args = parser.parse_args(argv)
    target = start_or_locate_database(Settings.from_env())
    started_at = datetime.now(timezone.utc)
    try:
        report = asyncio.run(reproduce(target.owner_dsn, args.prediction_id))
    except NotFound as missing:
        print(f"reproduce: {missing}", file=sys.stderr)
        return 1
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
    ok = report.status == "reproduced"
    try:
        asyncio.run(file_verdict(target.owner_dsn, args.job, "reproduce", args.prediction_id, ok=ok,
                                 verdict=verdict(report), report=report, started_at=started_at))
    except (OSError, asyncpg.PostgresError) as error:
        print(f"reproduce: the result could not be recorded in audit_jobs: {error}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def verdict(report: Report) -> str:
    """One line for people."""
    if report.status != "reproduced":
        return f"{report.status.replace('_', ' ')}: {report.detail}"
    exact = "bit for bit at the recorded batch" if report.bit_identical_at_recorded_batch else "within the tolerance"
    return (f"reproduced: the same tensor, the same class, the output {exact} "
            f"(largest difference alone {report.max_abs_difference:.3g})")

