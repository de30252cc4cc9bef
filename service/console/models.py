"""Each registered model, and one model's measured quality drawn as charts."""

from __future__ import annotations

import re

from litestar import Request, get
from litestar.response import Template

from projections import quality, queries
from service import charts
from service.bootstrap import ServicesDependency
from service.console.session import page, viewer
from service.problems import Problem
from service.quality_routes import measure
from service.routes import wait_for_projection


@get("/ui/models", include_in_schema=False)
async def models_page(request: Request, services: ServicesDependency) -> Template:
    who = viewer(request, services)
    async with services.reading() as connection:
        entries = await quality.models(connection)
    return page("models.html", request, who, models=entries)


@get("/ui/models/{sha256:str}", include_in_schema=False)
async def model_page(request: Request, services: ServicesDependency, sha256: str) -> Template:
    who = viewer(request, services)
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise Problem(404, "model_not_found", "a model is named by its sha256")
    async with services.reading() as connection:  # a label recorded a moment ago counts
        await wait_for_projection(connection, services.settings.read_your_writes_timeout_s)
    measured = await measure(services, sha256)
    async with services.reading() as connection:
        latency = await queries.model_latency(connection, sha256)
    counts = measured.counts
    top = max((n for row in measured.confusion for n in row), default=0)
    shade = [[(0 if not top else min(9, round(9 * n / top))) for n in row] for row in measured.confusion]
    peak = max(counts.predicted_class_counts, default=0)
    days = [b.start.strftime("%m-%d") for b in measured.series]
    classes = [str(k) for k in range(measured.model.num_classes)]
    graphs = {
        "quality": charts.lines(
            "Accuracy and label coverage per day", "The share of labelled predictions that were right, and the "
            "share of predictions that have a label, each day", days,
            {"accuracy": [b.accuracy for b in measured.series], "coverage": [b.label_coverage for b in measured.series]},
            top=1.0, percent=True),
        "classes": charts.stacked_bars(
            "Predicted classes per day", "How many predictions of each class the model made each day", days,
            [b.predicted_class_counts for b in measured.series], classes),
        "drift": charts.lines(
            "Drift per day against the reference (PSI)", "Population stability index of each day's predicted "
            "classes and top confidences against the reference window", days,
            {"classes": [b.predicted_class_psi for b in measured.series],
             "confidence": [b.confidence_psi for b in measured.series]}),
        "calibration": charts.reliability(
            "Calibration: accuracy against confidence", "For each confidence bin with labels, the mean top "
            "confidence against the share that was right; a calibrated model follows the diagonal",
            [(b.mean_confidence, b.accuracy) for b in measured.calibration]),
    }
    return page("model.html", request, who, q=measured, shade=shade, peak=peak, graphs=graphs, latency=latency,
                series_peak=max((b.predictions for b in measured.series), default=0))


