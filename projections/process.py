"""The projection worker as a process runs it: the runner that keeps the read tables up to date,
and the signer of the chain heads it has applied (whichever process holds the projection lock
signs). The service (`PROJECTIONS=inline`) and `just project` both start it from here."""

from __future__ import annotations

import asyncio

from infra.settings import Settings
from projections.checkpoints import ChainHeadCheckpointer, load_or_create_key
from projections.worker import ProjectionRunner


class ProjectionWorker:
    def __init__(self, runner: ProjectionRunner, signer: ChainHeadCheckpointer) -> None:
        self.runner = runner
        self.signer = signer

    @classmethod
    async def start(cls, app_dsn: str, settings: Settings) -> "ProjectionWorker":
        key = await asyncio.to_thread(load_or_create_key, settings.checkpoint_key)
        signer = ChainHeadCheckpointer(
            app_dsn, settings.checkpoint_dir, key, interval_s=settings.checkpoint_interval_s
        )
        await signer.start()
        runner = ProjectionRunner(
            app_dsn,
            poll_interval_s=settings.projection_poll_s,
            coalesce_s=settings.projection_coalesce_s,
            batch_size=settings.projection_batch_size,
            lock_poll_s=settings.projection_lock_poll_s,
            connect_timeout_s=settings.connect_timeout_s,
            on_applied=signer.on_applied,
        )
        await runner.start()
        return cls(runner, signer)

    @property
    def is_active(self) -> bool:
        return self.runner.is_active

    async def stop(self) -> None:
        """Drain the batch in hand, then sign the last applied head."""
        await self.runner.stop()
        await self.signer.stop()
