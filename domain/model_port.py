"""The model port: what the rest of the service needs from a model, free of TensorFlow.

Output kinds:
- "vector": the model emits K >= 2 scores per input (e.g. softmax probabilities);
  the likely class is the index of the largest score (the first one on a tie).
- "scalar": the model emits one probability p per input (sigmoid); the likely class is 1 when
  p >= 0.5 and 0 otherwise. Its output row is [p].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

import msgspec
import numpy as np

OutputKind = Literal["vector", "scalar"]
SCALAR_THRESHOLD = 0.5
# Every class's probability is recorded in PredictionMade, which must stay well inside an event's
# size bound (domain.chain.MAX_PAYLOAD_BYTES): 1,000 floats are at most ~25 KB of JSON.
MAX_CLASSES = 1000


class ModelInfo(msgspec.Struct, frozen=True):
    """Identity of the model that made a prediction; recorded in events."""

    name: str
    version: str
    sha256: str  # hex digest of the model artifact's bytes (the .keras file)
    input_shape: tuple[int, int, int]  # (H, W, C)
    output_kind: OutputKind
    num_classes: int  # K for a vector model, 2 for a scalar one
    device: str  # e.g. "/device:CPU:0"
    frameworks: dict[str, str]  # versions of tensorflow, keras, numpy, pillow


@runtime_checkable
class Model(Protocol):
    """A loaded model. Not thread-safe: call predict_batch from one thread only."""

    @property
    def info(self) -> ModelInfo: ...

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, H, W, C) -> float32 (N, K); K = 1 for a scalar model."""
        ...


def likely_class(output_row: Sequence[float] | np.ndarray) -> int:
    """The predicted class for one output row (see the module docstring for the rule)."""
    row = np.asarray(output_row, dtype=np.float64).reshape(-1)
    if row.size == 0:
        raise ValueError("an output row needs at least one value")
    if row.size == 1:
        return 1 if row[0] >= SCALAR_THRESHOLD else 0
    return int(np.argmax(row))


def is_finite(output_row: Sequence[float] | np.ndarray) -> bool:
    """False when any value is NaN or +-inf: such an output is a failed prediction."""
    return bool(np.isfinite(np.asarray(output_row, dtype=np.float64)).all())
