"""Reproduce: re-run a past prediction from the log alone and compare.

The recorded model is loaded by digest from the blob table (every served artifact is kept there
with a ModelRegistered event), the original bytes are preprocessed with the recorded parameters,
and the tensor's sha256 must match exactly. The output must match within
|Δ| ≤ 1e-6 · max(1, |y|) elementwise with the same likely class. The input is run at the recorded
batch size and position (zeros elsewhere), which usually reproduces the output bit for bit, and
alone at batch size 1.
"""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import asyncpg
import msgspec
import numpy as np

from db.store import EventStore
from domain.events import PredictionFailed, PredictionMade, PredictionRequested
from domain.model_port import likely_class
from domain.preprocessing import PreprocessSpec, preprocess
from usecases.errors import NotFound

TOLERANCE = 1e-6


class Report(msgspec.Struct):
    prediction_id: str
    tensor_identical: bool
    recorded_tensor_sha256: str
    tensor_sha256: str
    same_class: bool | None = None
    within_tolerance: bool | None = None
    bit_identical_at_recorded_batch: bool | None = None
    max_abs_difference: float | None = None
    status: str = "reproduced"
    detail: str = ""


def within_tolerance(recorded: np.ndarray, rerun: np.ndarray) -> bool:
    return bool(np.all(np.abs(recorded - rerun) <= TOLERANCE * np.maximum(1.0, np.abs(recorded))))


async def reproduce(owner_dsn: str, prediction_id: uuid.UUID) -> Report:
    pool = await asyncpg.create_pool(owner_dsn, min_size=1, max_size=2)
    try:
        store = EventStore(pool)
        events = [e.decode() for e in await store.read_stream(prediction_id)]
        if not events or not isinstance(events[0], PredictionRequested):
            raise NotFound("prediction_not_found", f"no prediction {prediction_id}")
        requested = events[0]
        outcome = events[1] if len(events) > 1 else None
        original = await store.read_blob(bytes.fromhex(requested.blob_sha256))
        artifact = await store.read_blob(bytes.fromhex(requested.model.sha256))
    finally:
        await pool.close()
    if original is None:
        return Report(str(prediction_id), False, requested.tensor_sha256, "", status="erased",
                      detail="the original bytes were erased; the prediction cannot be re-run")
    spec = msgspec.convert(requested.preprocessing, PreprocessSpec)
    tensor = preprocess(original, spec)
    report = Report(
        prediction_id=str(prediction_id),
        tensor_identical=tensor.tensor_sha256 == requested.tensor_sha256,
        recorded_tensor_sha256=requested.tensor_sha256,
        tensor_sha256=tensor.tensor_sha256,
    )
    if not report.tensor_identical:
        report.status, report.detail = "different", "preprocessing gave a different tensor"
        return report
    if artifact is None:
        report.status, report.detail = "model_missing", f"model {requested.model.sha256} is not in the blob table"
        return report
    if not isinstance(outcome, PredictionMade):
        report.detail = "the prediction failed when it was made: " + (
            outcome.message if isinstance(outcome, PredictionFailed) else "no outcome recorded"
        )
        return report

    from inference.keras_model import load_model

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{requested.model.name}.keras"
        path.write_bytes(artifact)
        model = load_model(path, max_batch=max(outcome.batch_size, 1))
    recorded = np.asarray(outcome.output, dtype=np.float32)
    alone = model.predict_batch(tensor.array[np.newaxis])[0]
    batch = np.zeros((outcome.batch_size, *tensor.array.shape), dtype=np.float32)
    batch[outcome.batch_index] = tensor.array
    in_place = model.predict_batch(batch)[outcome.batch_index]
    report.bit_identical_at_recorded_batch = bool(np.array_equal(in_place, recorded))
    report.max_abs_difference = float(np.max(np.abs(alone.astype(np.float64) - recorded)))
    report.within_tolerance = within_tolerance(recorded, alone) and within_tolerance(recorded, in_place)
    report.same_class = likely_class(alone) == outcome.likely_class == likely_class(in_place)
    if not (report.within_tolerance and report.same_class):
        report.status, report.detail = "different", "the model's output differs beyond the tolerance"
    return report
