"""Child processes that cannot outlive the cluster that started them.

Each child gets a parent-death signal (Linux `PR_SET_PDEATHSIG`): if the launcher is killed
without a chance to clean up (SIGKILL, a crashed test run), the kernel still stops what it
started, so nothing is left behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import psutil

PR_SET_PDEATHSIG = 1


def dies_with_parent(sig: int) -> Callable[[], None]:
    def arrange() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    return arrange


def spawn(
    argv: list[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None,
    user: int | None = None, group: int | None = None, death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, user=user, group=group,
            preexec_fn=dies_with_parent(death_signal),
            # Not in the launcher's process group: a terminal's Ctrl-C reaches the launcher
            # alone, which then stops everything in order (the nodes drain before PostgreSQL goes).
            process_group=0,
        )


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and every descendant (a service node's projection child sits in its own session)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    for process in process_tree(pid):
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
    """Signal, wait, then SIGKILL the whole tree if it did not go."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            process.wait(10)
    return process.returncode


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def environment(**overrides: str) -> dict[str, str]:
    return {**os.environ, **overrides}
