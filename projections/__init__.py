"""Projections: the read tables built from the event log, their workers, rebuild and verify.

- `read_model`: applying events to the read tables in batches, the checkpoint compare-and-set
- `worker`: `ProjectionRunner`, one active worker per projection (advisory lock), supervised
- `queries`: the read side for the API (`list_predictions`, `get_prediction`, lag, ...)
- `rebuild`, `verify`, `replay`: operator commands (`python -m projections --help`)
"""
