"""The HTTP stack's ceiling: the service's upload route with inference and storage taken out.

    python bench/http_ceiling_app.py --port 8002

Same Litestar app settings and uvicorn settings as `python -m cli serve` (uvloop, httptools, no
access log), the same request-id/metrics middleware (`service.observability.Observed`), the same
route signature (guard, `Idempotency-Key` header, `filename` query) and the same body reading
(`service.uploads.read_body` + `parse_upload`: multipart or raw). It then answers 201 with a body
shaped like the service's, without decoding the image, running the model or touching a database.
The service's throughput can only approach this; its fraction of it is what inference, storage
and everything between cost on the event loop.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import uvicorn  # noqa: E402
from litestar import Litestar, Request, Response, get, post  # noqa: E402
from litestar.datastructures import State  # noqa: E402
from litestar.params import HeaderParameter, QueryParameter  # noqa: E402

from infra.logs import configure_json_logging  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.observability import Observed  # noqa: E402
from service.problems import EXCEPTION_HANDLERS  # noqa: E402
from service.uploads import parse_upload, read_body  # noqa: E402

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
BODY_READ_TIMEOUT_S = 30.0
_NO_PREDICTION = [0.1] * 10


class Accepted(msgspec.Struct, frozen=True):
    filename: str | None
    contenttype: str | None
    prediction: list[float]
    likely_class: int
    input_id: str
    prediction_id: str
    size_bytes: int


@post("/prediction/", status_code=201, opt={"scope": "predict"})  # as the service: no guard without keys
async def upload(
    request: Request,
    state: State,
    idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", required=False, max_length=255)] = None,
    filename: Annotated[str | None, QueryParameter(name="filename", required=False)] = None,
) -> Response[Accepted]:
    body = await read_body(request, limit=MAX_UPLOAD_BYTES, deadline_s=BODY_READ_TIMEOUT_S)
    received = parse_upload(request, body, filename)
    prediction_id = str(uuid.uuid4())
    answer = Accepted(
        filename=received.filename,
        contenttype=received.content_type,
        prediction=_NO_PREDICTION,
        likely_class=0,
        input_id=str(uuid.uuid4()),
        prediction_id=prediction_id,
        size_bytes=len(received.content),
    )
    return Response(answer, status_code=201, headers={"Location": f"/prediction/{prediction_id}"})


@get("/health")
async def health() -> dict[str, str]:
    return {"status": "ready"}


def create_app() -> Observed:
    metrics = Metrics()
    app = Litestar(
        route_handlers=[upload, health],
        state=State({"runtime": SimpleNamespace(api_keys={})}),
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=MAX_UPLOAD_BYTES,
        multipart_form_part_limit=16,
        logging_config=None,
    )
    return Observed(app, metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args()
    configure_json_logging("WARNING")
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
