"""Micro-batching of concurrent predictions into one model call on one dedicated thread.

Policy: when the model is idle a submission is dispatched at once (no linger by default); while a
batch runs, new submissions queue up, and the next batch is everything queued when the previous
one finished (up to `max_batch`). Throughput therefore adapts to load without adding latency when
idle. An optional `max_wait_ms` lingers before a partial batch for more work to arrive.

Failure isolation: if a whole model call raises, each input of that batch is retried alone, so a
bad input fails only itself. A row with NaN or +-inf fails only its own caller. Both raise
InferenceError for that caller; everyone else in the batch gets an Outcome.

The model (TensorFlow) is only ever touched from the one inference thread. The asyncio side owns
the queue; the thread only sees a list of arrays and returns rows (through `run_in_executor`,
which hands them back with `call_soon_threadsafe`), and each caller's future is resolved on the
event loop. Warm the model up on that same thread: `await batcher.run_in_inference_thread(
model.warm_up)`. A MicroBatcher belongs to the event loop that started it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec
import numpy as np

from domain.model_port import Model, is_finite

logger = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFull(Exception):
    """The bounded queue is full: answer 503 with Retry-After."""


class BatcherClosed(QueueFull):
    """The batcher is shutting down and takes no new work (also a 503)."""


class InferenceError(Exception):
    """The model failed for this one input (an exception, or a non-finite output)."""

    def __init__(self, message: str, *, batch_size: int, batch_index: int, code: str = "inference_error") -> None:
        super().__init__(message)
        self.batch_size = batch_size
        self.batch_index = batch_index
        self.code = code  # "inference_error" (the model raised) or "non_finite_output"


class Outcome(msgspec.Struct):
    output: list[float]
    batch_size: int  # recorded: float kernels differ in the last bits with batch size/position
    batch_index: int
    queue_wait_ms: float
    inference_ms: float


class BatchMetrics(Protocol):
    def observe_batch(self, size: int, inference_s: float) -> None: ...
    def observe_wait(self, wait_s: float) -> None: ...


class NoMetrics:
    def observe_batch(self, size: int, inference_s: float) -> None:
        pass

    def observe_wait(self, wait_s: float) -> None:
        pass


@dataclass
class BatchStats:
    """In-memory BatchMetrics: batch size histogram and totals (for tests, benches, debugging)."""

    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    inference_s: float = 0.0
    wait_s: float = 0.0
    waits: int = 0

    def observe_batch(self, size: int, inference_s: float) -> None:
        self.batch_sizes[size] += 1
        self.inference_s += inference_s

    def observe_wait(self, wait_s: float) -> None:
        self.wait_s += wait_s
        self.waits += 1

    @property
    def batches(self) -> int:
        return sum(self.batch_sizes.values())

    @property
    def largest_batch(self) -> int:
        return max(self.batch_sizes, default=0)


@dataclass(slots=True)
class _Pending:
    array: np.ndarray
    future: asyncio.Future[Outcome]
    enqueued_at: float


@dataclass(slots=True)
class _Result:
    """One input's model output (or the exception that replaced it) and the call it came from."""

    row: np.ndarray | Exception
    batch_size: int  # of the model call that produced `row` (1 when retried alone)
    batch_index: int


class MicroBatcher:
    def __init__(
        self,
        model: Model,
        *,
        max_batch: int = 64,
        max_queue: int = 1024,
        max_wait_ms: float = 0.0,
        metrics: BatchMetrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be positive, max_wait_ms >= 0")
        self._model = model
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._max_wait_s = max_wait_ms / 1000.0
        self._metrics: BatchMetrics = metrics or NoMetrics()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._work_arrived = asyncio.Event()
        self._batch_filled = asyncio.Event()
        self._closing = False
        self._executor: ThreadPoolExecutor | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self.last_submit_at = float("-inf")  # time.monotonic() of the latest input

    def busy(self, within_s: float = 0.5) -> bool:
        """Whether an input arrived in the last `within_s` seconds (uploads are being served)."""
        return time.monotonic() - self.last_submit_at < within_s

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._dispatcher is not None and not self._dispatcher.done()

    async def start(self) -> None:
        if self._dispatcher is not None:
            raise RuntimeError("the batcher was already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._dispatcher = asyncio.get_running_loop().create_task(
            self._dispatch_forever(), name="micro-batcher"
        )

    async def run_in_inference_thread(self, function: Callable[..., T], *args: Any) -> T:
        """Run other work that touches the model (e.g. `warm_up`) on the inference thread."""
        if self._executor is None:
            raise RuntimeError("the batcher is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def submit(self, array: np.ndarray) -> Outcome:
        """Predict one preprocessed input (H, W, C). Raises QueueFull or InferenceError."""
        if self._closing:
            raise BatcherClosed("the batcher is shutting down")
        if not self.running:
            raise RuntimeError("the batcher is not running")
        if len(self._queue) >= self._max_queue:
            raise QueueFull(f"{len(self._queue)} predictions are already queued")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.last_submit_at = time.monotonic()
        self._queue.append(_Pending(array, future, time.perf_counter()))
        self._work_arrived.set()
        if len(self._queue) >= self._max_batch:
            self._batch_filled.set()
        return await future

    async def close(self) -> None:
        """Stop taking work, answer everything already submitted, then stop the thread."""
        self._closing = True
        self._work_arrived.set()
        self._batch_filled.set()
        if self._dispatcher is not None:
            await self._dispatcher
        if self._executor is not None:
            # Nothing is queued on the thread any more; don't block the loop while it exits.
            await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    async def _dispatch_forever(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._work_arrived.clear()
                await self._work_arrived.wait()
                continue
            if self._max_wait_s > 0 and len(self._queue) < self._max_batch and not self._closing:
                await self._linger()
            batch = self._take_batch()
            if not batch:
                continue
            try:
                await self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - a bug here must not strand callers or stop us
                logger.exception("micro-batcher failed a batch of %d", len(batch))
                for index, item in enumerate(batch):
                    if not item.future.done():
                        item.future.set_exception(InferenceError(
                            f"inference failed: {exc!r}", batch_size=len(batch), batch_index=index
                        ))

    async def _run_batch(self, batch: list[_Pending]) -> None:
        dispatched_at = time.perf_counter()
        results, inference_s = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._infer, [item.array for item in batch]
        )
        for item, result in zip(batch, results, strict=True):
            self._settle(item, result, dispatched_at - item.enqueued_at, inference_s)
        self._observe(batch, dispatched_at, inference_s)

    def _observe(self, batch: list[_Pending], dispatched_at: float, inference_s: float) -> None:
        # Metrics are best effort: a broken hook must not fail predictions.
        try:
            self._metrics.observe_batch(len(batch), inference_s)
            for item in batch:
                self._metrics.observe_wait(dispatched_at - item.enqueued_at)
        except Exception:  # noqa: BLE001
            logger.exception("batch metrics hook failed")

    async def _linger(self) -> None:
        self._batch_filled.clear()
        try:
            await asyncio.wait_for(self._batch_filled.wait(), self._max_wait_s)
        except TimeoutError:
            pass

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self._queue and len(batch) < self._max_batch:
            item = self._queue.popleft()
            if not item.future.done():  # a caller that gave up (cancelled) costs no inference
                batch.append(item)
        return batch

    def _infer(self, arrays: Sequence[np.ndarray]) -> tuple[list[_Result], float]:
        """On the inference thread: one model call, or one call per input if that fails."""
        started = time.perf_counter()
        size = len(arrays)
        try:
            output = self._model.predict_batch(np.stack(arrays))
            if len(output) != size:
                raise ValueError(f"the model returned {len(output)} rows for {size} inputs")
            results = [_Result(row, size, index) for index, row in enumerate(output)]
        except Exception as batch_error:  # noqa: BLE001 - isolate the input that caused it
            if size == 1:
                results = [_Result(batch_error, 1, 0)]
            else:
                results = [self._infer_alone(array) for array in arrays]
        return results, time.perf_counter() - started

    def _infer_alone(self, array: np.ndarray) -> _Result:
        try:
            return _Result(self._model.predict_batch(np.expand_dims(array, 0))[0], 1, 0)
        except Exception as exc:  # noqa: BLE001 - this input's own failure
            return _Result(exc, 1, 0)

    @staticmethod
    def _settle(item: _Pending, result: _Result, wait_s: float, inference_s: float) -> None:
        if item.future.done():
            return
        where = {"batch_size": result.batch_size, "batch_index": result.batch_index}
        if isinstance(result.row, Exception):
            error = InferenceError(
                f"inference failed: {type(result.row).__name__}: {result.row}", **where
            )
            error.__cause__ = result.row
            item.future.set_exception(error)
        elif not is_finite(result.row):
            item.future.set_exception(
                InferenceError(
                    "the model produced a non-finite output (NaN or infinity)", code="non_finite_output", **where
                )
            )
        else:
            item.future.set_result(Outcome(
                output=np.asarray(result.row, dtype=np.float32).reshape(-1).tolist(),
                queue_wait_ms=wait_s * 1000.0,
                inference_ms=inference_s * 1000.0,
                **where,
            ))
