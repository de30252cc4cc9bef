"""Ground truth for past predictions: record a label (or a correction), withdraw the current one,
read the history. Labels are appended to the prediction's own stream as its next version, through
the same group commit as uploads; two labels sent at once for one prediction both land, in order
(the loser of the version check reads the stream again and goes next)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from db.group_commit import GroupCommitter
from db.store import AppendRequest, Committed, EventStore, VersionConflict
from domain.events import Event, ModelRegistered
from domain.labels import (
    LabelEntry,
    LabelTarget,
    label_history,
    label_target,
    record_label,
    withdraw_label,
)
from domain.streams import model_stream_id
from usecases.errors import NotFound, Overloaded
from usecases.predict import Recorded

# A label loses the version check only to another write to the same prediction that committed
# meanwhile; each retry sees that write, so a burst of N concurrent labels needs at most N tries.
MAX_ATTEMPTS = 32


class LabelService:
    def __init__(self, store: EventStore, committer: GroupCommitter) -> None:
        self._store = store
        self._committer = committer
        self._classes: dict[str, int] = {}  # model sha256 -> number of classes (never changes)

    async def record(
        self, prediction_id: uuid.UUID, *, label: object, source: object, note: object = None,
        actor: str | None = None, metadata: dict[str, Any],
    ) -> Recorded:
        """Raises NotFound for an unknown prediction, `Rejected` for a label it cannot have."""

        async def decide(target: LabelTarget) -> Event:
            classes = target.num_classes or await self._model_classes(target.model_sha256)
            return record_label(target, classes, label, source, note, actor)

        return await self._append(prediction_id, decide, metadata)

    async def withdraw(
        self, prediction_id: uuid.UUID, *, reason: object, actor: str | None = None, metadata: dict[str, Any]
    ) -> Recorded:
        """Raises NotFound, or `Rejected` (`no_current_label`) when nothing is current."""

        async def decide(target: LabelTarget) -> Event:
            return withdraw_label(target, reason, actor)

        return await self._append(prediction_id, decide, metadata)

    async def history(self, prediction_id: uuid.UUID) -> list[LabelEntry]:
        stored = await self._store.read_stream(prediction_id)
        events = [event.decode() for event in stored]
        if label_target(events) is None:
            raise NotFound("prediction_not_found", f"no prediction {prediction_id}")
        return label_history(events)

    async def _append(
        self, prediction_id: uuid.UUID, decide: Callable[[LabelTarget], Any], metadata: dict[str, Any]
    ) -> Recorded:
        for _ in range(MAX_ATTEMPTS):
            stored = await self._store.read_stream(prediction_id)
            target = label_target([event.decode() for event in stored])
            if target is None:
                raise NotFound("prediction_not_found", f"no prediction {prediction_id}")
            event = await decide(target)
            outcome = await self._committer.append(AppendRequest(
                stream_id=prediction_id, expected_version=target.version, events=[event], metadata=metadata,
            ))
            if isinstance(outcome, Committed):
                return Recorded(outcome.events, outcome.head_position, outcome.head_hash)
            if not isinstance(outcome, VersionConflict):
                raise outcome  # type: ignore[misc]
        raise Overloaded(f"prediction {prediction_id} is being labelled by too many writers at once; retry")

    async def _model_classes(self, sha256: str) -> int:
        if sha256 not in self._classes:
            registration = [event.decode() for event in await self._store.read_stream(model_stream_id(sha256))]
            if not registration or not isinstance(registration[0], ModelRegistered):
                raise NotFound("model_not_found", f"model {sha256} was never registered: its classes are unknown")
            self._classes[sha256] = registration[0].num_classes
        return self._classes[sha256]
