"""OpenAPI documentation the handlers' signatures cannot express: error answers as problem
details, and the upload's two body forms (read by hand in service/uploads.py), with examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    RequestBody,
    Schema,
)

from service.problems import PROBLEM_MEDIA_TYPE

_IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/bmp", "image/tiff", "image/webp"]


def problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=dict[str, Any], description=description, media_type=PROBLEM_MEDIA_TYPE)


_PROBLEM_SCHEMA = Schema(
    type="object",  # type: ignore[arg-type]
    description="RFC 9457 problem details (extra members such as prediction_id or receipt may follow)",
    properties={
        "type": Schema(type="string"),  # type: ignore[arg-type]
        "title": Schema(type="string"),  # type: ignore[arg-type]
        "status": Schema(type="integer"),  # type: ignore[arg-type]
        "detail": Schema(type="string"),  # type: ignore[arg-type]
        "instance": Schema(type="string"),  # type: ignore[arg-type]
        "request_id": Schema(type="string"),  # type: ignore[arg-type]
    },
    required=["type", "title", "status", "detail"],
)


@dataclass
class ProblemOperation(Operation):
    """Every error answer is documented as application/problem+json (Litestar's generated 400
    would say application/json)."""

    def __post_init__(self) -> None:
        for status, response in (self.responses or {}).items():
            if isinstance(response, OpenAPIResponse) and status[:1] in ("4", "5"):
                response.content = {PROBLEM_MEDIA_TYPE: OpenAPIMediaType(schema=_PROBLEM_SCHEMA)}


_CREATED_EXAMPLE = {
    "filename": "7000_8.png",
    "contenttype": "image/png",
    "prediction": [1.2e-09, 3.4e-08, 2.1e-06, 4.5e-05, 1.1e-09, 2.2e-07, 6.0e-10, 1.8e-06, 0.99994, 8.7e-06],
    "likely_class": 8,
    "input_id": "0b6f3c1e-5d2a-4f4b-9a53-7f7f2b0f9e11",
    "prediction_id": "5a4f6f38-2d8e-4c5b-8f0e-3c2b1a09d7e4",
    "blob_sha256": "3f1c…e9",
    "model": {"name": "mnist_convnet", "version": "1.0.0", "sha256": "8a587a84…c0df", "device": "/device:CPU:0"},
    "receipt": {
        "log_id": "c2b4b7a0-1f1e-4a8e-9d43-2f6d0b5e7a10",
        "stream_id": "5a4f6f38-2d8e-4c5b-8f0e-3c2b1a09d7e4",
        "events": [
            {"position": 41, "stream_version": 1, "type": "PredictionRequested", "hash": "9e0d…41"},
            {"position": 42, "stream_version": 2, "type": "PredictionMade", "hash": "77ab…0c"},
        ],
        "head": {"position": 57, "hash": "1c2d…aa"},
    },
    "created_at": "2026-11-26T11:47:11.123456Z",
}
_PROBLEM_EXAMPLE = {
    "type": "urn:problem:unsupported_format",
    "title": "Unsupported media type",
    "status": 415,
    "detail": "the upload is not an image in an allowed format (PNG, JPEG, GIF, BMP, TIFF, WEBP)",
    "instance": "/prediction",
    "request_id": "4be1a8f0c3a54b0f8f6d2d9f5e1b7c2a",
}


@dataclass
class UploadOperation(ProblemOperation):
    """The upload body is read by hand (multipart or raw image); this documents both forms."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for status, response in (self.responses or {}).items():
            if not isinstance(response, OpenAPIResponse):
                continue
            for media in (response.content or {}).values():
                media.example = _CREATED_EXAMPLE if status == "201" else (_PROBLEM_EXAMPLE if status == "415" else None)
        binary = Schema(type="string", format="binary")  # type: ignore[arg-type]
        self.request_body = RequestBody(
            required=True,
            description="An image as the multipart field `file`, or the image itself as the body "
            "(name it with `?filename=` or a percent-encoded `X-Filename` header).",
            content={
                "multipart/form-data": OpenAPIMediaType(
                    schema=Schema(type="object", properties={"file": binary}, required=["file"])  # type: ignore[arg-type]
                ),
                **{media: OpenAPIMediaType(schema=binary) for media in [*_IMAGE_TYPES, "application/octet-stream"]},
            },
        )


_LABEL_BODY = Schema(
    type="object",  # type: ignore[arg-type]
    properties={
        "label": Schema(type="integer", minimum=0, description="a class of the model that made the prediction"),  # type: ignore[arg-type]
        "source": Schema(type="string", max_length=200, description="where the label comes from, e.g. a labelling batch"),  # type: ignore[arg-type]
        "note": Schema(type="string", max_length=2000),  # type: ignore[arg-type]
    },
    required=["label", "source"],
)


@dataclass
class LabelOperation(ProblemOperation):
    """The label body is read by hand (with the body deadline); this documents it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.request_body = RequestBody(
            required=True, description="The label and where it comes from",
            content={"application/json": OpenAPIMediaType(schema=_LABEL_BODY)},
        )


@dataclass
class BulkLabelOperation(ProblemOperation):
    """The bulk label body is read by hand (JSON array or NDJSON); this documents it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        item = Schema(
            type="object",  # type: ignore[arg-type]
            properties={"prediction_id": Schema(type="string", format="uuid"), **_LABEL_BODY.properties},  # type: ignore[arg-type, dict-item]
            required=["prediction_id", "label"],
        )
        self.request_body = RequestBody(
            required=True,
            description="Up to 10,000 items; an item without `source` takes the `source` query parameter",
            content={
                "application/json": OpenAPIMediaType(schema=Schema(type="array", items=item)),  # type: ignore[arg-type]
                "application/x-ndjson": OpenAPIMediaType(schema=item),
            },
        )
