"""`just cluster`: a PostgreSQL primary and streaming standby, NODES service nodes (default 3)
reading through the standby, and HAProxy in front, all on this machine, until Ctrl-C.

Prints `front: http://127.0.0.1:PORT` on a line of its own once everything is ready. Ctrl-C (or
SIGTERM) stops everything it started; a SIGKILL of this process still stops its children (each
one gets a parent-death signal).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from harness.cluster import Cluster, print_flush


def main() -> int:
    parser = argparse.ArgumentParser(prog="just cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=int(os.environ.get("NODES", "3")),
                        help="service nodes (default: NODES, else 3)")
    parser.add_argument("--data", type=Path, default=None,
                        help="keep the folders here and start them again as they were on the next run (default: a temporary folder, removed on exit)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("FRONT_PORT", "0")) or None,
                        help="HAProxy's port (default: FRONT_PORT, else a free one)")
    args = parser.parse_args()
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")

    def stop_here(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_here)
    cluster = Cluster(args.nodes, root=args.data, front_port=args.port)
    try:
        cluster.start(log=print_flush)
        print_flush(f"primary: {cluster.owner_dsn}")
        print_flush(f"standby: {cluster.postgres.standby.dsn('prediction_audit')}")
        print_flush(f"haproxy stats: http://127.0.0.1:{cluster.haproxy.stats_port}/stats")
        print_flush(f"front: {cluster.front_url}")
        signal.pause()
    except KeyboardInterrupt:
        print_flush("stopping: HAProxy, the nodes (draining), the standby, the primary")
    finally:
        # A second Ctrl-C (or the one `uv run` forwards) must not cut the orderly stop short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
    print_flush("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
