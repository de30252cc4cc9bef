"""The BentoML peer's own environment: bench/.bentoml-venv, made once from requirements.txt.

    python bench/bentoml_peer/venv.py      # prints the path of its `bentoml` command

BentoML and its TensorFlow stay out of the service's dependencies (uv.lock): the bench creates
this separate venv with uv the first time it needs it, and again only when requirements.txt
changes (its digest is kept in the venv). git ignores the folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".bentoml-venv"
REQUIREMENTS = HERE / "requirements.txt"
STAMP = VENV / "requirements.sha256"


def uv() -> list[str]:
    """uv as `just` finds it: on PATH, the one running us (`uv run` sets UV), or python3's module."""
    found = os.environ.get("UV") or shutil.which("uv")
    if found:
        return [found]
    for python in (shutil.which("python3"), sys.executable):
        if python and subprocess.run([python, "-m", "uv", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "uv"]
    raise SystemExit("uv is needed to make the BentoML peer's venv (`just setup` installs it)")


def ensure_venv() -> Path:
    """The venv's `bentoml` executable, after creating or updating the venv when needed."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    bentoml = VENV / "bin" / "bentoml"
    if bentoml.exists() and STAMP.exists() and STAMP.read_text().strip() == digest:
        return bentoml
    print(f"creating the BentoML peer's environment in {VENV} (once)...", flush=True)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (VENV / "bin" / "python").exists():
        subprocess.run([*uv(), "venv", "--quiet", "--python", python, str(VENV)], check=True)
    subprocess.run([*uv(), "pip", "install", "--quiet", "--python", str(VENV / "bin" / "python"),
                    "-r", str(REQUIREMENTS)], check=True)
    STAMP.write_text(digest + "\n")
    return bentoml


if __name__ == "__main__":
    print(ensure_venv())
