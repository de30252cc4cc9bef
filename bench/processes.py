"""The servers under load: what the bench measures of each, and the bench-only ones as subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from harness import live

REPO = Path(__file__).resolve().parent.parent


class Target:
    """A server under load: its name, URL, the pid whose CPU we read, and the status its
    successful uploads answer (201: stored; the BentoML peer stores nothing and answers 200)."""

    def __init__(self, name: str, url: str, pid: int, database: str | None, ok_status: int = 201) -> None:
        self.name, self.url, self.pid, self.database = name, url, pid, database
        self.ok_status = ok_status


class Subprocess:
    """A bench-only server (reference, HTTP ceiling, BentoML peer) on a free port; stopped with SIGTERM."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 health_path: str = "/health") -> None:
        self.name = name
        self.health_path = health_path
        self.port = live.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [*argv, "--port", str(self.port)], cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})},
        )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        live.wait_ready(self.process, f"{self.url}{self.health_path}", timeout_s, self.name, self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


def ensure_bench_group() -> None:
    """psycopg comes from the `bench` dependency group; an exact `uv sync` elsewhere (`just test`
    in the same checkout) removes it, so sync it again right before the reference starts."""
    uv = shutil.which("uv")
    if uv is not None:
        subprocess.run([uv, "sync", "--frozen", "--inexact", "--group", "bench", "--quiet"], cwd=REPO, check=True)


def _role(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except OSError:
        return "?"
    if "cli" in argv and "project" in argv:
        return "projection worker"
    if "cli" in argv and "serve" in argv:
        return "service's main process (serves when WORKERS=1)"
    if any("resource_tracker" in part for part in argv):
        return "multiprocessing's resource tracker"
    if any("multiprocessing" in part for part in argv):
        return "uvicorn worker"
    if any(part.endswith("bentoml") for part in argv[:2]) and "serve" in argv:
        return "bentoml serve (supervisor)"
    if any("_bentoml_impl" in part for part in argv):
        return "bentoml worker"
    shown = [Path(argv[0]).name, *(Path(part).name for part in argv[1:2])] if argv else ["?"]
    return " ".join(shown)


def rss(pid: int) -> list[dict[str, object]]:
    """Resident memory of a server's processes (the process and its descendants), in MiB."""
    from bench.cpu import process_tree

    rows: list[dict[str, object]] = []
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                kib = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        rows.append({"pid": member, "role": _role(member), "rss_mib": kib / 1024})
    return rows
