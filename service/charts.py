"""Charts for the console, drawn on the server as SVG geometry (no charting library, no script).

Each function turns figures into the coordinates a template draws (`templates/charts.html`):
paths, bars and axis ticks in a fixed viewBox that the browser scales. Drawing on the server keeps
the pages working without script and under a CSP with no inline anything (SVG presentation
attributes are not styles); every chart sits next to the table with the same figures, which is
also what a screen reader gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 28  # the plot area's margins, for the axis labels


@dataclass(frozen=True)
class Tick:
    at: float
    label: str


@dataclass(frozen=True)
class Line:
    name: str
    path: str  # SVG path data; a gap (None) starts a new subpath
    dots: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: int  # the colour class
    title: str   # the tooltip: what the bar counts


@dataclass(frozen=True)
class Chart:
    title: str
    description: str
    lines: list[Line] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    legend: list[str] = field(default_factory=list)
    diagonal: str | None = None  # the path of y = x, for a reliability diagram
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    plot_width: int = WIDTH - LEFT - RIGHT
    plot_height: int = HEIGHT - TOP - BOTTOM

    @property
    def empty(self) -> bool:
        return not any(line.dots for line in self.lines) and not self.bars


def _y(value: float, top: float) -> float:
    plot_height = HEIGHT - TOP - BOTTOM
    return round(TOP + plot_height * (1 - (value / top if top else 0)), 1)


def _x_slots(count: int) -> tuple[float, float]:
    """The x of the first slot's centre and the slot width, for `count` slots."""
    plot_width = WIDTH - LEFT - RIGHT
    slot = plot_width / max(count, 1)
    return LEFT + slot / 2, slot


def _sparse_ticks(labels: Sequence[str], centres: Sequence[float], most: int = 8) -> list[Tick]:
    step = max(1, -(-len(labels) // most))
    return [Tick(round(centres[i], 1), labels[i]) for i in range(0, len(labels), step)]


def _scale(peak: float) -> float:
    """A round top for the y axis at or above `peak`."""
    if peak <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(peak))) - 1)
    for multiple in (1, 2, 2.5, 5, 10):
        if peak <= multiple * magnitude:
            return multiple * magnitude
    return 10.0 * magnitude


def _count_label(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 or value == int(value) else f"{value:g}"


def lines(title: str, description: str, labels: Sequence[str], series: dict[str, Sequence[float | None]],
          *, top: float | None = None, percent: bool = False) -> Chart:
    """Lines over the same x slots (e.g. days); None leaves a gap. `top` fixes the y axis (1.0 for
    fractions); otherwise it is rounded up from the data."""
    first, slot = _x_slots(len(labels))
    centres = [first + i * slot for i in range(len(labels))]
    values = [v for points in series.values() for v in points if v is not None]
    top = top if top is not None else _scale(max(values, default=0.0))
    drawn = []
    for name, points in series.items():
        commands, dots, pen_down = [], [], False
        for x, value in zip(centres, points, strict=True):
            if value is None:
                pen_down = False
                continue
            y = _y(value, top)
            commands.append(f"{'L' if pen_down else 'M'}{x:.1f},{y}")
            dots.append((round(x, 1), y))
            pen_down = True
        drawn.append(Line(name=name, path=" ".join(commands), dots=dots))
    y_ticks = [Tick(_y(top * f, top), f"{top * f * 100:.0f}%" if percent else _count_label(top * f))
               for f in (0, 0.25, 0.5, 0.75, 1)]
    return Chart(title=title, description=description, lines=drawn, x_ticks=_sparse_ticks(labels, centres),
                 y_ticks=y_ticks, legend=list(series))


def stacked_bars(title: str, description: str, labels: Sequence[str], stacks: Sequence[Sequence[int]],
                 names: Sequence[str]) -> Chart:
    """One bar per x slot, stacked by series (`stacks[slot][series]`); the y axis is counts."""
    first, slot = _x_slots(len(labels))
    top = _scale(max((sum(stack) for stack in stacks), default=0))
    width = max(1.0, round(slot * 0.8, 1))
    bars = []
    for i, stack in enumerate(stacks):
        below = 0
        x = round(first + i * slot - width / 2, 1)
        for series, count in enumerate(stack):
            if count:
                y_top, y_bottom = _y(below + count, top), _y(below, top)
                bars.append(Bar(x=x, y=y_top, width=width, height=round(y_bottom - y_top, 1), series=series,
                                title=f"{labels[i]}: {names[series]} {count:,}"))
            below += count
    centres = [first + i * slot for i in range(len(labels))]
    y_ticks = [Tick(_y(top * f, top), _count_label(top * f)) for f in (0, 0.5, 1)]
    return Chart(title=title, description=description, bars=bars, x_ticks=_sparse_ticks(labels, centres),
                 y_ticks=y_ticks, legend=list(names))


def reliability(title: str, description: str, bins: Sequence[tuple[float | None, float | None]]) -> Chart:
    """A reliability diagram: each bin's (mean confidence, accuracy) against the diagonal of a
    perfectly calibrated model; both axes are 0–1."""
    plot_width = WIDTH - LEFT - RIGHT

    def x(value: float) -> float:
        return round(float(LEFT + plot_width * value), 1)

    dots = [(x(confidence), _y(accuracy, 1.0)) for confidence, accuracy in bins
            if confidence is not None and accuracy is not None]
    path = " ".join(f"{'L' if i else 'M'}{px},{py}" for i, (px, py) in enumerate(dots))
    ticks = [0, 0.25, 0.5, 0.75, 1]
    return Chart(title=title, description=description, lines=[Line(name="model", path=path, dots=dots)],
                 x_ticks=[Tick(x(t), f"{t:g}") for t in ticks], y_ticks=[Tick(_y(t, 1.0), f"{t:g}") for t in ticks],
                 legend=["model", "perfect calibration"], diagonal=f"M{x(0)},{_y(0, 1.0)} L{x(1)},{_y(1, 1.0)}")
