"""The projection worker as a process runs it: the runner that keeps the read tables up to date
and the tree integrator that keeps the Merkle tree and signs checkpoints (each elected on its own
lock, so different processes may hold the two). The service (`PROJECTIONS=inline`) and
`just project` both start it from here."""

from __future__ import annotations

from infra.settings import Settings
from projections.tree import TreeIntegrator
from projections.worker import ProjectionRunner


class ProjectionWorker:
    def __init__(self, runner: ProjectionRunner, integrator: TreeIntegrator | None) -> None:
        self.runner = runner
        self.integrator = integrator

    @classmethod
    async def start(cls, app_dsn: str, settings: Settings) -> "ProjectionWorker":
        common = dict(
            poll_interval_s=settings.projection_poll_s,
            lock_poll_s=settings.projection_lock_poll_s,
            connect_timeout_s=settings.connect_timeout_s,
            node=settings.node_name,
        )
        integrator = None
        if settings.tree_integrator:
            integrator = TreeIntegrator(
                app_dsn,
                key_path=settings.checkpoint_key,
                checkpoint_dir=settings.checkpoint_dir,
                origin=settings.log_origin,
                interval_s=settings.checkpoint_interval_s,
                batch_size=settings.tree_batch_size,
                **common,
            )
            await integrator.start()
        runner = ProjectionRunner(
            app_dsn,
            coalesce_s=settings.projection_coalesce_s,
            batch_size=settings.projection_batch_size,
            **common,
        )
        await runner.start()
        return cls(runner, integrator)

    @property
    def is_active(self) -> bool:
        return self.runner.is_active

    async def stop(self) -> None:
        """Drain the batches in hand; the integrator signs what it integrated."""
        await self.runner.stop()
        if self.integrator is not None:
            await self.integrator.stop()
