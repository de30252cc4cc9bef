"""`just cluster` (python -m harness.cluster): it prints its front once everything answers, and
stopping it (Ctrl-C, or even SIGKILL) leaves no process behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import httpx
import psutil
import pytest

from harness.live import ROOT
from tests.processes import wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_the_launcher_serves_then_leaves_no_process_behind(tmp_path, stop_with):
    log_path = tmp_path / "cluster.log"
    with open(log_path, "wb") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "harness.cluster", "--nodes", "1"], cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        front = wait_until(lambda: re.search(r"^front: (http://\S+)$", log_path.read_text(), re.M), 180,
                           "the front line was printed")
        started = psutil.Process(launcher.pid).children(recursive=True)
        names = {process.name() for process in started}
        assert {"postgres", "haproxy"} <= names, names
        ready = httpx.get(f"{front.group(1)}/health/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["replica"]["standby"] is True
        launcher.send_signal(stop_with)
        launcher.wait(120)
        # Children that got their parent-death signal drain first (the nodes, for up to 30 s).
        wait_until(lambda: not any(_alive(process) for process in started), 60, "every child stopped")
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log_path.read_text()
    folder = re.search(r"; data in (\S+)$", text, re.M).group(1)
    if stop_with == signal.SIGINT:  # an orderly stop also removes its temporary folder
        assert "stopped" in text
        assert not os.path.exists(folder), folder
    else:  # a SIGKILLed launcher cannot: its children stopped, its folder is ours to remove
        shutil.rmtree(folder)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

