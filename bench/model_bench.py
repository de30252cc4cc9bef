"""Model-only throughput and latency by batch size, through KerasModel.predict_batch.

    python bench/model_bench.py [--model saved_model/mnist_convnet.keras] [--sizes 1,2,4,...]
                                [--threads N] [--min-seconds 1.0] [--predict]

Prints a Markdown table: per batch size the median (and p90) milliseconds per call and the
images per second at the median. This is the ceiling the micro-batcher can reach; the HTTP
stack, preprocessing and the event store come on top. `--predict` adds one row for the naive
per-request `model.predict` at batch 1, for comparison. Also prints the preprocessing cost of
one 28x28 PNG, since the service pays it per request.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def timed_calls(call, min_seconds: float, min_calls: int) -> list[float]:
    """Seconds per call, repeated for at least min_seconds and min_calls."""
    samples: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(samples) < min_calls or time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "saved_model" / "mnist_convnet.keras")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="time spent per batch size")
    parser.add_argument("--min-calls", type=int, default=20)
    parser.add_argument("--predict", action="store_true", help="also time model.predict at batch 1")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    from domain.preprocessing import PreprocessSpec, preprocess
    from inference.keras_model import load_model

    model = load_model(args.model, max_batch=max(sizes), threads=args.threads)
    info = model.info
    model.warm_up(sizes)
    import tensorflow as tf

    print(f"model {info.name} {info.version} ({info.sha256[:12]}), input {info.input_shape}, "
          f"device {info.device}, intra-op threads {tf.config.threading.get_intra_op_parallelism_threads()}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"TensorFlow {tf.__version__}, {time.strftime('%Y-%m-%d')}")
    print()
    print("| batch | ms/call (median) | ms/call (p90) | images/s | ms/image |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    for size in sizes:
        batch = rng.random((size, *info.input_shape), dtype=np.float32)
        samples = timed_calls(lambda: model.predict_batch(batch), args.min_seconds, args.min_calls)
        median = statistics.median(samples)
        print(f"| {size} | {median * 1e3:.3f} | {percentile(samples, 0.9) * 1e3:.3f} | "
              f"{size / median:,.0f} | {median * 1e3 / size:.4f} |")
    if model.trace_count != 1:
        print(f"warning: the serving function was traced {model.trace_count} times")

    if args.predict:
        one = rng.random((1, *info.input_shape), dtype=np.float32)
        keras_model = model._keras_model  # the naive path, for comparison only
        samples = timed_calls(lambda: keras_model.predict(one, verbose=0), args.min_seconds, 10)
        print(f"\nmodel.predict at batch 1: {statistics.median(samples) * 1e3:.2f} ms/call (median)")

    height, width, channels = info.input_shape
    from PIL import Image

    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    png, spec = buffer.getvalue(), PreprocessSpec(height, width, channels)
    samples = timed_calls(lambda: preprocess(png, spec), args.min_seconds, 100)
    print(f"preprocess one {width}x{height} PNG: {statistics.median(samples) * 1e6:.0f} µs (median)")


if __name__ == "__main__":
    main()
