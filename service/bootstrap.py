"""The composition root: builds the service's parts, starts them in order, stops them in reverse.

One way through the code: upload → domain → batcher → store → projection. Everything that must
hold across processes lives in PostgreSQL; what lives here is per process (model, batcher,
group committer, pools).

`Services.start` returns only once every part that can be built without the model exists, so
handlers receive a complete, typed `Services`. The model loads in the background (readiness
stays red meanwhile): `services.model.serving()` answers the warm `Serving`, or raises `NotReady`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar

import asyncpg
from litestar.di import NamedDependency
from litestar.params import SkipValidation

from db.group_commit import GroupCommitter
from db.replica import ReadRouter
from db.store import CONNECTION_ERRORS, DatabaseUnavailable, EventStore
from domain.model_port import ModelInfo
from domain.preprocessing import PreprocessSpec
from domain.quality import drift, quality_report
from inference.batcher import MicroBatcher
from infra.database import create_pool
from infra.settings import Settings
from projections import quality, queries, tree_store
from projections.process import ProjectionWorker
from service.metrics import Metrics
from usecases.errors import NotReady
from usecases.audit_jobs import AuditJobRunner, AuditJobs
from usecases.label_budget import IngestionBudget
from usecases.labels import LabelService
from usecases.models import register_model
from usecases.predict import PredictionService

log = logging.getLogger(__name__)

T = TypeVar("T")

WARM_UP_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Requests in flight hold a few thousand young objects that refcounting frees later; with the
# default gen-0 threshold (700) the collector walked them every few requests (BENCHMARKS.md).
GC_GEN0_THRESHOLD = 10_000


@dataclass(frozen=True, slots=True)
class Serving:
    """The model once it is warm and registered, and what predicting needs of it."""

    info: ModelInfo
    spec: PreprocessSpec
    predictions: PredictionService
    log_id: str


class ModelSlot:
    """Loads, warms and registers the model in the background, then holds it."""

    def __init__(self) -> None:
        self._serving: Serving | None = None
        self.error: str | None = None  # why the model cannot be served, for readiness
        self.loaded: ModelInfo | None = None  # warm, perhaps not registered yet
        self.batcher: MicroBatcher | None = None

    def serving(self) -> Serving:
        if self._serving is None:
            raise NotReady(self.error or "the model is loading; retry shortly")
        return self._serving

    @property
    def ready(self) -> bool:
        return self._serving is not None

    def serve(self, serving: Serving) -> None:
        """The model is warm and registered: predictions may start."""
        self._serving = serving


class LogIdentity:
    """The log's id (it never changes once the first migration wrote it), read once."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._id: str | None = None

    async def id(self) -> str:
        if self._id is None:
            self._id = str(await self._store.log_id())
        return self._id


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a request handler may use, complete once `start` returns."""

    settings: Settings
    metrics: Metrics
    pool: asyncpg.Pool
    read_pool: asyncpg.Pool
    reads: ReadRouter  # the replica once it has replayed what was committed, else the primary
    store: EventStore
    committer: GroupCommitter
    model: ModelSlot
    projection: ProjectionWorker | None  # None: the projection worker runs in another process
    labels: LabelService
    log: LogIdentity
    decoder: ThreadPoolExecutor
    background: list[asyncio.Task[None]]
    signed: tree_store.SignedSizeWatch  # for requests that wait for their checkpoint
    audit_jobs: AuditJobs

    @classmethod
    async def start(cls, settings: Settings, app_dsn: str, metrics: Metrics, *, run_projections: bool) -> "Services":
        s = settings
        # min_size=0: the service starts (readiness red) while the database is down.
        pool = await create_pool(app_dsn, s, min_size=0)
        read_pool = await create_pool(s.database_read_url, s, min_size=0) if s.database_read_url else pool
        reads = ReadRouter(
            pool, read_pool if read_pool is not pool else None, max_wait_s=s.replica_max_wait_s,
            retry_s=s.replica_retry_s, acquire_timeout_s=s.connect_timeout_s, on_read=metrics.observe_read,
        )
        store = EventStore(pool)
        committer = GroupCommitter(store, max_group=s.max_group, on_group=metrics.observe_commit)
        committer.start()
        projection = await ProjectionWorker.start(app_dsn, s) if run_projections else None
        # Jobs run where the owner's login is known (`just serve` puts it in the environment).
        runner = AuditJobRunner(pool, s.database_url, timeout_s=s.audit_job_timeout_s) \
            if s.audit_jobs and s.database_url else None
        model = ModelSlot()
        labels_budget = IngestionBudget(
            s.labels_share_while_uploading, lambda: model.batcher is not None and model.batcher.busy(),
            on_wait=metrics.observe_labels_wait,
        )
        services = cls(
            settings=s, metrics=metrics, pool=pool, read_pool=read_pool, reads=reads, store=store, committer=committer,
            model=model, projection=projection, labels=LabelService(store, committer, labels_budget), log=LogIdentity(store),
            decoder=ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode"), background=[],
            signed=tree_store.SignedSizeWatch(read_pool, acquire_timeout_s=s.connect_timeout_s),
            audit_jobs=AuditJobs(pool, queue_max=s.audit_job_queue_max, on_request=runner.wake if runner else None),
        )
        services.background.append(asyncio.create_task(services._bring_up_model(), name="model-warm-up"))
        if runner is not None:
            services.background.append(asyncio.create_task(runner.run(), name="audit-jobs"))
        return services

    async def stop(self) -> None:
        """Drain in order: inference, then pending commits, then the projector's batch."""
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        if self.model.batcher is not None:
            await self.model.batcher.close()
        await self.committer.close()
        if self.projection is not None:
            await self.projection.stop()
        self.decoder.shutdown(wait=True)
        if self.read_pool is not self.pool:
            await self.read_pool.close()
        await self.pool.close()

    async def _bring_up_model(self) -> None:
        s = self.settings
        try:
            from inference.keras_model import load_model

            model = await asyncio.to_thread(load_model, s.model_path, max_batch=s.max_batch, threads=s.inference_threads)
            batcher = MicroBatcher(
                model, max_batch=s.max_batch, max_queue=s.max_queue, max_wait_ms=s.batch_max_wait_ms,
                metrics=self.metrics,
            )
            await batcher.start()
            self.model.batcher = batcher
            sizes = [size for size in WARM_UP_BATCH_SIZES if size <= s.max_batch]
            await batcher.run_in_inference_thread(model.warm_up, sizes)
            height, width, channels = model.info.input_shape
            spec = PreprocessSpec(height=height, width=width, channels=channels)
        except Exception as error:  # a model that cannot serve: readiness says why
            log.exception("the model at %s cannot be served", s.model_path)
            self.model.error = f"{type(error).__name__}: {error}"
            return
        self.model.loaded = model.info
        # TensorFlow leaves a large heap of long-lived objects that every full collection would
        # walk again. Freeze what exists after warm-up so the collector only looks at what
        # requests allocate, and collect the young generation less often (cycles are rare on
        # the request path).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
        await self._retry(lambda: register_model(self.store, model.info, model.artifact), "register the model")
        log_id = await self._retry(self.log.id, "read the log id")
        predictions = PredictionService(
            model=model.info, spec=spec, batcher=batcher, committer=self.committer, store=self.store,
            decoder=self.decoder, inline_decode_max_pixels=s.inline_decode_max_pixels,
            on_decode=self.metrics.observe_decode,
            on_stage=self.metrics.observe_stage,
        )
        self.model.serve(Serving(info=model.info, spec=spec, predictions=predictions, log_id=log_id))

    async def _retry(self, action: Callable[[], Awaitable[T]], what: str) -> T:
        delay = 0.1
        while True:
            try:
                return await action()
            except DatabaseUnavailable as error:
                log.warning("cannot %s yet (%s); retrying in %.1f s", what, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for queries that sees every commit acknowledged before the call: the
        replica's (DATABASE_READ_URL) once it has replayed them, else the primary's (db/replica.py)."""
        try:
            async with self.reads.connection() as connection:
                yield connection
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"database unavailable: {error}") from error

    async def refresh_quality(self) -> None:
        """The quality gauges of every model used in the last day (from the kept quality cells)."""
        now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        windows = {"hour": now - timedelta(hours=1), "day": now - timedelta(days=1)}
        end = now + timedelta(hours=1)
        async with self.reading() as connection:
            position = await queries.tracked_position(connection)
            for sha256 in await quality.recently_used(connection, windows["day"]):
                found = await quality.models(connection, sha256)
                if not found:
                    continue
                (entry,) = found
                classes = entry.num_classes
                measured = {}
                for window, since in windows.items():
                    measured[window] = quality.total(await quality.bucket_counts(
                        connection, sha256, classes, position=position, current=True, since=since, until=end,
                        bucket="day",
                    ), classes)
                    report = quality_report(measured[window])
                    self.metrics.observe_quality(entry.name, entry.version, window, report.accuracy,
                                                 report.label_coverage)
                day_one = entry.first_day()
                if day_one is not None:
                    reference = quality.total(await quality.bucket_counts(
                        connection, sha256, classes, position=position, current=True, since=day_one,
                        until=day_one + timedelta(days=1), bucket="day",
                    ), classes)
                    shift = drift(reference, measured["day"]).predicted_class_psi
                    self.metrics.model_predicted_class_psi.labels(entry.name, entry.version).set(
                        float("nan") if shift is None else shift
                    )

    async def refresh_lag(self) -> queries.Lag:
        async with self.reading() as connection:
            lag = await queries.lag(connection)
        self.metrics.projection_lag_events.set(lag.events)
        self.metrics.projection_lag_seconds.set(lag.seconds)
        return lag

    async def refresh_replica(self) -> dict[str, Any] | None:
        """The replica's reachability and lag (None without DATABASE_READ_URL)."""
        try:
            status = await self.reads.status()
        except CONNECTION_ERRORS as error:  # the primary: /metrics and readiness say unavailable
            raise DatabaseUnavailable(f"database unavailable: {error}") from error
        if status is not None:
            self.metrics.replica_lag_bytes.set(status["lag_bytes"] if status["reachable"] else float("nan"))
        return status

    async def refresh_tlog(self) -> dict[str, Any]:
        """The transparency log's state for readiness and /metrics: integrated, signed, refusing."""
        async with self.reading() as connection:
            tree = await tree_store.tree_state(connection)
            latest = await tree_store.latest_checkpoint(connection)
            refusal = await tree_store.open_refusal(connection)
            now_us = await connection.fetchval("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
        age_s = None if latest is None else max(0.0, (now_us - latest.signed_at_us) / 1e6)
        self.metrics.tree_size.set(tree.size)
        self.metrics.checkpoint_size.set(0 if latest is None else latest.tree_size)
        self.metrics.checkpoint_age_seconds.set(float("nan") if age_s is None else age_s)
        self.metrics.checkpoint_refusing.set(1 if refusal else 0)
        return {
            # Refusing to sign means the stored tree no longer extends what was signed: an incident.
            "ok": refusal is None,
            "tree_size": tree.size,
            "checkpoint_size": None if latest is None else latest.tree_size,
            "checkpoint_age_seconds": age_s,
            "refusing": None if refusal is None else refusal.reason,
            "integrator": "on" if self.settings.tree_integrator else "off",
        }


# How handlers ask for the services: injected by name, and never validated (it is ours).
ServicesDependency = NamedDependency[SkipValidation[Services]]
