"""A cluster on one machine: what `just cluster` starts and the cluster drills run against.

A private PostgreSQL primary and one streaming standby, N service nodes (`python -m cli serve`,
each with its own projection worker child: the advisory locks elect one active across all of
them) reading through the standby (`DATABASE_READ_URL`), and HAProxy in front.
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
from pathlib import Path

from db.dsn import APP_ROLE
from db.migrate import migrate
from harness.cluster.haproxy import HAProxy
from harness.cluster.processes import dies_with_parent, kill_tree, process_tree
from harness.cluster.postgres import ReplicatedPostgres
from harness.live import LiveService

DATABASE = "prediction_audit"


class Node(LiveService):
    """One service node; it stops (SIGTERM: drain) if whatever started it dies."""

    def __init__(self, name: str, owner_dsn: str, log_path: Path, **env: str) -> None:
        super().__init__(owner_dsn, log_path, NODE_NAME=name, **env)
        self.name = name

    def launch(self, **popen: object) -> None:
        super().launch(preexec_fn=dies_with_parent(signal.SIGTERM), process_group=0, **popen)

    def kill(self) -> None:
        """As if its machine died: SIGKILL the node and its projection worker child at once."""
        assert self.process is not None
        kill_tree(self.process.pid)
        self.process.wait(10)
        self._log.close()

    def processes(self) -> int:
        return len(process_tree(self.process.pid)) if self.process is not None else 0


class Cluster:
    """Start with `start()`, stop with `stop()` (or use it as a context manager)."""

    def __init__(self, nodes: int = 3, *, root: Path | None = None, front_port: int | None = None,
                 node_env: dict[str, str] | None = None) -> None:
        self._given_root = root is not None
        self.root = (root or Path(tempfile.mkdtemp(prefix="audit-cluster-"))).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.node_count = nodes
        self.front_port = front_port
        self.node_env = node_env or {}
        self.postgres = ReplicatedPostgres(self.root / "postgres")
        self.nodes: list[Node] = []
        self.haproxy: HAProxy | None = None

    @property
    def owner_dsn(self) -> str:
        return self.postgres.primary.dsn(DATABASE)

    @property
    def app_dsn(self) -> str:
        return self.postgres.primary.dsn(DATABASE, APP_ROLE)

    @property
    def standby_app_dsn(self) -> str:
        return self.postgres.standby.dsn(DATABASE, APP_ROLE)

    @property
    def front_url(self) -> str:
        assert self.haproxy is not None
        return self.haproxy.url

    def start(self, log=lambda message: None) -> "Cluster":
        import asyncio

        log(f"PostgreSQL: {self.postgres.version} from {self.postgres.bindir}; data in {self.root}")
        self.postgres.start_primary()
        asyncio.run(migrate(self.owner_dsn))  # before the copy, so the standby starts with the schema
        log(f"primary on 127.0.0.1:{self.postgres.primary.port}, migrated")
        self.postgres.start_standby()
        log(f"standby on 127.0.0.1:{self.postgres.standby.port}, streaming from the primary")
        shared = {
            "DATABASE_READ_URL": self.standby_app_dsn,
            # One signing key and checkpoint folder for every node: whichever node's worker is
            # elected signs as the same log (on separate machines: the same key file on each).
            "CHECKPOINT_DIR": str(self.root / "checkpoints"),
            "CHECKPOINT_KEY": str(self.root / "checkpoint_ed25519.pem"),
            "PROJECTIONS": "process",
            **self.node_env,
        }
        self.nodes = [
            Node(f"node-{i}", self.owner_dsn, self.root / f"node-{i}.log", **shared)
            for i in range(1, self.node_count + 1)
        ]
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready(180)
            log(f"{node.name} ready on {node.url}")
        self.haproxy = HAProxy(self.root, {node.name: node.port for node in self.nodes}, self.front_port).start()
        return self

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def stop(self) -> None:
        """HAProxy, then the nodes (they drain), then the standby and the primary."""
        if self.haproxy is not None:
            self.haproxy.stop()
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            node.stop()
        self.postgres.stop()
        if not self._given_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def print_flush(message: str) -> None:
    print(message, flush=True)
    sys.stdout.flush()
