"""Experiment figures drawn from results.csv and trajectory.csv; `python -m flatjax.plot WORKDIR`
redraws them.

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot, no global backend change) and
saved as PNG.

Every figure is a grid of panels: one row per value of `FigureSpec.column` (a single row when
None) and two columns, test accuracy and lambda_max (log y) against `FigureSpec.x`, one line per
value of `FigureSpec.line`. Each point is the mean over seeds of the runs that trained to a final
state, with a min-max band; a hollow marker means some of its seeds hit max_epochs before the
train-accuracy target (they are included); x marks at the bottom of the accuracy panel are grid
points where every run diverged. Diverged and failed runs are excluded from the means.

With trajectory.csv (sweeps with --track_every) there is also trajectory.png: lambda_max (log y)
against the training step, one line per run, coloured by learning rate and styled by the other
grid axes that vary, with each learning rate's edge of stability 2 / LR dashed in its colour.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from matplotlib.transforms import blended_transform_factory

from flatjax import presets, results, summary
from flatjax.config import CONFIG_FILE


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    """What an experiment's figure plots (module docstring).

    Attributes:
      x, x_label, x_log: the column on the x axis, its label, and whether the axis is log-scaled.
      line, line_label: the column with one line per value (None: one line), and its label.
      column, column_label: the column with one row of panels per value (None: one row).
      edge_of_stability: draw lambda_max = 2 / x on the lambda_max panels (x is the LR).
    """

    x: str
    x_label: str
    line: str | None = None
    line_label: str = ""
    column: str | None = None
    column_label: str = ""
    x_log: bool = True
    edge_of_stability: bool = False


FIGURES = {
    "batch_lr": FigureSpec(x="lr", x_label="learning rate", line="batch_size",
                           line_label="batch size", edge_of_stability=True),
    "sam_rho": FigureSpec(x="rho", x_label="SAM rho", line="batch_size", line_label="batch size",
                          x_log=False),
    "batchnorm": FigureSpec(x="lr", x_label="learning rate", line="batch_norm",
                            line_label="BatchNorm", column="batch_size",
                            column_label="batch size", edge_of_stability=True),
    "dropout": FigureSpec(x="dropout", x_label="dropout probability p", x_log=False),
}

CAPTION_WIDTH = 140  # characters per line of the note under a figure (11 inches, small font)
METRICS = (("test_acc", "test accuracy", False), ("lambda_max", "lambda_max", True))


def facet(rows, column: str | None, value) -> list[dict]:
    """The rows whose `column` has `value` (all rows when column is None)."""
    if column is None:
        return list(rows)
    return [r for r in rows if summary.axis_value(r, column) == value]


def values_of(rows, column: str | None) -> list:
    """The sorted distinct values of `column` in `rows` ([None] when column is None)."""
    if column is None:
        return [None]
    return sorted({summary.axis_value(r, column) for r in rows})


def series(rows, x: str, metric: str):
    """(xs, means, lows, highs, partly_unconverged, all_diverged_xs) of one line."""
    points = summary.grid_points(rows, (x,))
    xs, means, lows, highs, partial, diverged = [], [], [], [], [], []
    for (x_value,), point in points.items():
        s = summary.metric_stat(point, metric)
        if s.count == 0:
            if all(r["status"] == "diverged" for r in point):
                diverged.append(x_value)
            continue
        xs.append(x_value)
        means.append(s.mean)
        lows.append(s.low)
        highs.append(s.high)
        partial.append(any(r["status"] == "not_converged" for r in point))
    return (np.array(xs), np.array(means), np.array(lows), np.array(highs),
            np.array(partial, bool), np.array(diverged))


def shown(value) -> str:
    """A grid value as text: 100 rather than 100.0."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def line_name(spec: FigureSpec, value) -> str:
    """Legend label of a line."""
    if spec.line is None:
        return "mean over seeds"
    return f"{spec.line_label or spec.line} {shown(value)}"


def draw_panel(ax, rows, spec: FigureSpec, metric: str, label: str, log_y: bool) -> None:
    """One panel: `metric` against spec.x, a line per spec.line value."""
    for color_index, value in enumerate(values_of(rows, spec.line)):
        color = f"C{color_index}"
        xs, means, lows, highs, partial, diverged = series(facet(rows, spec.line, value),
                                                           spec.x, metric)
        ax.plot(xs, means, "-o", color=color, label=line_name(spec, value))
        ax.fill_between(xs, lows, highs, color=color, alpha=0.2, linewidth=0)
        ax.plot(xs[partial], means[partial], "o", color=color, markerfacecolor="white")
        if metric == "test_acc" and diverged.size:
            bottom = blended_transform_factory(ax.transData, ax.transAxes)
            ax.plot(diverged, np.full(diverged.size, 0.03), "x", color=color, transform=bottom,
                    clip_on=False)
    if metric == "lambda_max" and spec.edge_of_stability:
        x_values = np.array([summary.axis_value(r, spec.x) for r in rows])
        grid = np.geomspace(x_values.min(), x_values.max(), 50)
        ax.plot(grid, 2 / grid, "--", color="gray", label="2 / LR")
    ax.set_xscale("log" if spec.x_log else "linear")
    grid_values = sorted({summary.axis_value(r, spec.x) for r in rows})
    ax.set_xticks(grid_values, [shown(v) for v in grid_values])
    ax.xaxis.set_minor_locator(NullLocator())
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(spec.x_label)
    ax.set_ylabel(label)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")


def caption(rows, note: str) -> str:
    """What the markers mean and which runs are excluded."""
    diverged = sum(r["status"] == "diverged" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    text = (f"Mean over seeds, band min-max. Hollow: some seeds not converged (included). "
            f"x: all seeds diverged. Excluded: {diverged} diverged, {failed} failed runs.")
    trained = sum(r["status"] in summary.TRAINED for r in rows)
    unmeasured = trained - summary.metric_stat(rows, "lambda_max").count
    if unmeasured:
        text += f" {unmeasured} trained runs have no finite lambda_max (left out of its panels)."
    return "\n".join([text, *textwrap.wrap(note, CAPTION_WIDTH)])


def draw(rows, spec: FigureSpec, title: str = "", note: str = "") -> Figure:
    """The figure of `spec` for `rows` (results.csv rows of one experiment)."""
    facets = values_of(rows, spec.column)
    fig = Figure(figsize=(11, 4.2 * len(facets) + 0.8), layout="constrained")
    axes = fig.subplots(len(facets), len(METRICS), squeeze=False)
    for row_axes, value in zip(axes, facets, strict=True):
        for ax, (metric, label, log_y) in zip(row_axes, METRICS, strict=True):
            draw_panel(ax, facet(rows, spec.column, value), spec, metric, label, log_y)
            if spec.column is not None:
                ax.set_title(f"{spec.column_label or spec.column} {shown(value)}")
    fig.suptitle(title)
    fig.supxlabel(caption(rows, note), fontsize="small")
    return fig


def title_of(config: dict) -> str:
    """E.g. "batch_lr (cpu preset): vgg11 width 0.25 on cifar10, 1000 train examples, 2 seeds"."""
    model = config["model"]
    for key in ("width", "hidden"):
        if config.get(key) is not None:
            model += f" {key} {config[key]:g}"
    examples = config.get("train_subset") or "all"
    return (f"{config['experiment']} ({config['preset']} preset): {model} on "
            f"{config['dataset']}, {examples} train examples, {config['seeds']} "
            f"seed{'s' if config['seeds'] != 1 else ''}")


def read_config(path: Path) -> dict:
    """A workdir's config.json; ValueError naming the file if it is not a sweep's config."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun the sweep to rewrite "
                         f"it") from None
    missing = [k for k in ("experiment", "figure", "dataset", "preset", "seeds")
               if not isinstance(config, dict) or k not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a flatjax sweep config; rerun "
                         f"the sweep to rewrite it")
    return config


def workdir_rows(workdir: Path, table: str, key=results.row_key) -> tuple[dict, list[dict]]:
    """(config.json, the rows of the experiment in `table`) of a sweep workdir."""
    config_path, table_path = workdir / CONFIG_FILE, workdir / table
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: {workdir} is not a sweep workdir")
    if not table_path.exists():
        raise FileNotFoundError(f"{table_path} not found: the sweep in {workdir} has not "
                                f"finished a run yet")
    config = read_config(config_path)
    rows = [r for r in results.read_rows(table_path, key)
            if r["experiment"] == config["experiment"]]
    if not rows:
        raise ValueError(f"{table_path} has no rows of experiment {config['experiment']!r}")
    return config, rows


def png_bytes(fig: Figure) -> bytes:
    """`fig` as PNG data."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def save_png(fig: Figure, out: Path) -> Path:
    """Write `fig` to `out` as a PNG, atomically; return `out`."""
    results.write_atomic(out, png_bytes(fig))
    return out


def plot_workdir(workdir) -> Path:
    """Draw the figure of the sweep in `workdir` to WORKDIR/<experiment>.png; return its path."""
    workdir = Path(workdir)
    config, rows = workdir_rows(workdir, results.FILENAME)
    if config["figure"] not in FIGURES:
        raise ValueError(f"no figure named {config['figure']!r}; known: {', '.join(FIGURES)}")
    experiment = presets.EXPERIMENTS.get(config["experiment"])
    note = experiment.note if experiment else ""
    fig = draw(rows, FIGURES[config["figure"]], title_of(config), note)
    return save_png(fig, workdir / f"{config['experiment']}.png")


TRAJECTORY_FIGURE = "trajectory.png"
RUN_STYLES = ("-", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))  # "--" is for 2 / LR


def draw_trajectory(rows, title: str = "") -> Figure:
    """lambda_max against the training step for trajectory.csv `rows` (module docstring)."""
    lrs = values_of(rows, "lr")
    others = [a for a in summary.varying_axes(rows) if a != "lr"]
    styles = sorted({tuple(summary.axis_value(r, a) for a in others) for r in rows})
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    runs: dict[tuple, list[dict]] = {}
    for row in rows:
        runs.setdefault(results.row_key(row), []).append(row)
    labelled = set()
    for run in runs.values():
        run = sorted(run, key=lambda r: int(r["step"]))
        lr = summary.axis_value(run[0], "lr")
        style = tuple(summary.axis_value(run[0], a) for a in others)
        name = ", ".join([f"LR {shown(lr)}"] + [f"{a.replace('_', ' ')} {shown(v)}"
                                                 for a, v in zip(others, style)])
        ax.plot([int(r["step"]) for r in run],
                [results.parse_float(r["lambda_max"]) for r in run], color=f"C{lrs.index(lr)}",
                linestyle=RUN_STYLES[styles.index(style) % len(RUN_STYLES)],
                label=None if name in labelled else name)
        labelled.add(name)
    for i, lr in enumerate(lrs):
        ax.axhline(2 / lr, color=f"C{i}", linestyle="--", linewidth=1, label=f"2 / {shown(lr)}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("lambda_max")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.supxlabel("One line per run (seeds share colour and style). Dashed: the edge of "
                  "stability 2 / LR, in the colour of its LR.", fontsize="small")
    return fig


def plot_trajectory(workdir) -> Path:
    """Draw WORKDIR/trajectory.png from its trajectory.csv; return its path."""
    workdir = Path(workdir)
    config, rows = workdir_rows(workdir, results.TRAJECTORY_FILENAME, results.trajectory_key)
    return save_png(draw_trajectory(rows, title_of(config)), workdir / TRAJECTORY_FIGURE)


def main(argv=None) -> int:
    """`python -m flatjax.plot WORKDIR [WORKDIR ...]`: redraw each workdir's figures."""
    workdirs = sys.argv[1:] if argv is None else argv
    if not workdirs or any(w.startswith("-") for w in workdirs):
        print("usage: python -m flatjax.plot WORKDIR [WORKDIR ...]", file=sys.stderr)
        return 2
    status = 0
    for workdir in workdirs:
        try:
            print(plot_workdir(workdir))
            if (Path(workdir) / results.TRAJECTORY_FILENAME).exists():
                print(plot_trajectory(workdir))
        except (OSError, ValueError, KeyError) as error:
            print(f"error: {workdir}: {error}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
