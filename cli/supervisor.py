"""The projection worker as a child process of `just serve` (`PROJECTIONS=process`).

In a process of its own the worker's decoding and row building run on the other core instead of
taking the service's event loop (BENCHMARKS.md has the figures). It is the same `python -m cli
project` that `just project` starts, so the advisory lock still elects exactly one active worker
among all of them.

The child is restarted when it dies, stopped (SIGTERM: it drains its batch) when the service
stops, and stops by itself when the service is gone without stopping it (SIGKILL): it watches its
parent's pid (`--exit-with-parent`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)

RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0)
HEALTHY_AFTER_S = 30.0  # a worker that ran this long starts the restart delays over


class ProjectorProcess:
    def __init__(self, *, stop_timeout_s: float = 30.0) -> None:
        self._stop_timeout_s = stop_timeout_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="projector-process", daemon=True)
        self._thread.start()

    def stop(self) -> int | None:
        """SIGTERM the worker and wait for it to drain; returns its exit status."""
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the projection worker did not stop within %.0f s; killing it", self._stop_timeout_s)
                process.kill()
                process.wait()
        if self._thread is not None:
            self._thread.join(5)
        return process.returncode

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            with self._lock:
                if self._stopping.is_set():
                    return
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "cli", "project", "--exit-with-parent", str(os.getpid())],
                    # Its own session: a Ctrl-C meant for the service must not stop the worker
                    # before the service has drained (the service stops it afterwards).
                    start_new_session=True,
                )
            log.info("projection worker started as pid %d", self._process.pid)
            code = self._process.wait()
            if self._stopping.is_set():
                return
            failures = 0 if time.monotonic() - started >= HEALTHY_AFTER_S else failures + 1
            delay = RESTART_DELAYS_S[min(failures, len(RESTART_DELAYS_S) - 1)]
            log.warning("the projection worker exited with %s; restarting in %.1f s", code, delay)
            if self._stopping.wait(delay):
                return
