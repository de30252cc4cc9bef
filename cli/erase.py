"""`just erase DIGEST`: delete an original upload for retention or erasure; the chain stays intact
and a BlobErased event records why (usecases/erase.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from infra.database import provision_database
from infra.settings import Settings
from usecases.erase import ErasureRefused, erase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="just erase", description="delete an original upload; the chain stays intact")
    parser.add_argument("digest", help="sha256 of the original upload (blob_sha256)")
    parser.add_argument("--reason", default="erasure request", help="recorded in the BlobErased event")
    args = parser.parse_args(argv)
    target = asyncio.run(provision_database(Settings.from_env()))
    try:
        committed = asyncio.run(erase(target.owner_dsn, args.digest, args.reason))
    except ErasureRefused as refused:
        print(f"erase: {refused}", file=sys.stderr)
        return 1
    event = committed.events[0]
    print(f"erased {args.digest}: BlobErased at position {event.position} (hash {event.hash.hex()})")
    return 0

