"""HAProxy (Debian's `haproxy` package) in front of the service nodes.

It health-checks each node's `/health/ready` (a node that is not ready, or gone, leaves the
rotation within `fall` checks), balances by least connections, and retries only what is safe to
send twice: any request whose connection failed before it was sent, and otherwise only requests
that are idempotent (GET, HEAD, OPTIONS, or any request carrying an `Idempotency-Key`, which the
service deduplicates in PostgreSQL). A POST without a key that reached a node that then died is
never replayed: its client sees the failure and decides.
"""

from __future__ import annotations

import csv
import io
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from harness.cluster.processes import spawn, stop
from harness.live import free_port

CHECK_INTERVAL_MS = 500
FALL = 2  # failed checks before a node leaves the rotation
RISE = 2  # passed checks before it comes back


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        raise RuntimeError("haproxy is not installed: apt-get install -y haproxy (Debian's package)")
    return found


def config(front_port: int, stats_port: int, nodes: dict[str, int]) -> str:
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{port} check" for name, port in nodes.items()
    )
    return f"""\
global
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 2s
    timeout http-request 15s
    retries 2
    option redispatch 1

frontend front
    bind 127.0.0.1:{front_port}
    default_backend nodes

backend nodes
    balance leastconn
    option httpchk GET /health/ready
    http-check expect status 200
    default-server inter {CHECK_INTERVAL_MS} fastinter {CHECK_INTERVAL_MS} downinter 1s fall {FALL} rise {RISE} on-marked-down shutdown-sessions
    # Connection failures are retried for every request (nothing reached a node); the rest only
    # for requests that are safe to send twice.
    retry-on conn-failure empty-response response-timeout 502 503 504
    acl idempotent method GET HEAD OPTIONS
    acl keyed req.hdr(Idempotency-Key) -m found
    http-request disable-l7-retry unless idempotent || keyed
    http-response set-header X-Served-By %[srv_name]
{servers}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
    stats refresh 1s
"""


class HAProxy:
    def __init__(self, root: Path, nodes: dict[str, int], front_port: int | None = None, *,
                 name: str = "haproxy") -> None:
        self.front_port = front_port or free_port()
        self.stats_port = free_port()
        self.config_path = root / f"{name}.cfg"
        self.log_path = root / f"{name}.log"
        self.config_path.write_text(config(self.front_port, self.stats_port, nodes))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    def start(self, timeout_s: float = 15.0) -> "HAProxy":
        binary = haproxy_binary()
        check = subprocess.run([binary, "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its configuration:\n{check.stdout}{check.stderr}")
        self.process = spawn([binary, "-db", "-f", str(self.config_path)], self.log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.front_port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"haproxy did not listen within {timeout_s} s")

    def server_states(self) -> dict[str, str]:
        """{node: UP, DOWN, ...} as HAProxy sees them now."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text.lstrip("# ")
        return {
            row["svname"]: row["status"]
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "nodes" and row["svname"] not in ("BACKEND", "FRONTEND")
        }

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process, signal.SIGTERM, timeout_s=10)
            self.process = None
