"""A real service process (`python -m cli serve`) on a free port, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(process: subprocess.Popen[bytes], url: str, timeout_s: float, what: str, log: Callable[[], str]) -> None:
    """Poll `url` until it answers 200; fail at once if the process exits, or after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} was not ready within {timeout_s} s:\n{log()}")


class LiveService:
    def __init__(self, owner_dsn: str, log_path: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "DATABASE_URL": owner_dsn,
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PYTHONPATH": str(ROOT),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "LOG_LEVEL": "INFO",
            **env,
        }
        self.env.pop("APP_DATABASE_URL", None)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 120.0) -> "LiveService":
        self.launch()
        self.wait_ready(ready_timeout_s)
        return self

    def launch(self, **popen: object) -> None:
        """Start the process without waiting for it (several start faster side by side)."""
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve"], cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            **popen,  # type: ignore[arg-type]
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        assert self.process is not None
        wait_ready(self.process, f"{self.url}/health/ready", timeout_s, "the service", self.log)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def stop_gracefully(self) -> bool:
        """SIGTERM, then: did it drain and shut down cleanly? (uvicorn re-raises the signal once
        shutdown is complete; the service then exits with 128 + SIGTERM, as a shell reports it.)"""
        code = self.stop()
        return code in (0, 128 + signal.SIGTERM) and "Application shutdown complete" in self.log()

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)
        finally:
            self._log.close()
