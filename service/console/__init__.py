"""The audit console: server-rendered pages under /ui/ (Jinja2 templates, htmx for partial updates,
one small script of our own; every file served from the repository, no CDN).

It reads through the same query code as the JSON API (`projections.queries`, `tree_store`, the
event store) and has the same scopes (`session`). One module per part of the console.
"""

from __future__ import annotations

from litestar import Router
from litestar.di import Provide
from litestar.static_files import create_static_files_router

from service.console import log, models, overview, predictions, session
from service.console.session import STATIC, TEMPLATES, LoginRequired

__all__ = ["CONSOLE", "TEMPLATES"]

CONSOLE = Router(
    path="/",
    route_handlers=[
        session.root, session.favicon, session.login_form, session.login, session.logout,
        overview.overview_page,
        predictions.predictions_page, predictions.prediction_rows, predictions.prediction_counts,
        predictions.prediction_page, predictions.prediction_events, predictions.input_image, predictions.label,
        predictions.export,
        models.models_page, models.model_page,
        log.log_page,
        create_static_files_router(path="/ui/static", directories=[STATIC], name="console-static",
                                   include_in_schema=False, cache_control=None),
    ],
    exception_handlers={LoginRequired: session.to_login},
    dependencies={"filters": Provide(predictions.list_filters, sync_to_thread=False)},
    include_in_schema=False,
)
