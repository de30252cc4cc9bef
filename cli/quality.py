"""`just quality [SHA256-PREFIX]`: each served model's measured quality against its current labels,
as a table and a confusion matrix in the terminal (the same numbers as GET /models/{sha}/quality)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime, timezone

import asyncpg

from domain.quality import QualityReport, quality_report
from infra.database import start_or_locate_database
from infra.settings import Settings
from projections import quality, queries

_ALL_TIME = (datetime(1, 1, 1, tzinfo=timezone.utc), datetime(9999, 12, 31, tzinfo=timezone.utc))


def _number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def render(entry: quality.ModelEntry, report: QualityReport, confusion: list[list[int]], position: int) -> str:
    lines = [
        f"{entry.name} {entry.version}  sha256 {entry.sha256[:16]}…  ({entry.num_classes} classes, as of position {position})",
        f"  predictions {report.predictions:,}  failed {report.failed:,}  labelled {report.labelled:,}"
        f"  coverage {_number(report.label_coverage)}",
        f"  accuracy {_number(report.accuracy)}  macro F1 {_number(report.macro_f1)}  ECE {_number(report.ece)}"
        f"  Brier {_number(report.brier)}",
        "",
        "  class  precision  recall     F1",
    ]
    for k in range(report.num_classes):
        lines.append(f"  {k:>5}  {_number(report.precision[k]):>9}  {_number(report.recall[k]):>6}  {_number(report.f1[k]):>5}")
    width = max(5, *(len(f"{n:,}") for row in confusion for n in row))
    lines += ["", "  confusion (rows: true label, columns: predicted class)",
              "  " + " " * 6 + "".join(f"{k:>{width + 1}}" for k in range(report.num_classes))]
    for truth, row in enumerate(confusion):
        lines.append(f"  {truth:>5} " + "".join(f"{n:>{width + 1},}" for n in row))
    return "\n".join(lines)


async def show(owner_dsn: str, prefix: str | None) -> int:
    connection = await asyncpg.connect(owner_dsn)
    try:
        position = await queries.tracked_position(connection)
        entries = [m for m in await quality.models(connection) if prefix is None or m.sha256.startswith(prefix)]
        if not entries:
            print(f"quality: no registered model{'' if prefix is None else f' with sha256 {prefix}…'}", file=sys.stderr)
            return 1
        for entry in entries:
            buckets = await quality.bucket_counts(
                connection, entry.sha256, entry.num_classes, position=position, current=True,
                since=_ALL_TIME[0], until=_ALL_TIME[1], bucket="day",
            )
            counts = quality.total(buckets, entry.num_classes)
            print(render(entry, quality_report(counts), counts.confusion, position))
            print()
    finally:
        await connection.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just quality", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="a prefix of the model's sha256 (default: every model)")
    args = parser.parse_args(argv)
    target = start_or_locate_database(Settings.from_env())
    return asyncio.run(show(target.owner_dsn, args.model))
