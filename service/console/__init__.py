"""The audit console: server-rendered pages under /ui/ (Jinja2 templates, htmx for partial updates,
one small script of our own; every file served from the repository, no CDN).

It reads through the same query code as the JSON API (`projections.queries`, `tree_store`, the
event store) and has the same scopes (`session`). One module per part of the console.
"""

from __future__ import annotations

from litestar import Router
from litestar.di import Provide
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.static_files import create_static_files_router

from domain.thumbnails import needs_thumbnail
from service.console import images, jobs, log, models, overview, predictions, session, upload
from service.console.session import STATIC, TEMPLATES, LoginRequired

__all__ = ["CONSOLE", "TEMPLATES", "template_globals"]


def template_globals(engine: JinjaTemplateEngine) -> None:
    """What every template may call: whether a list shows a picture's thumbnail or the picture."""
    engine.engine.globals["needs_thumbnail"] = needs_thumbnail

CONSOLE = Router(
    path="/",
    route_handlers=[
        session.root, session.favicon, session.login_form, session.login, session.logout,
        overview.overview_page,
        predictions.predictions_page, predictions.prediction_rows, predictions.prediction_counts,
        predictions.prediction_page, predictions.prediction_events, predictions.label,
        images.input_image, images.thumbnail_image,
        predictions.export, predictions.prediction_receipt,
        models.models_page, models.model_page,
        upload.upload_page, upload.upload,
        log.log_page, log.feed_page,
        jobs.verify_now, jobs.reproduce_now, jobs.job_fragment,
        create_static_files_router(path="/ui/static", directories=[STATIC], name="console-static",
                                   include_in_schema=False, cache_control=None),
    ],
    exception_handlers={LoginRequired: session.to_login},
    dependencies={"filters": Provide(predictions.list_filters, sync_to_thread=False)},
    include_in_schema=False,
)
