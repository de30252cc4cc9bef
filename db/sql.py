"""SQL text helpers. Values always travel as parameters; only identifiers (schema, table,
database and role names, which PostgreSQL cannot take as parameters) are spliced, quoted here."""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, double-quoted with embedded quotes doubled."""
    return '"' + name.replace('"', '""') + '"'
