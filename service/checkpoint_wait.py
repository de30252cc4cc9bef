"""`Prefer: wait=checkpoint`: a write answers once its events are inside a signed checkpoint, with
the checkpoint and each event's inclusion proof in its receipt (bounded by CHECKPOINT_WAIT_TIMEOUT_S;
past it the answer comes without them and without `Preference-Applied`)."""

from __future__ import annotations

import base64

import msgspec
from litestar import Request

from projections import tree_store
from service.bootstrap import ServicesDependency
from service.responses import Receipt


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def wants_checkpoint(request: Request) -> bool:
    """`Prefer: wait=checkpoint` (RFC 7240 syntax: comma-separated preferences, `;` parameters)."""
    for header in request.headers.getall("prefer", []):
        for preference in header.split(","):
            token, _, value = preference.split(";")[0].strip().partition("=")
            if token.strip().lower() == "wait" and value.strip().strip('"').lower() == "checkpoint":
                return True
    return False


async def checkpointed(services: ServicesDependency, the_receipt: Receipt) -> Receipt | None:
    """The receipt with the first signed checkpoint that includes its events and their inclusion
    proofs against it; None when none is signed within CHECKPOINT_WAIT_TIMEOUT_S."""
    last = max(event.position for event in the_receipt.events)
    if not await services.signed.wait_for(last, services.settings.checkpoint_wait_timeout_s):
        return None
    async with services.reading() as connection:
        covering = await tree_store.checkpoint_covering(connection, last)
        if covering is None:  # not on this connection yet (a replica catching up): answer without it
            return None
        events = []
        for event in the_receipt.events:
            proof = await tree_store.inclusion(connection, event.leaf_index, covering.tree_size)
            events.append(msgspec.structs.replace(event, inclusion_proof=[b64(p) for p in proof.proof]))
    return msgspec.structs.replace(the_receipt, events=events, checkpoint=covering.note)


PREFERENCE_APPLIED = {"Preference-Applied": "wait=checkpoint"}
