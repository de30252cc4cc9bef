"""`just reproduce ID`: re-run a past prediction from the log alone and compare (usecases/reproduce.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import msgspec

from infra.database import start_or_locate_database
from infra.settings import Settings
from usecases.errors import NotFound
from usecases.reproduce import reproduce


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just reproduce", description="re-run a past prediction from the log and compare")
    parser.add_argument("prediction_id", type=uuid.UUID)
    args = parser.parse_args(argv)
    target = start_or_locate_database(Settings.from_env())
    try:
        report = asyncio.run(reproduce(target.owner_dsn, args.prediction_id))
    except NotFound as missing:
        print(f"reproduce: {missing}", file=sys.stderr)
        return 1
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
    return 0 if report.status == "reproduced" else 1

