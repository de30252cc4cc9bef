"""Watching the processes a service starts, for the API and fault tests."""

from __future__ import annotations

import time
from pathlib import Path


def projection_workers(service_pid: int) -> list[int]:
    """Pids of the `python -m cli project` children a service started (PROJECTIONS=process)."""
    wanted = ["cli", "project", "--exit-with-parent", str(service_pid)]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(word in argv for word in wanted):
            found.append(int(entry.name))
    return found


def wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout_s} s")
        time.sleep(0.1)
    return result
