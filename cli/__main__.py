"""`python -m cli <command> [args]`: every process and operator command (the Justfile calls these)."""

from __future__ import annotations

import sys

COMMANDS = {
    "serve": "serve the API (just serve)",
    "project": "run a projection worker (just project)",
    "rebuild": "rebuild the read tables (just rebuild)",
    "verify": "verify the chain, checkpoints and read tables (just verify)",
    "replay": "print events as NDJSON (just replay)",
    "reproduce": "re-run a past prediction (just reproduce)",
    "erase": "erase an original upload (just erase)",
    "quality": "each model's measured quality against its labels (just quality)",
    "labels-import": "send labels from a CSV or NDJSON file (just labels-import)",
    "verify-receipt": "check a receipt against the signed checkpoints (just verify-receipt)",
    "rotate-key": "make a new checkpoint signing key (just rotate-key)",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:<14} {what}" for name, what in COMMANDS.items())
        print(f"usage: python -m cli <command> [args]\n\ncommands:\n{listing}", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from cli.serve import main as serve

        return serve(rest)
    if command == "project":
        from cli.project import main as project

        return project(rest)
    if command in ("rebuild", "verify", "replay"):
        from cli.audit import main as audit

        return audit(command, rest)
    if command == "reproduce":
        from cli.reproduce import main as reproduce

        return reproduce(rest)
    if command == "labels-import":
        from cli.labels_import import main as labels_import

        return labels_import(rest)
    if command in ("verify-receipt", "rotate-key"):
        from cli.tlog import main_rotate_key, main_verify_receipt

        return (main_verify_receipt if command == "verify-receipt" else main_rotate_key)(rest)
    if command == "quality":
        from cli.quality import main as quality

        return quality(rest)
    from cli.erase import main as erase

    return erase(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
