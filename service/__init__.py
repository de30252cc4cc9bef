"""The HTTP service: the Litestar app (`app.py`), its routes and response types, problem details
(`problems.py`: the one place where every error gets its status), API keys, OpenAPI, metrics and
the request-id middleware, and the composition root (`bootstrap.py`) that builds the parts.

The edge of the system: may import every room below it (`domain`, `db`, `inference`, `infra`,
`usecases`, `projections`); only `cli` imports it.
"""
