"""The best peer: the same model served by BentoML with adaptive batching, for comparison only.

    bench/.bentoml-venv/bin/bentoml serve service:MnistPeer --working-dir bench/bentoml_peer --port 8002

What a careful BentoML user writes for "upload an image, get the class": one service, one
batchable API at the service's path taking the multipart field `file` (the same request
bench/upload.lua sends to the service; it answers 200 where the service's 201 says it stored
something), BentoML's adaptive batching on and its defaults otherwise (workers, batch window and
size, timeouts, access log), the same `.keras` file from saved_model/. No storage at all: no event log, no
input bytes kept, nothing committed; the answer is the class and the probabilities.

It runs in its own environment (bench/.bentoml-venv, made by bench/bentoml_peer/venv.py from
requirements.txt beside this file): BentoML and its TensorFlow never enter the service's
dependencies. Preprocessing is the reference's (Pillow to grayscale at the model's input size,
scaled to [0, 1]); inference is Keras' `predict_on_batch` on the whole adaptive batch (Keras'
call for one batch already in memory: `predict` would add its per-call data-adapter set-up).
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np
from PIL import Image

MODEL_PATH = Path(os.environ.get(
    "MODEL_PATH", Path(__file__).resolve().parent.parent.parent / "saved_model" / "mnist_convnet.keras"))


@bentoml.service
class MnistPeer:
    def __init__(self) -> None:
        import keras

        self.model = keras.models.load_model(MODEL_PATH)
        _, self.height, self.width, self.channels = self.model.input_shape
        for size in (1, 2, 4, 8, 16, 32, 64):  # warm up the batch sizes it will see
            self.model.predict_on_batch(np.zeros((size, self.height, self.width, self.channels), dtype="float32"))

    @bentoml.api(batchable=True, route="/prediction/")
    def predict(self, file: list[Image.Image]) -> list[dict]:
        batch = np.stack([
            np.asarray(image.convert("L").resize((self.width, self.height)), dtype="float32")
            .reshape(self.height, self.width, self.channels) / 255.0
            for image in file
        ])
        output = np.asarray(self.model.predict_on_batch(batch))
        return [
            {"likely_class": int(np.argmax(row)), "prediction": [float(value) for value in row]}
            for row in output
        ]
