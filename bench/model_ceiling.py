"""Model-only ceiling for `just bench`: KerasModel.predict_batch by batch size, as JSON.

    python bench/model_ceiling.py --sizes 1,2,4,8,16,32,64 [--min-seconds 0.6]

The same loading, serving function and thread settings as the service (`inference.keras_model`), timed
with bench/model_bench.py's `timed_calls`. Prints one JSON object: per batch size the median and
p90 seconds per call and images/s at the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

from model_bench import percentile, timed_calls  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "saved_model" / "mnist_convnet.keras")
    parser.add_argument("--sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--min-seconds", type=float, default=0.6)
    parser.add_argument("--min-calls", type=int, default=20)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]

    from inference.keras_model import load_model

    model = load_model(args.model, max_batch=max(sizes))
    model.warm_up(sizes)
    import tensorflow as tf

    rng = np.random.default_rng(0)
    rows = []
    for size in sizes:
        batch = rng.random((size, *model.info.input_shape), dtype=np.float32)
        samples = timed_calls(lambda: model.predict_batch(batch), args.min_seconds, args.min_calls)
        median = statistics.median(samples)
        rows.append({
            "batch": size,
            "median_s": median,
            "p90_s": percentile(samples, 0.9),
            "images_per_s": size / median,
            "calls": len(samples),
        })
    print(json.dumps({
        "model": {"name": model.info.name, "version": model.info.version, "sha256": model.info.sha256,
                  "device": model.info.device},
        "tensorflow": tf.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "trace_count": model.trace_count,
        "sizes": rows,
    }))


if __name__ == "__main__":
    main()
