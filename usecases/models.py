"""Keeping every served model: its artifact as a blob, with a ModelRegistered event."""

from __future__ import annotations

import hashlib

from db.store import AppendRequest, Committed, DatabaseUnavailable, EventStore
from domain.events import ModelRef, ModelRegistered
from domain.model_port import ModelInfo
from domain.streams import model_stream_id


async def register_model(store: EventStore, info: ModelInfo, artifact: bytes) -> bool:
    """Keep the served artifact by digest, with an event, so old predictions stay reproducible.

    Idempotent: the model's stream id is derived from its digest, so a second registration is a
    version conflict and appends nothing. Returns True when this call registered it.
    """
    digest = hashlib.sha256(artifact).digest()
    if digest.hex() != info.sha256:
        raise RuntimeError("the model file changed after it was loaded; restart to serve the new one")
    event = ModelRegistered(
        model=ModelRef(name=info.name, version=info.version, sha256=info.sha256),
        size_bytes=len(artifact),
        input_shape=list(info.input_shape),
        output_kind=info.output_kind,
        num_classes=info.num_classes,
        runtime=dict(info.frameworks),
    )
    (outcome,) = await store.append(
        [AppendRequest(stream_id=model_stream_id(info.sha256), expected_version=0, events=[event],
                       metadata={"device": info.device}, blobs={digest: artifact})]
    )
    if isinstance(outcome, DatabaseUnavailable):
        raise outcome
    return isinstance(outcome, Committed)
