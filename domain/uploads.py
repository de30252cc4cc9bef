"""What a valid upload is, before any image decoding. Pure."""

from __future__ import annotations

import hashlib

import msgspec

from domain.rejections import Rejected

MAX_FILENAME_BYTES = 1024
MAX_IDEMPOTENCY_KEY_LENGTH = 255


class Upload(msgspec.Struct, frozen=True):
    content: bytes
    filename: str | None
    content_type: str | None


def check_filename(filename: str | None) -> str | None:
    """Filenames are data, stored and returned verbatim; only what PostgreSQL text cannot hold,
    or what no file system would produce, is refused."""
    if filename is None:
        return None
    if "\x00" in filename:
        raise Rejected("invalid_filename", "the filename contains a NUL character")
    try:
        encoded = filename.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected("invalid_filename", "the filename is not valid Unicode") from None
    if len(encoded) > MAX_FILENAME_BYTES:
        raise Rejected("invalid_filename", f"the filename is longer than {MAX_FILENAME_BYTES} bytes")
    return filename


def check_content_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    if "\x00" in content_type or len(content_type) > 255 or not content_type.isprintable():
        raise Rejected("invalid_content_type", "the declared content type is malformed")
    return content_type


def check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH or not all(
        "!" <= ch <= "~" for ch in key
    ):
        raise Rejected(
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters",
        )
    return key


def check_upload(upload: Upload) -> Upload:
    if not upload.content:
        raise Rejected("empty_upload", "the uploaded file is empty")
    check_filename(upload.filename)
    check_content_type(upload.content_type)
    return upload


def request_fingerprint(upload: Upload) -> bytes:
    """Tells an idempotent retry (same bytes, name and type) from a reused key."""
    hasher = hashlib.sha256()
    for part in (upload.content, (upload.filename or "").encode(), (upload.content_type or "").encode()):
        hasher.update(len(part).to_bytes(8, "big"))
        hasher.update(part)
    return hasher.digest()


