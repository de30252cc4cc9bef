"""`just labels-import FILE`: send labels from a CSV (`prediction_id,label[,source,note]`, with that
header) or NDJSON file to the service's POST /labels in batches, with a progress line, a summary of
what was accepted and refused (with reasons), and the refused lines written to a file of their own.

Each batch carries an Idempotency-Key derived from the file's digest and the batch's number, so
running the same import again (after a crash, say) appends nothing twice.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import hashlib
import io
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from infra.settings import Settings

MAX_RETRIES = 8


def read_items(path: Path) -> list[tuple[str, dict[str, object]]]:
    """(the original line, the item) for each label in the file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".ndjson", ".jsonl") or text.lstrip().startswith("{"):
        items = []
        for line in text.splitlines():
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    value = {"unparseable": line}
                items.append((line, value))
        return items
    rows = list(csv.reader(io.StringIO(text)))
    header, body = [name.strip() for name in rows[0]], rows[1:]
    items = []
    for row in body:
        if not any(cell.strip() for cell in row):
            continue
        item: dict[str, object] = dict(zip(header, (cell.strip() for cell in row)))
        try:
            item["label"] = int(str(item.get("label", "")))
        except ValueError:
            pass  # the service refuses it, per item, with its reason
        items.append((",".join(row), {k: v for k, v in item.items() if v != ""}))
    return items


def _prediction(item: object) -> str:
    """The prediction an item names, as one spelling (so two spellings of an id are one)."""
    raw = str(item.get("prediction_id")) if isinstance(item, dict) else ""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        return raw


def post_batch(url: str, items: list[object], key: str, api_key: str | None, source: str | None) -> dict:
    query = f"?source={urllib.parse.quote(source)}" if source else ""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/labels{query}", data=json.dumps(items).encode(), method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": key,
                 **({"Authorization": f"Bearer {api_key}"} if api_key else {})},
    )
    for attempt in range(MAX_RETRIES):
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == MAX_RETRIES - 1:
                raise SystemExit(f"labels-import: the service answered {error.code}: {error.read().decode(errors='replace')}")
            time.sleep(float(error.headers.get("Retry-After") or 1))
        except urllib.error.URLError as error:
            if attempt == MAX_RETRIES - 1:
                raise SystemExit(f"labels-import: cannot reach {url}: {error.reason}")
            time.sleep(1)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="just labels-import", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--url", default=f"http://{settings.host}:{settings.port}", help="the service (default: HOST:PORT)")
    parser.add_argument("--api-key", default=settings.client_api_key, help="a key with the label scope (default: AUDIT_API_KEY)")
    parser.add_argument("--source", default=None, help="the source of lines that name none (default: the file's name)")
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--in-flight", type=int, default=2, help="batches sent at once (default: 2)")
    parser.add_argument("--refused", type=Path, default=None, help="where refused lines go (default: FILE.refused.ndjson)")
    args = parser.parse_args(argv)
    if not 1 <= args.batch_size <= 10_000:
        parser.error("--batch-size must be 1 … 10,000")
    if not 1 <= args.in_flight <= 8:
        parser.error("--in-flight must be 1 … 8")
    lines = read_items(args.file)
    digest = hashlib.sha256(args.file.read_bytes()).hexdigest()[:16]
    refused_path = args.refused or args.file.with_name(args.file.name + ".refused.ndjson")
    source = args.source or args.file.name
    accepted, replayed = 0, 0
    reasons: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    starts = range(0, len(lines), args.batch_size)

    def batch_of(number: int) -> list[tuple[str, dict[str, object]]]:
        return lines[starts[number]:starts[number] + args.batch_size]

    def send(number: int) -> dict:
        return post_batch(args.url, [item for _, item in batch_of(number)], f"labels-import-{digest}-{number}",
                          args.api_key, source)

    def take(number: int, answer: dict) -> None:
        nonlocal accepted, replayed
        start, batch = starts[number], batch_of(number)
        accepted += answer["accepted"]
        replayed += answer["accepted"] if answer["replayed"] else 0
        for item in answer["items"]:
            if item["status"] != 201:
                problem = item["problem"]
                reasons[problem["type"].removeprefix("urn:problem:")] += 1
                line, _ = batch[item["index"]]
                refused.write(json.dumps({"line": start + item["index"] + 2, "text": line,
                                          "status": item["status"], "problem": problem}) + "\n")
        done = start + len(batch)
        elapsed = time.monotonic() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (len(lines) - done) / rate if rate else 0.0
        print(f"\r{done:,}/{len(lines):,} labels  {rate:,.0f}/s  ETA {eta:,.0f} s", end="", file=sys.stderr)

    # Several batches in flight: the service checks one while it commits another (one client
    # waiting for each answer leaves a core idle; BENCHMARKS.md). A batch that labels a prediction
    # a batch in flight also labels waits for it: the file's order decides which label is current.
    in_flight: collections.deque[tuple[int, concurrent.futures.Future[dict], set[str]]] = collections.deque()
    with refused_path.open("w", encoding="utf-8") as refused, \
            concurrent.futures.ThreadPoolExecutor(max_workers=args.in_flight) as pool:
        for number in range(len(starts)):
            named = {_prediction(item) for _, item in batch_of(number)}
            while in_flight and (len(in_flight) >= args.in_flight or any(named & ids for _, _, ids in in_flight)):
                earlier, answer, _ = in_flight.popleft()
                take(earlier, answer.result())
            in_flight.append((number, pool.submit(send, number), named))
        while in_flight:
            earlier, answer, _ = in_flight.popleft()
            take(earlier, answer.result())
    print(file=sys.stderr)
    total_refused = sum(reasons.values())
    print(f"accepted {accepted:,} ({replayed:,} already recorded by an earlier run), refused {total_refused:,}")
    for reason, count in reasons.most_common():
        print(f"  {reason}: {count:,}")
    if total_refused:
        print(f"refused lines: {refused_path}")
    return 0 if not total_refused else 1
