"""The naive reference: the same job written the textbook way, for comparison only.

    REFERENCE_DATABASE_URL=postgresql://... python bench/reference_app.py --port 8001

What a typical first version of "upload an image, predict, store both" looks like, kept honest
(warm model, one database connection per worker thread, same model file, same answer shape):

- a synchronous handler (Litestar runs it on its worker-thread pool) served by uvicorn,
- Litestar's own multipart parsing into an `UploadFile`,
- Pillow to grayscale 28x28, scaled to [0, 1],
- `model.predict` per request (Keras' default thread settings),
- two separate commits with a synchronous driver (psycopg): insert the input row (with the
  original bytes), commit; insert the prediction row, commit (synchronous_commit on, the default).

There is no event log, hash chain, micro-batching or group commit here: only the two tables.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psycopg
from litestar import Litestar, get, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.params import Body
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MODEL_PATH = Path(os.environ.get("MODEL_PATH", REPO / "saved_model" / "mnist_convnet.keras"))
DATABASE_URL = os.environ.get("REFERENCE_DATABASE_URL", "")

SCHEMA = """
CREATE TABLE IF NOT EXISTS inputs (
    id uuid PRIMARY KEY,
    filename text,
    content_type text,
    content bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS predictions (
    id uuid PRIMARY KEY,
    input_id uuid NOT NULL REFERENCES inputs (id),
    output double precision[] NOT NULL,
    likely_class integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


def create_app():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    if not DATABASE_URL:
        raise SystemExit("set REFERENCE_DATABASE_URL")
    model = keras.models.load_model(MODEL_PATH)
    _, height, width, channels = model.input_shape
    model.predict(np.zeros((1, height, width, channels), dtype="float32"), verbose=0)  # warm up

    with psycopg.connect(DATABASE_URL) as connection:
        connection.execute(SCHEMA)

    local = threading.local()

    def database() -> psycopg.Connection:
        connection = getattr(local, "connection", None)
        if connection is None or connection.closed:
            connection = local.connection = psycopg.connect(DATABASE_URL)
        return connection

    @post("/prediction/", status_code=201, sync_to_thread=True)
    def predict(
        data: Annotated[UploadFile, Body(media_type=RequestEncodingType.MULTI_PART)],
    ) -> dict[str, Any]:
        content = data.file.read()
        image = Image.open(io.BytesIO(content)).convert("L").resize((width, height))
        x = np.asarray(image, dtype="float32").reshape(1, height, width, channels) / 255.0
        output = model.predict(x, verbose=0)[0]
        prediction = [float(value) for value in output]
        likely_class = int(np.argmax(output))

        input_id, prediction_id = uuid.uuid4(), uuid.uuid4()
        connection = database()
        connection.execute(
            "INSERT INTO inputs (id, filename, content_type, content) VALUES (%s, %s, %s, %s)",
            (input_id, data.filename, data.content_type, content),
        )
        connection.commit()
        connection.execute(
            "INSERT INTO predictions (id, input_id, output, likely_class) VALUES (%s, %s, %s, %s)",
            (prediction_id, input_id, prediction, likely_class),
        )
        connection.commit()
        return {
            "filename": data.filename,
            "contenttype": data.content_type,
            "prediction": prediction,
            "likely_class": likely_class,
            "input_id": str(input_id),
            "prediction_id": str(prediction_id),
        }

    @get("/health", sync_to_thread=False)
    def health() -> dict[str, str]:
        return {"status": "ready"}

    return Litestar(route_handlers=[predict, health], request_max_body_size=10 * 1024 * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import uvicorn

    uvicorn.run(create_app(), host=args.host, port=args.port, access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
