"""Why an input is refused: one exception type for the whole domain, with a stable code. Pure.

The code is part of the API (problem details answer `urn:problem:<code>`); which HTTP status each
code gets is decided once, at the HTTP edge (service/problems.py), so nothing here knows HTTP.
"""

from __future__ import annotations

from typing import Literal

RejectionCode = Literal[
    # the upload itself, before any decoding (domain/uploads.py)
    "empty_upload",
    "invalid_filename",
    "invalid_content_type",
    "invalid_idempotency_key",
    # the image (domain/preprocessing.py)
    "unsupported_format",  # no allowed decoder recognises the bytes
    "undecodable_image",  # an allowed format's signature, but the bytes do not decode
    "image_too_large",  # over the pixel budget (decompression bomb)
    "empty_image",
    "unsupported_mode",
    # ground truth (domain/labels.py)
    "invalid_label",  # not a class of the model that made the prediction
    "invalid_label_source",
    "invalid_label_note",
    "invalid_withdraw_reason",
    "no_current_label",  # a withdrawal with nothing to withdraw
    "invalid_labels_body",  # a bulk body that is not a JSON array or NDJSON of items
    "invalid_label_item",  # one bulk item that is not {prediction_id, label, source?, note?}
    "too_many_label_items",
]


class Rejected(ValueError):
    """The input cannot be accepted, for the reason `code` names; `message` says it to a person."""

    def __init__(self, code: RejectionCode, message: str) -> None:
        super().__init__(message)
        self.code: RejectionCode = code
        self.message = message

    def __repr__(self) -> str:
        return f"Rejected({self.code!r}, {self.message!r})"
