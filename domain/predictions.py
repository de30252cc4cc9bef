"""The decision of what a prediction request records. Pure: no I/O, no TensorFlow."""

from __future__ import annotations

import msgspec

from domain.events import (
    Event,
    ModelRef,
    PredictionFailed,
    PredictionMade,
    PredictionRequested,
)
from domain.model_port import ModelInfo, is_finite, likely_class
from domain.preprocessing import Preprocessed
from domain.uploads import Upload


class InferenceResult(msgspec.Struct, frozen=True):
    """What the batcher answered for one input (output None: it failed)."""

    output: list[float] | None
    batch_size: int
    batch_index: int
    inference_ms: float
    queue_wait_ms: float
    error_code: str | None = None
    error_message: str | None = None


def model_ref(info: ModelInfo) -> ModelRef:
    return ModelRef(name=info.name, version=info.version, sha256=info.sha256)


def prediction_events(
    *,
    input_id: str,
    blob_sha256: str,
    upload: Upload,
    preprocessed: Preprocessed,
    model: ModelInfo,
    result: InferenceResult,
    idempotency_key: str | None,
) -> list[Event]:
    """PredictionRequested, then PredictionMade, or PredictionFailed when the model gave no
    usable answer (an error, or any non-finite value)."""
    ref = model_ref(model)
    requested = PredictionRequested(
        input_id=input_id,
        blob_sha256=blob_sha256,
        size_bytes=len(upload.content),
        filename=upload.filename,
        content_type=upload.content_type,
        image=preprocessed.image,
        preprocessing=msgspec.to_builtins(preprocessed.spec),
        tensor_sha256=preprocessed.tensor_sha256,
        model=ref,
        idempotency_key=idempotency_key,
    )
    output = result.output
    if output is None or not is_finite(output):
        return [
            requested,
            PredictionFailed(
                error_code=result.error_code or "non_finite_output",
                message=result.error_message or "the model's output contains NaN or infinity",
                model=ref,
                device=model.device,
            ),
        ]
    made = PredictionMade(
        output=output,
        likely_class=likely_class(output),
        model=ref,
        device=model.device,
        batch_size=result.batch_size,
        batch_index=result.batch_index,
        runtime=dict(model.frameworks),
        inference_ms=round(result.inference_ms, 3),
        queue_wait_ms=round(result.queue_wait_ms, 3),
    )
    return [requested, made]

