"""What a use case can fail with besides a domain `Rejected` and the event store's own outcomes
(`db.store.DatabaseUnavailable`, `IdempotencyKeyReused`, `VersionConflict`, `AppendError`).
None of them knows HTTP: the edge (service/problems.py) maps each one to its answer once."""

from __future__ import annotations


class NotReady(Exception):
    """The model is still loading (or could not be loaded): nothing can be predicted yet."""


class Overloaded(Exception):
    """Too much work is queued already; the caller should retry later."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotFound(Exception):
    """The thing asked for does not exist (yet)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
