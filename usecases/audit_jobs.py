"""Audit work on request: `verify` (the whole log against its checkpoints and a replay) and
`reproduce` (one prediction re-run from the log), asked for over HTTP and run on the server.

A request files a job in `audit_jobs`; a runner in every service process claims waiting jobs one
at a time (`FOR UPDATE SKIP LOCKED`: each job runs once, wherever it was asked for) and runs the
same command an operator would (`python -m cli verify --job N`, `python -m cli reproduce ID --job
N`) as a child process on the owner's login, which verification needs and the service's own role
never has. The command files its own verdict; the runner closes the job itself only when the
command could not (it crashed or ran out of time: a job is bounded by `AUDIT_JOB_TIMEOUT_S`). A
request while the same job waits or runs gets that job instead of a second one, and a full queue
is refused (overload: retry later).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

import asyncpg
import msgspec

from usecases.errors import NotFound, Overloaded

log = logging.getLogger(__name__)

Kind = Literal["verify", "reproduce"]
STDERR_KEPT = 2000  # characters of a failed command's error output kept in its verdict
# A job started this long after its own timeout and still open was run by a process that is gone.
ABANDONED_GRACE_S = 60.0

_COLUMNS = "id, kind, subject, requested_by, requested_at, started_at, finished_at, ok, verdict, report"


class AuditJob(msgspec.Struct, frozen=True):
    id: int
    kind: Kind
    state: Literal["waiting", "running", "passed", "failed"]
    prediction_id: uuid.UUID | None  # the subject of a reproduce job
    requested_by: str | None  # the API key's name, 'cli' for a command run by hand
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    ok: bool | None
    verdict: str | None  # one line for people
    report: dict[str, Any] | None  # the command's own report (verify's or reproduce's)


def _job(row: asyncpg.Record) -> AuditJob:
    fields = dict(row)
    fields["prediction_id"] = fields.pop("subject")
    fields["report"] = msgspec.json.decode(fields["report"]) if fields["report"] is not None else None
    if fields["finished_at"] is not None:
        fields["state"] = "passed" if fields["ok"] else "failed"
    else:
        fields["state"] = "running" if fields["started_at"] is not None else "waiting"
    return AuditJob(**fields)


class AuditJobs:
    """Filing and reading jobs (the service's role)."""

    def __init__(self, pool: asyncpg.Pool, *, queue_max: int, on_request: asyncio.Event | None = None) -> None:
        self._pool = pool
        self._queue_max = queue_max
        self._on_request = on_request  # wakes this process's runner at once

    async def request(self, kind: Kind, subject: uuid.UUID | None, requested_by: str | None) -> tuple[AuditJob, bool]:
        """The job for this work: the open one if there is one, else a new one. True when new."""
        async with self._pool.acquire() as connection, connection.transaction():
            if kind == "reproduce":
                made = await connection.fetchval(
                    "SELECT 1 FROM events WHERE stream_id = $1 AND event_type = 'PredictionRequested'", subject)
                if made is None:
                    raise NotFound("prediction_not_found", f"no prediction {subject}")
            # One filer at a time, so two requests for the same work cannot both file it.
            await connection.execute("SELECT pg_advisory_xact_lock(hashtext('audit_jobs'))")
            open_jobs = await connection.fetch(
                f"SELECT {_COLUMNS} FROM audit_jobs WHERE finished_at IS NULL ORDER BY id")
            for row in open_jobs:
                if row["kind"] == kind and row["subject"] == subject:
                    return _job(row), False
            if len(open_jobs) >= self._queue_max:
                raise Overloaded(f"{len(open_jobs)} audit jobs are open already (AUDIT_JOB_QUEUE_MAX); try again later",
                                 retry_after_s=10)
            row = await connection.fetchrow(
                f"INSERT INTO audit_jobs (kind, subject, requested_by) VALUES ($1, $2, $3) RETURNING {_COLUMNS}",
                kind, subject, requested_by)
        if self._on_request is not None:
            self._on_request.set()
        return _job(row), True

    async def get(self, job_id: int) -> AuditJob:
        row = await self._pool.fetchrow(f"SELECT {_COLUMNS} FROM audit_jobs WHERE id = $1", job_id)
        if row is None:
            raise NotFound("audit_job_not_found", f"no audit job {job_id}")
        return _job(row)

    async def recent(self, *, kind: Kind | None = None, subject: uuid.UUID | None = None, finished: bool = False,
                     limit: int = 20) -> list[AuditJob]:
        """Newest first; `finished`: only the ones with a verdict."""
        rows = await self._pool.fetch(
            f"""SELECT {_COLUMNS} FROM audit_jobs
                WHERE ($1::text IS NULL OR kind = $1) AND ($2::uuid IS NULL OR subject = $2)
                  AND (NOT $3 OR finished_at IS NOT NULL)
                ORDER BY id DESC LIMIT $4""",
            kind, subject, finished, limit)
        return [_job(row) for row in rows]


def command_for(job: AuditJob) -> list[str]:
    if job.kind == "verify":
        return [sys.executable, "-m", "cli", "verify", "--job", str(job.id)]
    return [sys.executable, "-m", "cli", "reproduce", str(job.prediction_id), "--job", str(job.id)]


class AuditJobRunner:
    """Claims waiting jobs and runs each as a child process, bounded in time."""

    def __init__(self, pool: asyncpg.Pool, owner_dsn: str, *, timeout_s: float, poll_s: float = 5.0,
                 wake: asyncio.Event | None = None, command: Callable[[AuditJob], list[str]] = command_for) -> None:
        self._pool = pool
        self._command = command
        self._env = {**os.environ, "DATABASE_URL": owner_dsn}
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self.wake = wake or asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                await self._close_abandoned()
                while (job := await self._claim()) is not None:
                    await self.run_job(job)
            except Exception:  # a database outage, or a bug: the runner must outlive either
                log.exception("audit jobs: trying again in %.0f s", self._poll_s)
            try:
                await asyncio.wait_for(self.wake.wait(), self._poll_s)
            except TimeoutError:
                pass
            self.wake.clear()

    async def _claim(self) -> AuditJob | None:
        row = await self._pool.fetchrow(
            f"""UPDATE audit_jobs SET started_at = clock_timestamp()
                WHERE id = (SELECT id FROM audit_jobs WHERE started_at IS NULL ORDER BY id
                            FOR UPDATE SKIP LOCKED LIMIT 1)
                RETURNING {_COLUMNS}""")
        return None if row is None else _job(row)

    async def _close_abandoned(self) -> None:
        await self._pool.execute(
            """UPDATE audit_jobs SET finished_at = clock_timestamp(), ok = false,
                   verdict = 'abandoned: the process running it stopped before it finished'
               WHERE finished_at IS NULL AND started_at < clock_timestamp() - make_interval(secs => $1)""",
            self._timeout_s + ABANDONED_GRACE_S)

    async def run_job(self, job: AuditJob) -> None:
        log.info("audit job %d: %s %s", job.id, job.kind, job.prediction_id or "")
        process = await asyncio.create_subprocess_exec(
            *self._command(job), env=self._env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), self._timeout_s)
            failure = f"the command exited with status {process.returncode}: " + _tail(stderr)
        except TimeoutError:
            process.kill()
            await process.wait()
            failure = f"stopped after {self._timeout_s:g} s (AUDIT_JOB_TIMEOUT_S)"
        except asyncio.CancelledError:  # the service is stopping: the job must not outlive it
            process.kill()
            await process.wait()
            await asyncio.shield(self._close(job.id, "stopped: the service shut down while it ran"))
            raise
        await self._close(job.id, failure)

    async def _close(self, job_id: int, failure: str) -> None:
        """Closes the job as failed unless the command filed its verdict."""
        await self._pool.execute(
            "UPDATE audit_jobs SET started_at = coalesce(started_at, clock_timestamp()), "
            "finished_at = clock_timestamp(), ok = false, verdict = $2 "
            "WHERE id = $1 AND finished_at IS NULL", job_id, failure[:STDERR_KEPT + 100])


def _tail(stderr: bytes) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    return ("…" + text[-STDERR_KEPT:]) if len(text) > STDERR_KEPT else (text or "no error output")


async def file_verdict(owner_dsn: str, job_id: int | None, kind: Kind, subject: uuid.UUID | None, *, ok: bool,
                       verdict: str, report: Any, started_at: datetime) -> None:
    """How the commands record what they found: in their job, or (run by hand) as a job of their own."""
    connection = await asyncpg.connect(owner_dsn)
    try:
        encoded = msgspec.json.encode(report).decode()
        if job_id is not None:
            await connection.execute(
                "UPDATE audit_jobs SET finished_at = clock_timestamp(), ok = $2, verdict = $3, report = $4::jsonb "
                "WHERE id = $1 AND finished_at IS NULL", job_id, ok, verdict, encoded)
        else:
            await connection.execute(
                "INSERT INTO audit_jobs (kind, subject, requested_by, requested_at, started_at, finished_at, ok, "
                "verdict, report) VALUES ($1, $2, 'cli', $3, $3, clock_timestamp(), $4, $5, $6::jsonb)",
                kind, subject, started_at, ok, verdict, encoded)
    finally:
        await connection.close()
