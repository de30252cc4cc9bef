"""Audit jobs on a real database: filing (one open job per piece of work, a bounded queue), claiming
(each job runs once among several runners), and closing what a command could not (a crash, a
timeout, a runner that is gone). The real commands run in tests/api/test_audit_jobs.py."""

from __future__ import annotations

import asyncio
import sys
import uuid

import pytest

from db.store import EventStore
from tests.factories import prediction_request
from tests.projection_support import append
from usecases.audit_jobs import AuditJobRunner, AuditJobs
from usecases.errors import NotFound, Overloaded

pytestmark = pytest.mark.timeout(60)


def python(code: str):  # a stand-in command: a child process that behaves as told
    return lambda job: [sys.executable, "-c", code]


async def test_the_same_open_work_is_one_job_and_the_queue_is_bounded(app_pool):
    store = EventStore(app_pool)
    made = [prediction_request() for _ in range(2)]
    for request in made:
        await append(store, request)
    jobs = AuditJobs(app_pool, queue_max=2)
    first, new = await jobs.request("verify", None, "alice")
    again, new_again = await jobs.request("verify", None, "bob")
    assert new and not new_again and again.id == first.id and again.requested_by == "alice"
    twin_requests = await asyncio.gather(*(jobs.request("reproduce", made[0].stream_id, None) for _ in range(5)))
    assert len({job.id for job, _ in twin_requests}) == 1 and sum(new for _, new in twin_requests) == 1
    with pytest.raises(Overloaded) as full:
        await jobs.request("reproduce", made[1].stream_id, None)
    assert full.value.retry_after_s > 1
    with pytest.raises(NotFound):
        await jobs.request("reproduce", uuid.uuid4(), None)
    assert [job.state for job in await jobs.recent()] == ["waiting", "waiting"]


async def test_each_job_runs_once_among_several_runners_and_the_command_files_its_verdict(app_pool, database, owner):
    jobs = AuditJobs(app_pool, queue_max=8)
    filed = [(await jobs.request("verify", None, None))[0]]
    for _ in range(3):  # verify jobs only open once the previous one closed: close them as filed
        await app_pool.execute("UPDATE audit_jobs SET started_at = now(), finished_at = now(), ok = true, "
                               "verdict = 'by hand' WHERE id = $1", filed[-1].id)
        filed.append((await jobs.request("verify", None, None))[0])
    # Each command appends its job's id to a table, then files a verdict as the real ones do.
    code = ("import asyncio, asyncpg, sys\n"
            "async def main():\n"
            f"    c = await asyncpg.connect({database.owner_dsn!r})\n"
            "    await c.execute(\"CREATE TABLE IF NOT EXISTS ran_jobs (job bigint)\")\n"
            "    await c.execute('INSERT INTO ran_jobs VALUES ($1)', int(sys.argv[1]))\n"
            "    await c.execute(\"UPDATE audit_jobs SET finished_at = now(), ok = true, verdict = 'fine' WHERE id = $1\","
            " int(sys.argv[1]))\n"
            "asyncio.run(main())\n")
    runners = [AuditJobRunner(app_pool, database.owner_dsn, timeout_s=30, poll_s=0.05,
                              command=lambda job: [sys.executable, "-c", code, str(job.id)]) for _ in range(3)]
    tasks = [asyncio.create_task(runner.run()) for runner in runners]
    try:
        for _ in range(200):
            if all(job.state != "waiting" and job.finished_at for job in await jobs.recent(kind="verify")):
                break
            await asyncio.sleep(0.1)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    ran = [row["job"] for row in await owner.fetch("SELECT job FROM ran_jobs ORDER BY job")]
    assert ran == [filed[-1].id]  # the three closed by hand never ran; the open one ran once
    (last,) = [job for job in await jobs.recent() if job.id == filed[-1].id]
    assert last.state == "passed" and last.verdict == "fine" and last.started_at is not None


async def test_a_crash_a_timeout_and_an_abandoned_job_are_failed_with_the_reason(app_pool, database):
    jobs = AuditJobs(app_pool, queue_max=8)
    crash, _ = await jobs.request("verify", None, None)
    runner = AuditJobRunner(app_pool, database.owner_dsn, timeout_s=30,
                            command=python("import sys; sys.stderr.write('boom: no such thing'); sys.exit(3)"))
    await runner.run_job(crash)
    crashed = await jobs.get(crash.id)
    assert crashed.state == "failed" and crashed.verdict == "the command exited with status 3: boom: no such thing"

    slow, _ = await jobs.request("verify", None, None)
    runner = AuditJobRunner(app_pool, database.owner_dsn, timeout_s=0.5, command=python("import time; time.sleep(30)"))
    started = asyncio.get_running_loop().time()
    await runner.run_job(slow)
    assert asyncio.get_running_loop().time() - started < 10
    assert (await jobs.get(slow.id)).verdict == "stopped after 0.5 s (AUDIT_JOB_TIMEOUT_S)"

    gone, _ = await jobs.request("verify", None, None)
    await app_pool.execute("UPDATE audit_jobs SET started_at = now() - interval '1 hour' WHERE id = $1", gone.id)
    await AuditJobRunner(app_pool, database.owner_dsn, timeout_s=30)._close_abandoned()
    abandoned = await jobs.get(gone.id)
    assert abandoned.state == "failed" and abandoned.verdict.startswith("abandoned")
