"""Ground truth for past predictions: record a label (or a correction), many at once, withdraw the
current one, read the history. Labels are appended to the prediction's own stream as its next version, through
the same group commit as uploads; two labels sent at once for one prediction both land, in order
(the loser of the version check reads the stream again and goes next)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from db.group_commit import GroupCommitter
from db.store import (
    AppendRequest,
    Committed,
    DatabaseUnavailable,
    EventStore,
    IdempotencyKeyReused,
    Replayed,
    StoredEvent,
    VersionConflict,
)
from domain.events import Event, LabelBatchItem, LabelBatchRecorded, ModelRegistered
from domain.labels import (
    MAX_BULK_ITEMS,
    batch_events,
    LabelEntry,
    LabelTarget,
    label_history,
    label_target,
    parse_item,
    record_label,
    target_of,
    withdraw_label,
)
from domain.rejections import Rejected
from domain.streams import model_stream_id
from usecases.errors import NotFound, Overloaded
from usecases.label_budget import IngestionBudget, unlimited
from usecases.predict import Recorded

# A label loses the version check only to another write to the same prediction that committed
# meanwhile; each retry sees that write, so a burst of N concurrent labels needs at most N tries.
MAX_ATTEMPTS = 32
# Planning a 10,000-item request takes the event loop for about 0.2 s; it hands it back this often.
YIELD_EVERY = 1000


def _named_prediction(raw: object) -> str | None:
    """The prediction a refused item names, when it names one that parses (whatever else a
    client sent is not copied into the log)."""
    try:
        return str(uuid.UUID(str(raw["prediction_id"]))) if isinstance(raw, dict) else None  # type: ignore[index]
    except (KeyError, ValueError):
        return None


class BulkOutcome(msgspec.Struct, frozen=True):
    """What became of each item of a bulk request, and where it was recorded."""

    items: list[LabelBatchItem]
    events: dict[int, StoredEvent]  # item index -> its GroundTruthRecorded
    batch: StoredEvent  # the first of the request's LabelBatchRecorded events (their stream holds them all)
    head_position: int
    head_hash: bytes
    replayed: bool = False


class LabelService:
    def __init__(self, store: EventStore, committer: GroupCommitter, budget: IngestionBudget | None = None) -> None:
        self._store = store
        self._committer = committer
        self._budget = budget or unlimited()
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

    async def record_many(
        self, raw_items: Sequence[object], *, default_source: str | None = None, actor: str | None = None,
        idempotency_key: str | None = None, fingerprint: bytes | None = None, metadata: dict[str, Any],
    ) -> BulkOutcome:
        """A bulk label request: each item answers for itself (a bad or unknown one never refuses
        the others), and everything accepted is appended in one transaction with the request's own
        `LabelBatchRecorded`, all or nothing. A retry with the same `idempotency_key` (and the same
        body: `fingerprint`) returns the first answer and appends nothing."""
        if len(raw_items) > MAX_BULK_ITEMS:
            raise Rejected("too_many_label_items", f"at most {MAX_BULK_ITEMS} items per request")
        if idempotency_key is not None:
            found = await self._store.find_idempotency_key(idempotency_key)
            if found is not None:
                if fingerprint is not None and found[0] != fingerprint:
                    raise IdempotencyKeyReused(idempotency_key)
                return await self._replay_batch(found[1])
        async with self._budget.turn():
            return await self._record_many(raw_items, default_source, actor, idempotency_key, fingerprint, metadata)

    async def _record_many(
        self, raw_items: Sequence[object], default_source: str | None, actor: str | None,
        idempotency_key: str | None, fingerprint: bytes | None, metadata: dict[str, Any],
    ) -> BulkOutcome:
        for _ in range(MAX_ATTEMPTS):
            items, placed, by_stream, targets = await self._plan(raw_items, default_source, actor)
            requests = [AppendRequest(
                stream_id=uuid.uuid4(), expected_version=0, events=list(batch_events(items, actor)), metadata=metadata,
                idempotency_key=idempotency_key, request_sha256=fingerprint,
            )]
            requests += [
                AppendRequest(stream_id=stream, expected_version=targets[stream].version, events=events, metadata=metadata)
                for stream, events in by_stream.items()
            ]
            outcomes = await self._store.append(requests, all_or_nothing=True)
            first = outcomes[0]
            if isinstance(first, Replayed):  # a concurrent twin took the key first: its answer stands
                return await self._replay_batch(first.stream_id)
            if isinstance(first, IdempotencyKeyReused | DatabaseUnavailable):
                raise first
            if all(isinstance(outcome, Committed) for outcome in outcomes):
                return self._answer(items, placed, outcomes)  # type: ignore[arg-type]
            if not any(isinstance(outcome, VersionConflict) for outcome in outcomes):
                raise next(o for o in outcomes if not isinstance(o, Committed))  # type: ignore[misc]
            # A label for one of these predictions committed meanwhile: read again, plan again.
        raise Overloaded("the predictions of this request are being labelled by too many writers at once; retry")

    async def _plan(
        self, raw_items: Sequence[object], default_source: str | None, actor: str | None
    ) -> tuple[list[LabelBatchItem], list[tuple[int, uuid.UUID, int]], dict[uuid.UUID, list[Event]],
               dict[uuid.UUID, LabelTarget]]:
        """Each item's answer; where each accepted one goes (index, stream, stream version); the
        events per stream; the targets read."""
        parsed: list[tuple[int, Any]] = []
        for index, raw in enumerate(raw_items):
            try:
                parsed.append((index, parse_item(raw, default_source)))
            except Rejected as refused:
                parsed.append((index, refused))
        wanted = {item.prediction_id for _, item in parsed if not isinstance(item, Rejected)}
        targets = {stream: target_of(*facts) for stream, facts in (await self._store.prediction_facts(list(wanted))).items()}
        if missing := wanted - targets.keys():  # outcomes the projection has not applied yet: from the log
            starts = await self._store.read_stream_starts(list(missing))
            targets.update({stream: target for stream, (version, first) in starts.items()
                            if (target := label_target(first, version=version)) is not None})
        items: list[LabelBatchItem] = []
        placed: list[tuple[int, uuid.UUID, int]] = []
        by_stream: dict[uuid.UUID, list[Event]] = {}
        for index, item in parsed:
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # let the uploads this process serves move meanwhile
            if isinstance(item, Rejected):
                items.append(LabelBatchItem(index=index, prediction_id=_named_prediction(raw_items[index]),
                                            code=item.code, detail=item.message))
                continue
            stream, target = item.prediction_id, targets.get(item.prediction_id)
            try:
                if target is None:
                    raise NotFound("prediction_not_found", f"no prediction {stream}")
                classes = target.num_classes or await self._model_classes(target.model_sha256)
                event = record_label(target, classes, item.label, item.source, item.note, actor)
            except (Rejected, NotFound) as refused:
                items.append(LabelBatchItem(index=index, prediction_id=str(stream), code=refused.code, detail=str(refused)))
                continue
            pending = by_stream.setdefault(stream, [])
            pending.append(event)
            placed.append((index, stream, target.version + len(pending)))
            items.append(LabelBatchItem(index=index, prediction_id=str(stream), stream_version=placed[-1][2]))
        return items, placed, by_stream, targets

    def _answer(self, items: list[LabelBatchItem], placed: list[tuple[int, uuid.UUID, int]],
                outcomes: list[Committed]) -> BulkOutcome:
        stored = {(event.stream_id, event.stream_version): event for outcome in outcomes[1:] for event in outcome.events}
        events = {index: stored[(stream, version)] for index, stream, version in placed}
        return BulkOutcome(items=items, events=events, batch=outcomes[0].events[0],
                           head_position=outcomes[0].head_position, head_hash=outcomes[0].head_hash)

    async def _replay_batch(self, batch_stream: uuid.UUID) -> BulkOutcome:
        stored = await self._store.read_stream(batch_stream)
        batches = [event.decode() for event in stored]
        if not batches or not all(isinstance(batch, LabelBatchRecorded) for batch in batches):
            raise IdempotencyKeyReused("the Idempotency-Key was used for another kind of request")
        items = [item for batch in batches for item in batch.items]
        places = [(uuid.UUID(i.prediction_id), i.stream_version) for i in items
                  if i.stream_version is not None and i.prediction_id is not None]
        found = await self._store.find_events(places)
        events = {i.index: found[(uuid.UUID(i.prediction_id), i.stream_version)] for i in items
                  if i.stream_version is not None and i.prediction_id is not None}
        head_position, head_hash = await self._store.head()
        return BulkOutcome(items=items, events=events, batch=stored[0], head_position=head_position,
                           head_hash=head_hash, replayed=True)

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
