"""The composition root: builds the service's parts, starts them in order, stops them in reverse.

One way through the code: upload → domain → batcher → store → projection. Everything that must
hold across processes lives in PostgreSQL; what lives here is per process (model, batcher,
group committer, pools).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from db.group_commit import GroupCommitter
from db.store import CONNECTION_ERRORS, DatabaseUnavailable, EventStore
from domain.model_port import ModelInfo
from domain.preprocessing import PreprocessSpec
from projections import queries
from projections.checkpoints import ChainHeadCheckpointer, load_or_create_key
from projections.worker import ProjectionRunner
from service.batcher import MicroBatcher
from service.config import Settings
from service.database import create_pool
from service.metrics import Metrics
from service.predictions import PredictionService, register_model
from service.problems import Problem
from service.security import parse_api_keys

log = logging.getLogger(__name__)

WARM_UP_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
GC_GEN0_THRESHOLD = 10_000


class Runtime:
    def __init__(self, settings: Settings, app_dsn: str, *, run_projections: bool = True) -> None:
        self.settings = settings
        self.app_dsn = app_dsn
        self.run_projections = run_projections
        self.metrics = Metrics()
        self.api_keys = parse_api_keys(settings.api_keys)
        self.pool: asyncpg.Pool | None = None
        self.read_pool: asyncpg.Pool | None = None
        self.store: EventStore | None = None
        self.committer: GroupCommitter | None = None
        self.batcher: MicroBatcher | None = None
        self.predictions: PredictionService | None = None
        self.projector: ProjectionRunner | None = None
        self.checkpointer: ChainHeadCheckpointer | None = None
        self.model_info: ModelInfo | None = None
        self.model_registered = False
        self.model_error: str | None = None
        self.log_id: str = ""
        self._decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")
        self._background: list[asyncio.Task[Any]] = []

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        # min_size=0: the service starts (readiness red) while the database is down.
        self.pool = await create_pool(self.app_dsn, s, min_size=0)
        self.read_pool = (
            await create_pool(s.database_read_url, s, min_size=0) if s.database_read_url else self.pool
        )
        self.store = EventStore(self.pool)
        self.committer = GroupCommitter(self.store, max_group=s.max_group, on_group=self.metrics.observe_commit)
        self.committer.start()
        if self.run_projections:
            # Chain heads are signed by whichever process holds the projection lock.
            key = await asyncio.to_thread(load_or_create_key, s.checkpoint_key)
            self.checkpointer = ChainHeadCheckpointer(
                self.app_dsn, s.checkpoint_dir, key, interval_s=s.checkpoint_interval_s
            )
            await self.checkpointer.start()
            self.projector = ProjectionRunner(
                self.app_dsn, poll_interval_s=s.projection_poll_s, coalesce_s=s.projection_coalesce_s,
                on_applied=self.checkpointer.on_applied,
            )
            await self.projector.start()
        self._background.append(asyncio.create_task(self._bring_up_model(), name="model-warm-up"))
        self._background.append(asyncio.create_task(self._learn_log_id(), name="log-id"))

    async def stop(self) -> None:
        """Drain in order: inference, then pending commits, then the projector's batch."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.close()
        if self.committer is not None:
            await self.committer.close()
        if self.projector is not None:
            await self.projector.stop()
        if self.checkpointer is not None:
            await self.checkpointer.stop()
        self._decoder.shutdown(wait=True)
        if self.read_pool is not None and self.read_pool is not self.pool:
            await self.read_pool.close()
        if self.pool is not None:
            await self.pool.close()

    async def _bring_up_model(self) -> None:
        s = self.settings
        try:
            from service.model import load_model

            model = await asyncio.to_thread(load_model, s.model_path, max_batch=s.max_batch)
            batcher = MicroBatcher(
                model, max_batch=s.max_batch, max_queue=s.max_queue, max_wait_ms=s.batch_max_wait_ms,
                metrics=self.metrics,
            )
            await batcher.start()
            sizes = [size for size in WARM_UP_BATCH_SIZES if size <= s.max_batch]
            await batcher.run_in_inference_thread(model.warm_up, sizes)
            height, width, channels = model.info.input_shape
            spec = PreprocessSpec(height=height, width=width, channels=channels)
        except Exception as error:  # a model that cannot serve: readiness says why
            log.exception("the model at %s cannot be served", s.model_path)
            self.model_error = f"{type(error).__name__}: {error}"
            return
        self.batcher = batcher
        assert self.store is not None and self.committer is not None
        self.predictions = PredictionService(
            model=model.info, spec=spec, batcher=batcher, committer=self.committer, store=self.store,
            decoder=self._decoder, inline_decode_max_pixels=s.inline_decode_max_pixels,
            on_decode=self.metrics.observe_decode,
        )
        self.model_info = model.info
        # TensorFlow leaves a large heap of long-lived objects that every full collection would
        # walk again (measured: 15% of the event loop's time under load). Freeze what exists
        # after warm-up so the collector only looks at what requests allocate.
        gc.collect()
        gc.freeze()
        # Requests in flight hold a few thousand young objects that refcounting frees later, so
        # with the default gen-0 threshold (700) the collector ran every ~20 requests at 64
        # connections and walked live objects for nothing: 3% of the process's time (measured
        # 755 ms of gen-0 and gen-1 collections in ~25 s). Cycles are rare on the request path: collect later.
        gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
        await self._retry(lambda: register_model(self.store, model.info, model.artifact), "register the model")
        self.model_registered = True

    async def _learn_log_id(self) -> None:
        assert self.store is not None
        self.log_id = str(await self._retry(self.store.log_id, "read the log id"))

    async def _retry(self, action, what: str):
        delay = 0.1
        while True:
            try:
                return await action()
            except DatabaseUnavailable as error:
                log.warning("cannot %s yet (%s); retrying in %.1f s", what, error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ---- request helpers -----------------------------------------------------------------

    def require_model(self) -> ModelInfo:
        if self.model_info is None or not self.model_registered or not self.log_id:
            raise Problem(503, "warming_up", "the model is loading; retry shortly", headers={"Retry-After": "1"})
        return self.model_info

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[asyncpg.Connection]:
        assert self.read_pool is not None
        try:
            async with self.read_pool.acquire(timeout=self.settings.connect_timeout_s) as connection:
                yield connection
        except CONNECTION_ERRORS as error:
            raise DatabaseUnavailable(f"database unavailable: {error}") from error

    async def refresh_lag(self) -> queries.Lag:
        async with self.reading() as connection:
            lag = await queries.lag(connection)
        self.metrics.projection_lag_events.set(lag.events)
        self.metrics.projection_lag_seconds.set(lag.seconds)
        return lag
