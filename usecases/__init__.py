"""The application's use cases: predict (`predict.py`), keep every served model (`models.py`),
erase an original upload (`erase.py`), reproduce a past prediction (`reproduce.py`).

They orchestrate domain decisions, inference and the event store, and fail with domain and store
errors (`Rejected`, `usecases.errors`, `db.store`'s outcomes), never HTTP ones: the HTTP edge
maps those. May import `domain`, `db`, `inference` and `infra`; never `service` or `cli`.
"""
