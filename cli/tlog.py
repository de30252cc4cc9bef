"""`just verify-receipt` and `just rotate-key`: the transparency log from the outside and its key.

verify-receipt checks a receipt the way a customer can, with nothing but the service's public
endpoints and a pinned verifier key: the latest checkpoint's signature, each event's inclusion
proof against it (and the receipt's own checkpoint and proofs, when it was made with
`Prefer: wait=checkpoint`), and, given an older checkpoint, that the log only grew since.
Exit 0: all checks passed; 1: one failed (the message names it); 2: it could not be checked.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from domain.merkle import ProofError, verify_consistency, verify_inclusion
from domain.signed_note import Checkpoint, NoteError, parse_verifier_key
from infra.settings import Settings
from projections.checkpoints import NoteKey, load_key, open_checkpoint, retired_keys, rotate_key


class Failed(Exception):
    """A check failed: exit 1 with this message."""


class Unavailable(Exception):
    """The receipt could not be checked (unreadable input, unreachable service): exit 2."""


def _get(url: str, path: str, params: dict[str, int] | None = None) -> bytes:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}{path}{query}", timeout=30) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        raise Unavailable(f"GET {path} answered {error.code}: {detail}") from None
    except urllib.error.URLError as error:
        raise Unavailable(f"cannot reach {url}: {error.reason}") from None


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _trusted_keys(given: list[str], settings: Settings, log_id: str) -> list[str]:
    """The pinned keys: --key (a verifier key or a file holding one), else this machine's own."""
    keys = []
    for value in given:
        text = Path(value).read_text().strip() if Path(value).is_file() else value.strip()
        parse_verifier_key(text)
        keys.append(text)
    if keys:
        return keys
    if settings.checkpoint_key.exists():
        name = settings.log_origin or f"prediction-audit/{log_id}"
        private = [*retired_keys(settings.checkpoint_key), load_key(settings.checkpoint_key)]
        return [NoteKey(name, key).verifier_key for key in private]
    raise Unavailable("no key to trust: pin the log's verifier key with --key (GET /checkpoint/key once, keep it)")


def _open(note: str, keys: list[str], what: str) -> Checkpoint:
    try:
        return open_checkpoint(note, keys)
    except NoteError as error:
        raise Failed(f"{what}: {error}") from None


def verify_receipt(receipt: dict, url: str, keys: list[str], older: str | None) -> list[str]:
    """The checks' report lines; raises Failed or Unavailable."""
    report = []
    latest = _open(_get(url, "/checkpoint").decode(), keys, "the latest checkpoint")
    report.append(f"latest checkpoint: {latest.size} leaves, signed by a pinned key ({latest.origin})")
    own = None
    if receipt.get("checkpoint"):
        own = _open(receipt["checkpoint"], keys, "the receipt's checkpoint")
    for event in receipt["events"]:
        index, leaf = event["leaf_index"], _b64(event["leaf_hash"])
        if index != event["position"] - 1:
            raise Failed(f"event at {event['position']}: leaf index {index} is not position - 1")
        if own is not None and event.get("inclusion_proof") is not None:
            try:
                verify_inclusion(index, own.size, leaf, [_b64(p) for p in event["inclusion_proof"]], own.root_hash)
            except ProofError as error:
                raise Failed(f"event at {event['position']}: the receipt's own inclusion proof: {error}") from None
        answer = json.loads(_get(url, f"/events/{event['position']}/inclusion", {"tree_size": latest.size}))
        try:
            verify_inclusion(index, latest.size, leaf, [_b64(p) for p in answer["proof"]], latest.root_hash)
        except ProofError as error:
            raise Failed(f"event at {event['position']} ({event.get('type')}): not in the latest checkpoint: {error}") from None
    report.append(f"inclusion: {len(receipt['events'])} event(s) of the receipt are in the latest checkpoint")
    for name, old in (("the receipt's checkpoint", own), ("--checkpoint", _open(older, keys, "--checkpoint") if older else None)):
        if old is None:
            continue
        if old.size > latest.size:
            raise Failed(f"{name} ({old.size} leaves) is larger than the latest checkpoint ({latest.size})")
        proof = [] if old.size == latest.size else [
            _b64(p) for p in json.loads(_get(url, "/log/consistency", {"first": old.size, "second": latest.size}))["proof"]
        ]
        try:
            verify_consistency(old.size, latest.size, old.root_hash, latest.root_hash, proof)
        except ProofError as error:
            raise Failed(f"consistency from {name} ({old.size} leaves) to the latest: {error}") from None
        report.append(f"consistency: the log of {latest.size} leaves extends {name} of {old.size}")
    return report


def main_verify_receipt(argv: list[str]) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="just verify-receipt", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="a receipt, or a saved POST answer that holds one")
    parser.add_argument("--checkpoint", type=Path, default=None, help="an older checkpoint you kept (signed note)")
    parser.add_argument("--key", action="append", default=[], help="the pinned verifier key, or a file holding it")
    parser.add_argument("--url", default=f"http://{settings.host}:{settings.port}", help="the service (default: HOST:PORT)")
    args = parser.parse_args(argv)
    try:
        document = json.loads(args.file.read_text())
        receipt = document.get("receipt", document)
        keys = _trusted_keys(args.key, settings, receipt["log_id"])
        older = args.checkpoint.read_text() if args.checkpoint else None
        report = verify_receipt(receipt, args.url, keys, older)
    except Failed as failure:
        print(f"FAILED: {failure}")
        return 1
    except (Unavailable, OSError, ValueError, KeyError, TypeError, NoteError) as error:
        print(f"verify-receipt: cannot check: {error}", file=sys.stderr)
        return 2
    print("\n".join(report))
    print("OK")
    return 0


def main_rotate_key(argv: list[str]) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="just rotate-key", description="make a new checkpoint signing key")
    parser.add_argument("--origin", default=settings.log_origin,
                        help="the log's origin (default: LOG_ORIGIN, else prediction-audit/<log id>)")
    args = parser.parse_args(argv)
    origin = args.origin
    if origin is None:
        import asyncio

        import asyncpg

        from infra.database import start_or_locate_database

        async def log_id() -> str:
            connection = await asyncpg.connect(start_or_locate_database(settings).owner_dsn)
            try:
                return str(await connection.fetchval("SELECT log_id FROM log_identity"))
            finally:
                await connection.close()

        origin = f"prediction-audit/{asyncio.run(log_id())}"
    retired, new = rotate_key(settings.checkpoint_key, origin)
    print(f"retired key (stays published, kept as {settings.checkpoint_key.name}.retired-…): {retired}")
    print(f"new key: {new}")
    print("the next checkpoint carries both signatures; pin the new key where you pinned the old one")
    return 0
