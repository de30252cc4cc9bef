"""inference.keras_model (TensorFlow adapter) with the committed default model and the tiny test models."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import msgspec
import numpy as np
import pytest

from domain.model_port import MAX_CLASSES, Model, ModelInfo, is_finite, likely_class
from domain.preprocessing import PreprocessSpec, preprocess
from inference.keras_model import KerasModel, load_model
from tests.fixtures import DIGITS, MODELS

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "saved_model" / "mnist_convnet.keras"
SCALAR_MODEL = MODELS / "scalar_32x32x3.keras"
NAN_MODEL = MODELS / "nan_out.keras"


def within_tolerance(actual: np.ndarray, reference: np.ndarray) -> bool:
    """The documented reproduction tolerance: |Δ| <= 1e-6 * max(1, |y|) elementwise."""
    return bool(np.all(np.abs(actual - reference) <= 1e-6 * np.maximum(1.0, np.abs(reference))))


def load_digits(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    paths = sorted(DIGITS.glob("*.png"))
    labels = np.array([int(path.stem.split("_")[1]) for path in paths])
    images = np.stack([preprocess(path.read_bytes(), spec).array for path in paths])
    return images, labels


@pytest.fixture(scope="module")
def mnist() -> KerasModel:
    model = load_model(DEFAULT_MODEL, max_batch=128)
    model.warm_up([1, 7, 64, 100])
    return model


@pytest.fixture(scope="module")
def digits(mnist) -> tuple[np.ndarray, np.ndarray]:
    return load_digits(PreprocessSpec(*mnist.info.input_shape))


def test_default_model_accuracy_on_held_out_fixture_digits(mnist, digits):
    images, labels = digits
    assert len(labels) == 100
    output = mnist.predict_batch(images)
    predicted = np.array([likely_class(row) for row in output])
    accuracy = float(np.mean(predicted == labels))
    assert accuracy >= 0.97, f"accuracy {accuracy:.2f} on the 100 held-out fixture digits"


def test_default_model_info(mnist):
    info = mnist.info
    assert isinstance(mnist, Model)
    assert info.name == "mnist_convnet"
    card = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    assert info.version == card["version"]
    assert info.sha256 == hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest() == card["sha256"]
    assert hashlib.sha256(mnist.artifact).hexdigest() == info.sha256
    assert info.input_shape == (28, 28, 1)
    assert (info.output_kind, info.num_classes) == ("vector", 10)
    assert re.fullmatch(r"/device:(CPU|GPU):\d+", info.device)
    import keras
    import PIL
    import tensorflow as tf

    assert info.frameworks == {
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "numpy": np.__version__, "pillow": PIL.__version__,
    }
    assert msgspec.json.decode(msgspec.json.encode(info), type=ModelInfo) == info


def test_default_model_outputs_probabilities(mnist, digits):
    output = mnist.predict_batch(digits[0][:10])
    assert output.dtype == np.float32 and output.shape == (10, 10)
    assert np.all(output >= 0) and np.allclose(output.sum(axis=1), 1.0, atol=1e-5)


def test_no_retracing_across_batch_sizes(mnist, digits):
    images = digits[0]
    for size in (1, 2, 3, 17, 64, 100):
        mnist.predict_batch(images[:size])
    assert mnist.trace_count == 1


def test_same_input_at_other_batch_sizes_and_positions_within_tolerance(mnist, digits):
    images = digits[0]
    alone = np.stack([mnist.predict_batch(images[i : i + 1])[0] for i in range(len(images))])
    in_full_batch = mnist.predict_batch(images)  # batch 100, every position
    shifted = mnist.predict_batch(np.roll(images, 37, axis=0)[:64])  # other size and positions
    for index in range(len(images)):
        assert within_tolerance(in_full_batch[index], alone[index]), index
        assert likely_class(in_full_batch[index]) == likely_class(alone[index])
    for position in range(64):
        index = (position - 37) % len(images)
        assert within_tolerance(shifted[position], alone[index]), (position, index)
        assert likely_class(shifted[position]) == likely_class(alone[index])


def test_same_batch_twice_is_bit_identical(mnist, digits):
    images = digits[0][:32]
    assert mnist.predict_batch(images).tobytes() == mnist.predict_batch(images).tobytes()


def test_bad_batches_are_refused(mnist):
    with pytest.raises(ValueError):
        mnist.predict_batch(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError):
        mnist.predict_batch(np.zeros((129, 28, 28, 1), np.float32))  # over max_batch
    with pytest.raises(ValueError):
        mnist.predict_batch(np.zeros((0, 28, 28, 1), np.float32))


def test_scalar_model_kind_and_likely_class_rule():
    model = load_model(SCALAR_MODEL, max_batch=8)
    info = model.info
    assert (info.output_kind, info.num_classes, info.input_shape) == ("scalar", 2, (32, 32, 3))
    digest = hashlib.sha256(SCALAR_MODEL.read_bytes()).hexdigest()
    assert info.version == digest[:12]  # no model card next to it
    batch = np.random.default_rng(0).random((5, 32, 32, 3), dtype=np.float32)
    batch[0] = 0.0
    output = model.predict_batch(batch)
    assert output.shape == (5, 1) and output.dtype == np.float32
    assert output[0, 0] == 0.5  # zero input: zero logit by construction, exactly on the threshold
    assert likely_class(output[0]) == 1
    for row in output:
        assert likely_class(row) == (1 if row[0] >= 0.5 else 0)


def test_likely_class_rules():
    assert likely_class([0.1, 0.7, 0.2]) == 1
    assert likely_class(np.array([0.3, 0.3, 0.1], np.float32)) == 0  # first on a tie
    assert likely_class([0.5]) == 1
    assert likely_class([0.4999]) == 0
    assert likely_class(np.array([[0.9]])) == 1
    with pytest.raises(ValueError):
        likely_class([])


def test_is_finite():
    assert is_finite([0.0, 1.0])
    assert not is_finite([0.0, float("nan")])
    assert not is_finite(np.array([float("inf")], np.float32))
    assert not is_finite([float("-inf")])


def test_nan_model_emits_nan_only_for_bright_inputs():
    model = load_model(NAN_MODEL, max_batch=4)
    batch = np.zeros((3, 28, 28, 1), np.float32)
    batch[1] = 1.0
    output = model.predict_batch(batch)
    assert is_finite(output[0]) and is_finite(output[2])
    assert np.all(np.isnan(output[1]))


def test_a_model_card_for_another_artifact_is_not_trusted(tmp_path):
    copy = tmp_path / "mnist_convnet.keras"
    shutil.copy(DEFAULT_MODEL, copy)
    card = json.loads(DEFAULT_MODEL.with_suffix(".json").read_text())
    copy.with_suffix(".json").write_text(json.dumps({**card, "sha256": "0" * 64}))
    info = load_model(copy, max_batch=1).info
    assert info.version == info.sha256[:12]
    copy.with_suffix(".json").write_text(json.dumps({"version": "7.1"}))
    assert load_model(copy, max_batch=1).info.version == "7.1"


def test_a_model_with_more_classes_than_an_event_can_record_is_refused(tmp_path):
    import keras

    wide = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(MAX_CLASSES + 1)])
    path = tmp_path / "wide.keras"
    wide.save(path)
    with pytest.raises(ValueError, match=f"at most {MAX_CLASSES} classes"):
        load_model(path, max_batch=1)


def test_batches_go_through_the_flat_call_and_answer_as_the_public_call_does(mnist, digits):
    """The adapter serves through the concrete function's flat call (it skips binding the
    arguments on every call) only after checking it against the public call; with the
    TensorFlow this project pins it must be in use, and every answer must be bit for bit the
    public call's."""
    assert mnist.uses_flat_call
    images, _ = digits
    tf = mnist._tf
    for size in (1, 7, 64):
        batch = images[:size].astype(np.float32)
        with tf.device(mnist.info.device):
            public = np.asarray(mnist._serve_concrete(tf.constant(batch)), dtype=np.float32)
        assert np.array_equal(mnist.predict_batch(batch), public.reshape(size, -1))


def test_without_a_working_flat_call_the_adapter_serves_through_the_public_call(mnist, monkeypatch):
    """A TensorFlow whose internal flat call is gone or changed must cost speed, not answers."""
    def gone(*_args, **_kwargs):
        raise AttributeError("_call_flat")

    monkeypatch.setattr(mnist._serve_concrete, "_call_flat", gone)
    assert mnist._fastest_exact_call() is mnist._serve_concrete

    def different(inputs, captured):
        return mnist._serve_concrete(inputs[0]) + 1e-3

    monkeypatch.setattr(mnist._serve_concrete, "_call_flat", different)
    assert mnist._fastest_exact_call() is mnist._serve_concrete
