"""inference.batcher: batching, isolation of failures, bounded queue, draining on close."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from domain.model_port import ModelInfo, likely_class
from domain.preprocessing import PreprocessSpec, preprocess
from inference.batcher import (
    BatchStats,
    BatcherClosed,
    InferenceError,
    MicroBatcher,
    Outcome,
    QueueFull,
)
from inference.keras_model import KerasModel, load_model
from tests.fixtures import DIGITS, MODELS

REPO = Path(__file__).resolve().parents[2]


def within_tolerance(actual, reference) -> bool:
    actual, reference = np.asarray(actual), np.asarray(reference)
    return bool(np.all(np.abs(actual - reference) <= 1e-6 * np.maximum(1.0, np.abs(reference))))


@pytest.fixture(scope="module")
def mnist() -> KerasModel:
    model = load_model(REPO / "saved_model" / "mnist_convnet.keras", max_batch=64)
    model.warm_up()
    return model


@pytest.fixture(scope="module")
def nan_model() -> KerasModel:
    return load_model(MODELS / "nan_out.keras", max_batch=64)


@pytest.fixture(scope="module")
def digit_images() -> np.ndarray:
    spec = PreprocessSpec(28, 28, 1)
    return np.stack([preprocess(p.read_bytes(), spec).array
                     for p in sorted(DIGITS.glob("*.png"))])


class FakeModel:
    """A model port double: output = [sum of the input]; raises on a poisoned input (-1 first
    pixel) when it is in the batch; optionally slow so batches can pile up behind it."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.batch_sizes: list[int] = []
        self.threads: set[str] = set()
        self.info = ModelInfo(
            name="fake", version="1", sha256="0" * 64, input_shape=(2, 2, 1),
            output_kind="scalar", num_classes=2, device="/device:CPU:0", frameworks={},
        )

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.batch_sizes.append(len(batch))
        if self.delay_s:
            time.sleep(self.delay_s)
        if np.any(batch[:, 0, 0, 0] == -1):
            raise ValueError("poisoned input")
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True).astype(np.float32)


def fake_input(value: float) -> np.ndarray:
    return np.full((2, 2, 1), value, np.float32)


async def test_200_concurrent_callers_each_get_their_own_row(mnist, digit_images):
    rng = np.random.default_rng(0)
    inputs = np.concatenate([digit_images, rng.random((100, 28, 28, 1), dtype=np.float32)])
    # Reference: each input alone, computed before the batcher owns the model.
    reference = [mnist.predict_batch(array[None])[0] for array in inputs]
    stats = BatchStats()
    batcher = MicroBatcher(mnist, max_batch=64, metrics=stats)
    await batcher.start()
    try:
        outcomes = await asyncio.gather(*(batcher.submit(array) for array in inputs))
    finally:
        await batcher.close()
    for outcome, expected in zip(outcomes, reference, strict=True):
        assert isinstance(outcome, Outcome)
        assert len(outcome.output) == 10
        assert within_tolerance(outcome.output, expected)
        assert likely_class(outcome.output) == likely_class(expected)
        assert 0 <= outcome.batch_index < outcome.batch_size <= 64
        assert outcome.queue_wait_ms >= 0 and outcome.inference_ms > 0
    assert sum(size * count for size, count in stats.batch_sizes.items()) == 200
    assert stats.largest_batch > 1, stats.batch_sizes
    assert stats.largest_batch <= 64
    assert stats.waits == 200


async def test_idle_model_dispatches_at_once_without_gathering():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=64)
    await batcher.start()
    try:
        for value in range(5):
            outcome = await batcher.submit(fake_input(value))
            assert outcome.output == [4.0 * value] and outcome.batch_size == 1
    finally:
        await batcher.close()
    assert model.batch_sizes == [1] * 5
    assert model.threads and all(name.startswith("inference") for name in model.threads)


async def test_gathers_while_a_batch_is_running():
    model = FakeModel(delay_s=0.2)
    batcher = MicroBatcher(model, max_batch=8)
    await batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(fake_input(1)))
        await asyncio.sleep(0.05)  # the first call is now running on the inference thread
        rest = [asyncio.ensure_future(batcher.submit(fake_input(v))) for v in range(2, 12)]
        outcomes = await asyncio.gather(first, *rest)
    finally:
        await batcher.close()
    assert model.batch_sizes == [1, 8, 2]  # what queued behind the first call, up to max_batch
    assert [o.output[0] for o in outcomes] == [4.0 * v for v in range(1, 12)]


async def test_optional_linger_gathers_a_partial_batch():
    model = FakeModel()
    batcher = MicroBatcher(model, max_batch=8, max_wait_ms=300)
    await batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(fake_input(1)))
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(batcher.submit(fake_input(2)))
        outcomes = await asyncio.gather(first, second)
    finally:
        await batcher.close()
    assert model.batch_sizes == [2]
    assert [o.batch_size for o in outcomes] == [2, 2]


async def test_tiny_queue_bound_refuses_a_burst_with_queue_full():
    model = FakeModel(delay_s=0.05)
    batcher = MicroBatcher(model, max_batch=4, max_queue=2)
    await batcher.start()
    try:
        results = await asyncio.gather(
            *(batcher.submit(fake_input(v)) for v in range(50)), return_exceptions=True
        )
    finally:
        await batcher.close()
    refused = [r for r in results if isinstance(r, QueueFull)]
    answered = [r for r in results if isinstance(r, Outcome)]
    assert refused and answered
    assert len(refused) + len(answered) == 50
    for value, result in enumerate(results):
        if isinstance(result, Outcome):
            assert result.output == [4.0 * value]


async def test_non_finite_output_fails_only_its_own_caller(nan_model):
    inputs = [np.full((28, 28, 1), 1.0 if i % 3 == 0 else 0.1, np.float32) for i in range(30)]
    batcher = MicroBatcher(nan_model, max_batch=64)
    await batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(a) for a in inputs), return_exceptions=True)
    finally:
        await batcher.close()
    for index, result in enumerate(results):
        if index % 3 == 0:
            assert isinstance(result, InferenceError), result
            assert "non-finite" in str(result) and result.code == "non_finite_output"
        else:
            assert isinstance(result, Outcome), result
            assert np.allclose(result.output, 0.1)
    # The failures shared a model call with successes.
    shared = {(r.batch_size) for r in results if isinstance(r, InferenceError)}
    assert any(isinstance(r, Outcome) and r.batch_size in shared and r.batch_size > 1
               for r in results)


async def test_a_raising_batch_is_retried_one_by_one():
    model = FakeModel(delay_s=0.05)
    batcher = MicroBatcher(model, max_batch=16)
    await batcher.start()
    try:
        blocker = asyncio.ensure_future(batcher.submit(fake_input(0)))
        await asyncio.sleep(0.01)
        values = [1, -1, 2, 3, -1, 4]
        results = await asyncio.gather(
            *(batcher.submit(fake_input(v)) for v in values), return_exceptions=True
        )
        await blocker
    finally:
        await batcher.close()
    assert model.batch_sizes[:2] == [1, 6]  # the blocker, then the batch that raised
    assert model.batch_sizes[2:] == [1] * 6  # each input alone
    for value, result in zip(values, results, strict=True):
        if value == -1:
            assert isinstance(result, InferenceError) and "poisoned" in str(result)
            assert isinstance(result.__cause__, ValueError)
        else:
            assert isinstance(result, Outcome) and result.output == [4.0 * value]
            assert (result.batch_size, result.batch_index) == (1, 0)  # the call that produced it


async def test_close_drains_every_submitted_item_then_refuses_new_work():
    model = FakeModel(delay_s=0.02)
    batcher = MicroBatcher(model, max_batch=4)
    await batcher.start()
    pending = [asyncio.ensure_future(batcher.submit(fake_input(v))) for v in range(30)]
    await asyncio.sleep(0)  # let every submission reach the queue
    await batcher.close()
    assert all(task.done() for task in pending)
    assert [task.result().output[0] for task in pending] == [4.0 * v for v in range(30)]
    assert not batcher.running
    with pytest.raises(BatcherClosed):
        await batcher.submit(fake_input(1))
    assert issubclass(BatcherClosed, QueueFull)  # answered like overload: 503 + Retry-After


async def test_a_cancelled_caller_does_not_disturb_the_others():
    model = FakeModel(delay_s=0.05)
    batcher = MicroBatcher(model, max_batch=8)
    await batcher.start()
    try:
        blocker = asyncio.ensure_future(batcher.submit(fake_input(0)))
        await asyncio.sleep(0.01)
        tasks = [asyncio.ensure_future(batcher.submit(fake_input(v))) for v in range(1, 5)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        results = await asyncio.gather(blocker, *tasks, return_exceptions=True)
    finally:
        await batcher.close()
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r.output[0] for i, r in enumerate(results) if i != 2] == [0.0, 4.0, 12.0, 16.0]
    assert model.batch_sizes == [1, 3]  # the cancelled input was never computed


async def test_a_broken_metrics_hook_does_not_fail_predictions():
    class BrokenMetrics:
        def observe_batch(self, size, inference_s):
            raise RuntimeError("metrics backend down")

        def observe_wait(self, wait_s):
            raise RuntimeError("metrics backend down")

    batcher = MicroBatcher(FakeModel(), metrics=BrokenMetrics())
    await batcher.start()
    try:
        outcomes = await asyncio.gather(*(batcher.submit(fake_input(v)) for v in range(3)))
        assert [o.output[0] for o in outcomes] == [0.0, 4.0, 8.0]
        assert batcher.running
    finally:
        await batcher.close()


async def test_warm_up_runs_on_the_inference_thread():
    model = FakeModel()
    batcher = MicroBatcher(model)
    await batcher.start()
    try:
        name = await batcher.run_in_inference_thread(lambda: threading.current_thread().name)
    finally:
        await batcher.close()
    assert name.startswith("inference")
