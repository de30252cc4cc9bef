"""TensorFlow adapter for the model port (domain.model_port.Model).

TensorFlow is not thread-safe for our purposes, so a KerasModel is used from one thread at a time:
the micro-batcher's inference thread. Every call goes through one `tf.function` traced once with a
fixed input signature [None, H, W, C] float32, so no batch size ever retraces and there is no
per-call `model.predict` overhead (tens of milliseconds there, well under one here: BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from domain.model_port import MAX_CLASSES, ModelInfo

logger = logging.getLogger(__name__)


def configure_tensorflow(threads: int = 1) -> Any:
    """Import TensorFlow with its thread pools sized; returns the `tensorflow` module.

    Thread counts only take effect before TensorFlow's runtime initialises, so this must run
    before anything else touches TensorFlow. When it is too late, it logs and carries on.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        current = tf.config.threading.get_intra_op_parallelism_threads()
        if current != threads:
            logger.warning(
                "TensorFlow was initialised before its thread counts were set; "
                "running with intra-op=%s instead of %s", current, threads
            )
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            # Grab GPU memory as needed instead of all of it at start.
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass
    return tf


class KerasModel:
    """A loaded Keras model behind the `Model` protocol. Use from one thread at a time."""

    def __init__(
        self, keras_model: Any, info: ModelInfo, *, max_batch: int, tf: Any, artifact: bytes
    ) -> None:
        self._keras_model = keras_model
        self._info = info
        # The exact bytes that were loaded (sha256 == info.sha256): store these, not a re-read.
        self.artifact = artifact
        self.max_batch = max_batch
        height, width, channels = info.input_shape
        self._input_shape = info.input_shape
        self._device = info.device

        @tf.function(
            input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32)],
            autograph=False,
        )
        def serve(images):
            return keras_model(images, training=False)

        self._serve = serve
        # Calling the one concrete function skips tf.function's argument matching on every call
        # (BENCHMARKS.md, "Decisions").
        self._serve_concrete = serve.get_concrete_function()
        self._tf = tf
        self._call = self._fastest_exact_call()

    def _fastest_exact_call(self) -> Any:
        """The concrete function's flat call (`_call_flat`), when this TensorFlow has it and it
        answers a probe bit for bit as the public call does; the public call otherwise.

        The public call binds its arguments against the function's signature on every call, in
        Python holding the GIL (BENCHMARKS.md, "Decisions"); the flat call runs the same graph
        with the tensor and the captured variables as they are. It is TensorFlow's internal
        entry point, so it is checked, not assumed.
        """
        concrete, tf = self._serve_concrete, self._tf
        captured = concrete.captured_inputs

        def flat(images: Any) -> Any:
            return concrete._call_flat([images], captured)

        probe = tf.constant(np.linspace(0.0, 1.0, 2 * int(np.prod(self._input_shape)), dtype=np.float32)
                            .reshape(2, *self._input_shape))
        try:
            with tf.device(self._device):
                exact = np.array_equal(np.asarray(flat(probe)), np.asarray(concrete(probe)))
        except Exception as error:  # noqa: BLE001 - any failure means: use the public call
            logger.info("serving through the public call: the flat call failed (%r)", error)
            return concrete
        if not exact:
            logger.warning("serving through the public call: the flat call's output differs")
            return concrete
        return flat

    @property
    def uses_flat_call(self) -> bool:
        return self._call is not self._serve_concrete

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def trace_count(self) -> int:
        """How many times the serving function was traced (1 after the first call, then stays)."""
        return int(self._serve.experimental_get_tracing_count())

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, H, W, C) -> float32 (N, K); a scalar model gives (N, 1)."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self._input_shape:
            raise ValueError(f"expected a batch (N, {self._input_shape}), got {batch.shape}")
        if not 1 <= batch.shape[0] <= self.max_batch:
            raise ValueError(f"batch size must be 1..{self.max_batch}, got {batch.shape[0]}")
        with self._tf.device(self._device):
            output = self._call(self._tf.constant(batch))
        return np.asarray(output, dtype=np.float32).reshape(batch.shape[0], -1)

    def warm_up(self, batch_sizes: Iterable[int] | None = None) -> None:
        """Run each batch size once so the first real requests pay no tracing or setup cost."""
        if batch_sizes is None:
            batch_sizes = sorted({*(2**i for i in range(self.max_batch.bit_length())), self.max_batch})
        for size in batch_sizes:
            self.predict_batch(np.zeros((size, *self._input_shape), dtype=np.float32))


def load_model(path: str | os.PathLike[str], *, max_batch: int = 64, threads: int = 1) -> KerasModel:
    """Load a `.keras` file; its digest is taken from the very bytes that get loaded."""
    path = Path(path)
    if max_batch < 1:
        raise ValueError("max_batch must be positive")
    tf = configure_tensorflow(threads)
    import keras
    import PIL

    artifact = path.read_bytes()
    digest = hashlib.sha256(artifact).hexdigest()
    # Load from a private copy so a file replaced between hashing and loading (a retrain in
    # place) cannot make the recorded digest describe a different model.
    with tempfile.TemporaryDirectory(prefix="model-") as scratch:
        private_copy = Path(scratch) / f"{path.stem}.keras"
        private_copy.write_bytes(artifact)
        keras_model = keras.models.load_model(private_copy, compile=False)

    input_shape = _input_shape(keras_model, path)
    device = "/device:GPU:0" if tf.config.list_physical_devices("GPU") else "/device:CPU:0"
    probe = _probe_output(keras_model, input_shape, device, tf)
    output_width = int(np.prod(probe.shape[1:])) if probe.ndim > 1 else 1
    if probe.ndim > 2 or output_width < 1:
        raise ValueError(f"{path}: output must be (N, K) or (N,), got {tuple(probe.shape)}")
    if output_width > MAX_CLASSES:
        raise ValueError(f"{path}: {output_width} outputs; at most {MAX_CLASSES} classes are served (each is recorded)")
    output_kind = "vector" if output_width > 1 else "scalar"

    info = ModelInfo(
        name=path.stem,
        version=_version(path, digest),
        sha256=digest,
        input_shape=input_shape,
        output_kind=output_kind,
        num_classes=output_width if output_kind == "vector" else 2,
        device=_canonical_device(probe.device) or device,
        frameworks={
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        },
    )
    logger.info("loaded model %s %s (%s) on %s", info.name, info.version, digest[:12], info.device)
    return KerasModel(keras_model, info, max_batch=max_batch, tf=tf, artifact=artifact)


def _input_shape(keras_model: Any, path: Path) -> tuple[int, int, int]:
    inputs = keras_model.inputs
    if len(inputs) != 1:
        raise ValueError(f"{path}: expected one input, the model has {len(inputs)}")
    shape = tuple(inputs[0].shape)
    if len(shape) != 4 or any(not isinstance(size, int) or size < 1 for size in shape[1:]):
        raise ValueError(f"{path}: expected an input (None, H, W, C) with fixed H, W, C; got {shape}")
    return shape[1], shape[2], shape[3]


def _probe_output(keras_model: Any, input_shape: tuple[int, int, int], device: str, tf: Any) -> Any:
    with tf.device(device):
        output = keras_model(tf.zeros((1, *input_shape), tf.float32), training=False)
    if isinstance(output, (list, tuple, dict)):
        raise ValueError("expected a model with a single output tensor")
    return output


def _canonical_device(device: str) -> str:
    # "/job:localhost/replica:0/task:0/device:CPU:0" -> "/device:CPU:0"
    marker = device.rfind("/device:")
    return device[marker:] if marker >= 0 else ""


def _version(path: Path, digest: str) -> str:
    """The version from the model card sidecar `<name>.json`, else the digest's first 12 hex."""
    card_path = path.with_suffix(".json")
    fallback = digest[:12]
    if not card_path.is_file():
        return fallback
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable model card %s: %s", card_path, exc)
        return fallback
    version = card.get("version") if isinstance(card, dict) else None
    if not isinstance(version, str) or not version:
        return fallback
    card_digest = card.get("sha256")
    if card_digest and card_digest != digest:
        # The card describes another artifact (a retrain without a new card): do not trust it.
        logger.warning("model card %s is for sha256 %s, not %s; using version %s",
                       card_path, card_digest, digest, fallback)
        return fallback
    return version
