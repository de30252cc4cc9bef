"""Every vendored front-end file is byte for byte the one its manifest names (version, licence, sha256)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "service" / "static" / "vendor" / "VENDORED.md"


def test_each_vendored_file_matches_its_sha256_and_carries_its_licence():
    rows = re.findall(r"^\| `([^`]+)`.*\| (\S+) \| ([0-9.]+) \| ([^|]+) \| `([0-9a-f]{64})` \|$", MANIFEST.read_text(), re.M)
    assert len(rows) == 2
    for path, package, version, licence, digest in rows:
        assert hashlib.sha256((REPO / path).read_bytes()).hexdigest() == digest, path
        assert version in path and licence.strip()
        licence_file = re.search(r"`([^`]*LICENSE[^`]*)`|\(`([^`]+)`\)", licence)
        assert licence_file is not None
        name = licence_file.group(1) or licence_file.group(2)
        assert ((REPO / path).parent / Path(name).name).exists(), name


def test_the_console_loads_nothing_from_elsewhere():
    templates = (REPO / "service" / "templates").glob("*.html")
    for template in templates:
        text = template.read_text()
        assert "http://" not in text and "https://" not in text and "<script>" not in text, template.name
