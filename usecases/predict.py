"""The prediction use case: upload → preprocess → micro-batcher → group commit.

It raises domain and store errors (`Rejected`, `Overloaded`, `DatabaseUnavailable`,
`IdempotencyKeyReused`, …); the HTTP edge turns them into problem details.

A 2xx is only answered for events that have committed; everything before the commit is undone by
simply not appending (nothing is written before the one transaction).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from db.group_commit import GroupCommitter
from db.store import (
    AppendRequest,
    Committed,
    EventStore,
    IdempotencyKeyReused,
    Replayed,
    StoredEvent,
)
from domain.model_port import ModelInfo
from domain.predictions import InferenceResult, prediction_events
from domain.preprocessing import (
    OpenedImage,
    Preprocessed,
    PreprocessSpec,
    decode_opened,
    open_image,
)
from domain.uploads import Upload, check_upload, request_fingerprint
from inference.batcher import InferenceError, MicroBatcher, QueueFull
from usecases.errors import Overloaded

log = logging.getLogger(__name__)


class Recorded(msgspec.Struct, frozen=True):
    """A prediction's committed stream, and the chain head that includes it."""

    events: list[StoredEvent]
    head_position: int
    head_hash: bytes
    replayed: bool = False


def _two_random_uuids() -> tuple[uuid.UUID, uuid.UUID]:
    """Random (version 4) ids for the prediction and its input, from one system call."""
    random = os.urandom(32)
    return uuid.UUID(bytes=random[:16], version=4), uuid.UUID(bytes=random[16:], version=4)


def _decode_and_digest(opened: OpenedImage, content: bytes, spec: PreprocessSpec) -> tuple[Preprocessed, bytes]:
    return decode_opened(opened, spec), hashlib.sha256(content).digest()


class PredictionService:
    def __init__(
        self,
        *,
        model: ModelInfo,
        spec: PreprocessSpec,
        batcher: MicroBatcher,
        committer: GroupCommitter,
        store: EventStore,
        decoder: ThreadPoolExecutor,
        inline_decode_max_pixels: int = 0,
        on_decode: Callable[[bool], None] | None = None,
        on_stage: Callable[[str, float], None] | None = None,
    ) -> None:
        self.model = model
        self.spec = spec
        self._batcher = batcher
        self._committer = committer
        self._store = store
        self._decoder = decoder
        self._inline_decode_max_pixels = inline_decode_max_pixels
        self._on_decode = on_decode
        self._on_stage = on_stage  # (stage, seconds) per request: decode, inference, record

    async def predict(self, upload: Upload, *, idempotency_key: str | None, metadata: dict[str, Any]) -> Recorded:
        """Raises `Rejected` for a bad upload, `Overloaded`, or the store's errors; an inference
        failure is recorded (PredictionFailed) and returned like a success."""
        started = time.perf_counter()
        check_upload(upload)
        fingerprint = request_fingerprint(upload) if idempotency_key else None
        if idempotency_key is not None:
            earlier = await self._earlier_answer(idempotency_key, fingerprint)
            if earlier is not None:
                return earlier

        preprocessed, digest = await self._decode(upload.content)
        decoded = time.perf_counter()

        try:
            outcome = await self._batcher.submit(preprocessed.array)
            result = InferenceResult(
                output=[float(v) for v in outcome.output],
                batch_size=outcome.batch_size,
                batch_index=outcome.batch_index,
                inference_ms=outcome.inference_ms,
                queue_wait_ms=outcome.queue_wait_ms,
            )
        except QueueFull as full:
            raise Overloaded(f"the inference queue is full: {full}") from None
        except InferenceError as error:
            log.warning("inference failed for one input: %s", error)
            result = InferenceResult(
                output=None,
                batch_size=error.batch_size,
                batch_index=error.batch_index,
                inference_ms=0.0,
                queue_wait_ms=0.0,
                error_code=error.code,
                error_message=str(error),
            )
        inferred = time.perf_counter()

        stream_id, input_id = _two_random_uuids()
        events = prediction_events(
            input_id=str(input_id),
            blob_sha256=digest.hex(),
            upload=upload,
            preprocessed=preprocessed,
            model=self.model,
            result=result,
            idempotency_key=idempotency_key,
        )
        metadata = {
            **metadata,
            "timings_ms": {
                "decode": round((decoded - started) * 1000, 3),
                "inference": round((inferred - decoded) * 1000, 3),
            },
        }
        request = AppendRequest(
            stream_id=stream_id,
            expected_version=0,
            events=events,
            metadata=metadata,
            blobs={digest: upload.content},
            idempotency_key=idempotency_key,
            request_sha256=fingerprint,
        )
        recorded = await self._record(request)
        if self._on_stage is not None:
            self._on_stage("decode", decoded - started)
            self._on_stage("inference", inferred - decoded)
            self._on_stage("record", time.perf_counter() - inferred)
        return recorded

    async def _decode(self, content: bytes) -> tuple[Preprocessed, bytes]:
        """Small images on the event loop, large ones on the decoder threads.

        Opening reads only the header, so the pixel count is known before anything is decoded.
        A digit-sized PNG decodes faster on the loop than a hand-off to a thread and back costs
        under load (BENCHMARKS.md, "Decisions"); a large one would stall every other request.
        """
        opened = open_image(content, self.spec)
        inline = opened.pixels <= self._inline_decode_max_pixels
        if self._on_decode is not None:
            self._on_decode(inline)
        if inline:
            return _decode_and_digest(opened, content, self.spec)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder, _decode_and_digest, opened, content, self.spec)

    async def _record(self, request: AppendRequest) -> Recorded:
        outcome = await self._committer.append(request)
        if isinstance(outcome, Committed):
            return Recorded(outcome.events, outcome.head_position, outcome.head_hash)
        if isinstance(outcome, Replayed):
            return await self._replay(outcome.stream_id)
        raise outcome

    async def _earlier_answer(self, key: str, fingerprint: bytes | None) -> Recorded | None:
        found = await self._store.find_idempotency_key(key)
        if found is None:
            return None
        request_sha256, stream_id = found
        if fingerprint is not None and request_sha256 != fingerprint:
            raise IdempotencyKeyReused(key)
        return await self._replay(stream_id)

    async def _replay(self, stream_id: uuid.UUID) -> Recorded:
        events = await self._store.read_stream(stream_id)
        head_position, head_hash = await self._store.head()
        return Recorded(events, head_position, head_hash, replayed=True)
