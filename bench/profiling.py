"""`--profile`: one more run under py-spy, a flame graph and the event-loop thread's top frames."""

from __future__ import annotations

import asyncio
import collections
import re
import shutil
from pathlib import Path
from typing import Any

from bench.processes import Target
from bench.wrk import Bench


def py_spy() -> list[str]:
    found = shutil.which("py-spy")
    if found:
        return [found]
    uv = shutil.which("uv")
    if uv:
        return [uv, "tool", "run", "py-spy"]
    raise SystemExit("--profile needs py-spy (`pip install py-spy`) or uv")


async def profile(bench: Bench, target: Target, connections: int) -> dict[str, Any]:
    """One more run under py-spy: a flame graph, then raw stacks for the top frames."""
    spy = py_spy()
    svg = bench.results / f"profile-{connections}.svg"
    raw = bench.results / f"profile-{connections}.txt"
    window = max(8, int(bench.args.duration))

    async def record() -> None:
        for output, fmt in ((svg, "flamegraph"), (raw, "raw")):
            process = await asyncio.create_subprocess_exec(
                *spy, "record", "--pid", str(target.pid), "--duration", str(window // 2), "--rate", "250",
                "--nonblocking", "--threads", "--subprocesses", "--format", fmt, "--output", str(output),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            await process.wait()

    run = await bench.load(target, connections, duration=window + 2, during=record)
    run.target = "ours (profiled)"
    return {"svg": str(svg), "raw": str(raw), "run": run.summary(), **top_frames(raw)}


def top_frames(raw: Path, limit: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's collapsed stacks, for the event loop thread."""
    if not raw.exists():
        return {"error": "py-spy wrote no samples"}
    threads: collections.Counter[str] = collections.Counter()
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    loop_samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        # --subprocesses prefixes each sample with its process and the processes above it (a
        # command line may hold a ";", so skip to the thread frame).
        processes = []
        while frames and not frames[0].startswith("thread "):
            if frames[0].startswith("process "):
                processes.append(frames[0])
            frames = frames[1:]
        if not frames:
            continue
        thread = frames[0]
        child = len(processes) > 1  # the projection worker, a child of the profiled process
        threads[f"{_process_role(processes[-1])}: {thread}" if child else thread] += count
        if child or "MainThread" not in thread:  # the event loop is the profiled process's main thread
            continue
        loop_samples += count
        self_counts[_short(frames[-1])] += count
        for frame in {_short(frame) for frame in frames[1:]} - _ROOT_FRAMES:
            inclusive[frame] += count
    return {
        "threads": dict(threads.most_common()),
        "loop_samples": loop_samples,
        "self": [(frame, count / loop_samples) for frame, count in self_counts.most_common(limit)] if loop_samples else [],
        "inclusive": [(frame, count / loop_samples) for frame, count in inclusive.most_common(limit)] if loop_samples else [],
    }


_ROOT_FRAMES = {  # the chain every loop sample starts with: says nothing
    "_run_module_as_main (<frozen runpy>)", "_run_code (<frozen runpy>)", "<module> (cli/__main__.py)",
    "main (cli/__main__.py)", "main (cli/serve.py)", "_serve (cli/serve.py)", "run (uvicorn/main.py)",
    "Server.run (uvicorn/server.py)",
    "asyncio_run (uvicorn/_compat.py)", "Runner.run (asyncio/runners.py)",
    "RequestResponseCycle.run_asgi (http/httptools_impl.py)",
    "ProxyHeadersMiddleware.__call__ (middleware/proxy_headers.py)",
    # a worker process of WORKERS > 1
    "<module> (<string>)", "spawn_main (multiprocessing/spawn.py)", "_main (multiprocessing/spawn.py)",
    "BaseProcess._bootstrap (multiprocessing/process.py)", "BaseProcess.run (multiprocessing/process.py)",
    "subprocess_started (uvicorn/_subprocess.py)", "Process.target (supervisors/multiprocess.py)",
}


def _process_role(frame: str) -> str:
    return "projection worker" if "cli project" in frame else frame.split(":", 1)[0]


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    match = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    parts = Path(path).parts
    where = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{name} ({where})"
