"""Projections: the read tables derived from the event log, and everything that keeps them honest.

- `rows`: events → rows (pure); `read_model`: applying a batch and moving the tracked position
  (compare-and-set, in the same transaction)
- `worker`: `ProjectionRunner`, one active per projection (advisory lock), supervised;
  `process`: the runner with its chain-head signer (`checkpoints`), as a process runs them
- `queries`: the read side the API uses (`list_predictions`, `get_prediction`, lag, …)
- `rebuild`, `bulk`, `verify`, `audit_checks`, `replay`: what `just rebuild|verify|replay` run

May import `domain`, `db` and `infra`; never `service`, `usecases` or `cli`.
"""
