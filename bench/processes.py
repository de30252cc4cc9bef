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
