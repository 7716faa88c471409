"""Per-grid-point statistics over seeds, and the summary table printed after a sweep.

Test accuracy and lambda_max are averaged over the runs that trained to a final state
(`converged` or `not_converged`); diverged and failed runs only appear in the status counts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from flatjax.results import STATUSES, parse_float

GRID_AXES = ("batch_norm", "dropout", "rho", "batch_size", "lr")
DEFAULT_AXES = ("batch_size", "lr")
TRAINED = ("converged", "not_converged")
SHORT_STATUS = {"converged": "conv", "not_converged": "not_conv", "diverged": "div",
                "failed": "FAILED"}


class Stat(NamedTuple):
    """Mean, min and max of the finite values, and how many there were."""

    mean: float
    low: float
    high: float
    count: int


def stat(values) -> Stat:
    """`Stat` of the finite entries of `values` (NaN fields when there are none)."""
    finite = np.asarray([v for v in values if math.isfinite(v)], float)
    if finite.size == 0:
        return Stat(math.nan, math.nan, math.nan, 0)
    return Stat(float(finite.mean()), float(finite.min()), float(finite.max()), int(finite.size))


def axis_value(row: dict, axis: str):
    """A grid coordinate of a row as a bool or float."""
    cell = row[axis]
    return cell == "True" if cell in ("True", "False") else parse_float(cell)


def varying_axes(rows, axes=GRID_AXES) -> tuple[str, ...]:
    """The grid axes taking more than one value in `rows` (DEFAULT_AXES when none does)."""
    varying = tuple(a for a in axes if len({row[a] for row in rows}) > 1)
    return varying or DEFAULT_AXES


def grid_points(rows, axes) -> dict[tuple, list[dict]]:
    """Rows grouped by their values on `axes`, in sorted order of those values."""
    points: dict[tuple, list[dict]] = {}
    for row in rows:
        points.setdefault(tuple(axis_value(row, a) for a in axes), []).append(row)
    return dict(sorted(points.items()))


def metric_stat(rows, metric: str) -> Stat:
    """`Stat` of `metric` over the rows that trained to a final state."""
    return stat([parse_float(r.get(metric)) for r in rows if r["status"] in TRAINED])


def format_stat(s: Stat, digits: int) -> str:
    """E.g. "0.5120 (0.5010-0.5200)"; "-" when there are no values."""
    if s.count == 0:
        return "-"
    return f"{s.mean:.{digits}g} ({s.low:.{digits}g}-{s.high:.{digits}g})"


def table(rows, axes=None) -> str:
    """One line per grid point: test accuracy, lambda_max and (where measured) adaptive sharpness
    over seeds, and status counts."""
    axes = tuple(axes or varying_axes(rows))
    metrics = ["test_acc", "lambda_max"]
    if metric_stat(rows, "adaptive_sharpness").count:
        metrics.append("adaptive_sharpness")
    header = [*axes, "runs", *(f"{m} mean (min-max)" for m in metrics), "status"]
    lines = []
    for key, point in grid_points(rows, axes).items():
        counts = {s: sum(r["status"] == s for r in point) for s in STATUSES}
        status = " ".join(f"{n} {SHORT_STATUS[s]}" for s, n in counts.items() if n)
        lines.append([*(f"{v:g}" if isinstance(v, float) else str(v) for v in key),
                      str(len(point)), *(format_stat(metric_stat(point, m), 4) for m in metrics),
                      status])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *lines, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in [header, *lines])
