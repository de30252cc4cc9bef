"""Train the default model: a small ConvNet for 28x28 grayscale digits.

    python saved_model/train.py --data PATH.npz [--out saved_model/mnist_convnet.keras]
                                [--epochs N] [--seed S] [--version V]
    python saved_model/train.py --online [...]     # keras.datasets.mnist instead of an npz

The npz holds `x` (N, 28, 28) uint8 digits (white on black, MNIST convention) and `y` (N,)
uint8 labels. The last `--holdout` digits (default 1,000; the file is already shuffled) are
never trained on; the held-out accuracy reported in the metadata and the model card comes from
them, and the test fixtures under tests/fixtures/digits are drawn from them too. With `--online`
the split is Keras' own (60k train / 10k test).

Inputs are scaled exactly as `domain.preprocessing` does for a grayscale model (float32(x) / 255),
so what the network sees in training is what the service feeds it. Augmentation (small shifts,
rotations and zooms) runs in the input pipeline only; the saved model is plain layers, loadable by
stock `keras.models.load_model` without custom objects.

Writes the `.keras` file and a sidecar `<stem>.json` (version, trained_at, data, held-out
accuracy, parameter count) that `inference.keras_model.load_model` reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

NUM_CLASSES = 10
DEFAULT_OUT = Path(__file__).with_name("mnist_convnet.keras")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="npz with x (N,28,28) uint8 and y (N,) labels")
    source.add_argument("--online", action="store_true", help="use keras.datasets.mnist")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--holdout", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--version", default="1.0.0", help="model version recorded in events")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    return parser.parse_args(argv)


def load_data(args: argparse.Namespace):
    """Return (x_train, y_train, x_test, y_test, description of the data)."""
    if args.online:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
        return x_train, y_train, x_test, y_test, "keras.datasets.mnist (60,000 train / 10,000 test)"
    with np.load(args.data) as npz:
        x, y = npz["x"], npz["y"]
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8 or len(x) != len(y):
        sys.exit(f"{args.data}: expected x (N,28,28) uint8 and y (N,), got {x.shape} {x.dtype}")
    if not 0 < args.holdout < len(x):
        sys.exit(f"--holdout must be between 1 and {len(x) - 1}")
    cut = len(x) - args.holdout
    digest = hashlib.sha256(Path(args.data).read_bytes()).hexdigest()
    description = (
        f"{Path(args.data).name} (sha256 {digest}): indices 0..{cut - 1} train, "
        f"{cut}..{len(x) - 1} held out"
    )
    return x[:cut], y[:cut], x[cut:], y[cut:], description


def scale(images: np.ndarray) -> np.ndarray:
    # Same arithmetic as domain.preprocessing (scale="divide_255"), channel last.
    return (images.astype(np.float32) / np.float32(255.0))[..., np.newaxis]


def build_model(keras):
    """~33k parameters, ~1.1M multiply-adds per image: cheap enough for one CPU thread."""
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1), name="image"),
            layers.Conv2D(16, 3, padding="same", activation="relu"),
            layers.MaxPooling2D(2),  # 14x14
            layers.Conv2D(32, 3, activation="relu"),  # 12x12
            layers.MaxPooling2D(2),  # 6x6
            layers.Conv2D(64, 3, activation="relu"),  # 4x4
            layers.Flatten(),
            layers.Dropout(0.4),
            layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities"),
        ],
        name="mnist_convnet",
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Thread counts must be set before TensorFlow initialises.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import keras

    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()

    x_train, y_train, x_test, y_test, data_description = load_data(args)
    x_train, x_test = scale(x_train), scale(x_test)
    print(f"train {len(x_train)}  held out {len(x_test)}  data: {data_description}")

    # Augmentation lives only in the training pipeline, so the saved model stays plain layers.
    augment = keras.Sequential(
        [
            keras.layers.RandomRotation(0.03, fill_mode="constant", seed=args.seed),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=args.seed + 1),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=args.seed + 2),
        ]
    )
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train.astype(np.int32)))
        .shuffle(len(x_train), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size)
        .map(lambda x, y: (augment(x, training=True), y))
        .prefetch(2)
    )

    model = build_model(keras)
    model.summary()
    steps = args.epochs * int(np.ceil(len(x_train) / args.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=steps, alpha=0.02)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    model.fit(train_ds, epochs=args.epochs, validation_data=(x_test, y_test), verbose=2)
    training_seconds = time.perf_counter() - started

    probabilities = model.predict(x_test, batch_size=256, verbose=0)
    held_out_accuracy = float(np.mean(probabilities.argmax(axis=1) == y_test))
    print(f"held-out accuracy {held_out_accuracy:.4f} on {len(y_test)} digits "
          f"({training_seconds:.0f} s training)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Save an uncompiled copy: the optimizer state (2x the weights) is useless for serving.
    serving_model = build_model(keras)
    serving_model.set_weights(model.get_weights())
    serving_model.save(args.out)
    card = {
        "name": args.out.stem,
        "version": args.version,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": data_description,
        "train_examples": int(len(x_train)),
        "held_out_examples": int(len(x_test)),
        "held_out_accuracy": round(held_out_accuracy, 4),
        "params": int(model.count_params()),
        "epochs": args.epochs,
        "seed": args.seed,
        "training_seconds": round(training_seconds, 1),
        "input": "28x28x1 float32 in [0, 1] (float32(pixel) / 255), white digit on black",
        "output": "softmax over 10 classes (digits 0-9)",
        "sha256": hashlib.sha256(args.out.read_bytes()).hexdigest(),
        "frameworks": {"tensorflow": tf.__version__, "keras": keras.__version__,
                       "numpy": np.__version__},
    }
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
