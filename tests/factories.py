"""Valid domain events for tests that need a prediction stream but not a model."""

from __future__ import annotations

import hashlib
import uuid

import asyncpg
import pytest

from db.store import AppendRequest
from domain.events import ImageFacts, ModelRef, PredictionMade, PredictionRequested

MODEL = ModelRef(name="test-model", version="1", sha256="ab" * 32)


def prediction_request(
    *, stream_id: uuid.UUID | None = None, content: bytes | None = None, key: str | None = None, label: str = ""
) -> AppendRequest:
    stream_id = stream_id or uuid.uuid4()
    content = content if content is not None else uuid.uuid4().bytes
    digest = hashlib.sha256(content).digest()
    requested = PredictionRequested(
        input_id=str(uuid.uuid4()),
        blob_sha256=digest.hex(),
        size_bytes=len(content),
        filename=f"digit{label}.png",
        content_type="image/png",
        image=ImageFacts(format="PNG", mode="L", width=28, height=28),
        preprocessing={"height": 28, "width": 28, "channels": 1},
        tensor_sha256="cd" * 32,
        model=MODEL,
        idempotency_key=key,
    )
    made = PredictionMade(
        output=[0.1] * 9 + [0.1000000000000001],
        likely_class=9,
        model=MODEL,
        device="/device:CPU:0",
        batch_size=1,
        batch_index=0,
        runtime={"tensorflow": "test"},
        inference_ms=0.5,
        queue_wait_ms=0.0,
    )
    return AppendRequest(
        stream_id=stream_id,
        expected_version=0,
        events=[requested, made],
        metadata={"request_id": label or "r", "client": "tests"},
        blobs={digest: content},
        idempotency_key=key,
        request_sha256=hashlib.sha256(content).digest() if key else None,
    )


async def log_every_plan(connection: asyncpg.Connection, *, nested: bool = False) -> list[str]:
    """Have PostgreSQL send this session the plan of every statement it runs (auto_explain, as log
    messages); the list fills as they arrive. Skips the test on a server built without
    auto_explain (the embedded one), closing the connection first: CI's PostgreSQL 15 run
    checks the plans."""
    plans: list[str] = []
    connection.add_log_listener(lambda _connection, message: plans.append(message.message))
    try:
        await connection.execute("LOAD 'auto_explain'")
    except asyncpg.UndefinedFileError:
        await connection.close()
        pytest.skip("this PostgreSQL has no auto_explain module (the embedded server's build)")
    await connection.execute(
        "SET auto_explain.log_min_duration = 0; SET client_min_messages = log"
        + ("; SET auto_explain.log_nested_statements = on" if nested else "")
    )
    return plans
