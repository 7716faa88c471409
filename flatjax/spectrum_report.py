"""The Hessian's spectrum of one trained network, measured, tabled and drawn.

    python experiments/spectrum.py --platform=cpu --preset=smoke --workdir=runs/spectrum_smoke

Trains one network (flatjax.train), then at its final weights measures lambda_max
(hessian.lambda_max), the Hutchinson and Hutch++ traces, the SLQ spectral density, the top
eigenvalue of each layer's Hessian block and the adaptive sharpness (flatjax.spectrum). Every
measure takes the paper's lambda_max loss: mean cross-entropy over the strided `lambda_subset` of
the training set in chunks (ghost batches) of min(batch size, 1000), BatchNorm in train mode,
dropout off; every HVP runs one chunk at a time (hessian.dataset_hvp).

The workdir gets, each written atomically: spectrum.json (settings, training outcome, every
scalar measure with its HVP count and wall time, compilation included), density.csv (the
smoothed density on its grid), layers.csv (one row per parameter group) and spectrum.png (the
density on a log axis with lambda_max and 2 / LR marked; the layers' top eigenvalues as bars).
Exit codes: 0 done, 1 training diverged, 2 bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from matplotlib.figure import Figure

from flatjax import cli, hessian, models, plot, results, spectrum, sweep
from flatjax import data as data_lib
from flatjax import train as train_lib
from flatjax.config import ConfigError
from flatjax.data import strided_subset

log = logging.getLogger(__name__)

JSON_FILE, DENSITY_FILE, LAYERS_FILE, FIGURE_FILE = (
    "spectrum.json", "density.csv", "layers.csv", "spectrum.png")
DENSITY_COLUMNS = ("eigenvalue", "density")
LAYER_COLUMNS = ("layer", "top_eigenvalue", "block_size", "residual", "num_hvps", "converged")
DEFAULT_WORKDIR = Path("runs/spectrum")

GRID_POINTS = 1000
GRID_MARGIN = 6.0  # the grid ends this many sigma past the extreme nodes: 2e-9 of the mass beyond
MIN_SIGMA_FRACTION = 2 / GRID_POINTS  # sigma at least ~2 grid spacings: the density sums to 1
DENSITY_FLOOR = 1e-10  # the log density axis starts this far below the density's peak
MODEL_OPTIONS = {"vgg11": ("width", "batch_norm"), "mlp": ("hidden",)}

# The batch_lr cpu setup (flatjax/presets.py) at its largest trainable LR, measured on 250
# examples: on 1000, one HVP takes about 3 s on 2 CPU cores and the measures about 35 minutes.
CPU = dict(dataset="cifar10", model="vgg11", width=0.25, hidden=None, batch_norm=False,
           train_subset=1000, batch_size=100, lr=0.1, max_epochs=100, target_acc=0.99, seed=0,
           lambda_subset=250, lambda_iters=50, trace_hvps=60, probes=4, slq_iters=60,
           sigma_fraction=0.01, adaptive_rho=0.1, adaptive_eta=0.01, adaptive_steps=20)
PRESETS = {
    "cpu": CPU,
    # A check that everything runs, in seconds: a small MLP, two epochs, few probes.
    "smoke": {**CPU, "dataset": "fashion_mnist", "model": "mlp", "width": None, "hidden": 32,
              "train_subset": 500, "max_epochs": 2, "lambda_subset": 200, "trace_hvps": 30,
              "probes": 2, "slq_iters": 30, "adaptive_steps": 5},
}


@dataclasses.dataclass(frozen=True)
class SpectrumConfig:
    """The network, its training and the measures' budgets (flags of the same names)."""

    preset: str
    dataset: str
    model: str
    width: float | None
    hidden: int | None
    batch_norm: bool
    train_subset: int | None
    batch_size: int
    lr: float
    max_epochs: int
    target_acc: float
    seed: int
    lambda_subset: int | None
    lambda_iters: int
    trace_hvps: int
    probes: int
    slq_iters: int
    sigma_fraction: float
    adaptive_rho: float
    adaptive_eta: float
    adaptive_steps: int

    def __post_init__(self):
        problems = config_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))


def config_problems(config: SpectrumConfig) -> list[str]:
    """Messages for every invalid field of `config` (empty when valid)."""
    problems = []
    if config.dataset not in data_lib.DATASETS:
        problems.append(f"--dataset must be one of {', '.join(data_lib.DATASETS)}, "
                        f"got {config.dataset!r}")
    if config.model not in MODEL_OPTIONS:
        problems.append(f"--model must be one of {', '.join(MODEL_OPTIONS)}, got {config.model!r}")
    else:
        takes = MODEL_OPTIONS[config.model]
        for name in ("width", "hidden", "batch_norm"):
            if getattr(config, name) not in (None, False) and name not in takes:
                problems.append(f"--{name} does not apply to --model={config.model} (it takes "
                                f"{', '.join(f'--{n}' for n in takes)}); drop --{name}")
    at_least = {"batch_size": 1, "max_epochs": 1, "seed": 0, "lambda_iters": 1, "trace_hvps": 3,
                "probes": 1, "slq_iters": 1, "adaptive_steps": 0, "hidden": 1,
                "train_subset": 1, "lambda_subset": 1}
    for name, minimum in at_least.items():
        value = getattr(config, name)
        if value is not None and value < minimum:
            problems.append(f"--{name} must be an integer >= {minimum}, got {value}")
    for name in ("width", "lr", "sigma_fraction", "adaptive_rho"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            problems.append(f"--{name} must be > 0, got {value}")
    if config.sigma_fraction is not None and 0 < config.sigma_fraction < MIN_SIGMA_FRACTION:
        problems.append(f"--sigma_fraction must be >= {MIN_SIGMA_FRACTION} (a narrower Gaussian "
                        f"falls between the {GRID_POINTS} points of the density's grid), "
                        f"got {config.sigma_fraction}")
    if not config.adaptive_eta >= 0:
        problems.append(f"--adaptive_eta must be >= 0, got {config.adaptive_eta}")
    if not 0 < config.target_acc <= 1:
        problems.append(f"--target_acc must be in (0, 1], got {config.target_acc}")
    return problems


def data_problems(config: SpectrumConfig, num_train: int) -> list[str]:
    """Messages for a batch or a measured subset larger than the `num_train` training examples."""
    where = f"the {num_train} training examples of {config.dataset}"
    return [f"--{name}={value} exceeds {where}; lower it"
            for name, value in (("batch_size", config.batch_size),
                                ("lambda_subset", config.lambda_subset))
            if value is not None and value > num_train]


# ---------------------------------------------------------------------------------------------
# Flags.
# ---------------------------------------------------------------------------------------------

FLAGS = (
    # (name, type, help)
    ("preset", str, f"{' | '.join(PRESETS)} (default cpu: the batch_lr cpu setup at LR 0.1)"),
    ("workdir", Path, f"output folder (default {DEFAULT_WORKDIR})"),
    ("data_dir", str, "folder holding the datasets (default FLATJAX_DATA_DIR, then the other "
                      "places flatjax.data searches)"),
    ("dataset", str, " | ".join(data_lib.DATASETS)),
    ("model", str, " | ".join(MODEL_OPTIONS)),
    ("width", cli.finite_float, "VGG width multiplier"),
    ("hidden", int, "MLP hidden units"),
    ("train_subset", cli.zero_is_none(int), "strided training subset size (0: the full set)"),
    ("batch_size", int, "training batch size; also sets the chunk of the measured loss"),
    ("lr", cli.finite_float, "SGD learning rate"),
    ("max_epochs", int, "epoch cap"),
    ("target_acc", cli.finite_float, "train accuracy at which training stops"),
    ("seed", int, "seed of the initialization, the data order and the probes"),
    ("lambda_subset", cli.zero_is_none(int),
     "examples in the strided subset every measure uses (0: all)"),
    ("lambda_iters", int, "Lanczos iterations cap of lambda_max and of each layer block"),
    ("trace_hvps", int, "HVPs of each trace estimate (Hutchinson probes, Hutch++ budget; >= 3)"),
    ("probes", int, "SLQ probes"),
    ("slq_iters", int, "Lanczos steps per SLQ probe"),
    ("sigma_fraction", cli.finite_float,
     f"Gaussian smoothing width of the density as a fraction of the range of its Ritz nodes "
     f"(>= {MIN_SIGMA_FRACTION})"),
    ("adaptive_rho", cli.finite_float, "radius of the adaptive sharpness ball"),
    ("adaptive_eta", cli.finite_float, "offset of the ball's scale |w| + eta"),
    ("adaptive_steps", int, "gradient-ascent steps of the adaptive sharpness"),
)
SWITCHES = (
    ("batch_norm", "VGG11 with BatchNorm"),
    ("quiet", "log lines only, no progress bar"),
)
RUN_FLAGS = ("workdir", "data_dir", "quiet")


def build_parser() -> argparse.ArgumentParser:
    """The parser of the script's flags; flags not given are absent from the namespace."""
    parser = argparse.ArgumentParser(
        prog="experiments/spectrum.py", argument_default=argparse.SUPPRESS,
        description="Train one network and measure its Hessian's spectrum. Flags left out take "
                    "the preset's value. Exit code 0: done; 1: training diverged; 2: bad input.")
    parser.add_argument("--platform", choices=cli.PLATFORMS,
                        help="JAX backend (default: JAX's choice)")
    for name, kind, text in FLAGS:
        parser.add_argument(f"--{name}", type=kind, help=text)
    for name, text in SWITCHES:
        parser.add_argument(f"--{name}", type=cli.parse_bool, nargs="?", const=True, help=text)
    return parser


def resolve(flags: dict) -> tuple[SpectrumConfig, dict]:
    """(SpectrumConfig, run options) from parsed flags over their preset.

    A preset's model setting that the chosen model does not take (e.g. the cpu preset's width
    under --model=mlp) is dropped; one given as a flag is kept, and refused by the config.
    """
    preset = flags.get("preset", "cpu")
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    settings = {**PRESETS[preset], **flags, "preset": preset}
    takes = MODEL_OPTIONS.get(settings["model"], ())
    for name in ("width", "hidden", "batch_norm"):
        if name not in flags and name not in takes:
            settings[name] = None if name != "batch_norm" else False
    options = {"workdir": DEFAULT_WORKDIR, "data_dir": None, "quiet": False}
    options.update({k: settings.pop(k) for k in RUN_FLAGS if k in settings})
    settings.pop("platform", None)
    return SpectrumConfig(**settings), options


# ---------------------------------------------------------------------------------------------
# Training and measures.
# ---------------------------------------------------------------------------------------------


class Measures(NamedTuple):
    """Every measure at the final weights, the layers' block sizes and each measure's wall time."""

    lambda_max: hessian.EigenResult
    hutchinson: spectrum.TraceEstimate
    hutchpp: spectrum.TraceEstimate
    density: spectrum.SpectralDensity
    layers: dict[str, hessian.EigenResult]
    adaptive: spectrum.SharpnessEstimate
    block_sizes: dict[str, int]
    wall_s: dict[str, float]


class Curve(NamedTuple):
    """The SLQ density smoothed by a Gaussian of width `sigma`, on `grid`."""

    grid: np.ndarray
    density: np.ndarray
    sigma: float


class Report(NamedTuple):
    """One network, trained and measured."""

    config: SpectrumConfig
    model: Any
    dataset: data_lib.Dataset
    training: train_lib.TrainResult
    variables: dict
    measures: Measures
    curve: Curve
    train_s: float


class Diverged(RuntimeError):
    """Training diverged: there are no final weights to measure."""


def build_model(config: SpectrumConfig):
    """The Flax model of `config`, with only the settings its model takes."""
    kwargs = {"width": config.width, "hidden": config.hidden, "batch_norm": config.batch_norm}
    return models.get_model(config.model, **{k: v for k, v in kwargs.items() if v})


def model_variables(result: train_lib.TrainResult) -> dict:
    """The trained variables; `batch_stats` only when the model has any."""
    variables = result.member_variables(0)
    return {k: v for k, v in variables.items() if k == "params" or v}


def timed(step: Callable[[], Any]) -> tuple[Any, float]:
    """step()'s result, computed to the end, and its wall time in seconds."""
    start = time.monotonic()
    out = jax.block_until_ready(step())
    return out, time.monotonic() - start


def on_loss(model, chunk: int, estimate: Callable) -> Callable:
    """Jitted `(variables, x, y) -> estimate(loss, params, hvp)` of the measured loss.

    The data are arguments of the program, not constants folded into it; `hvp` is the chunked
    dataset HVP, so memory is that of one chunk.
    """

    def run(variables, x, y):
        chunk_loss = hessian.model_loss(model, variables)
        loss = lambda p: hessian.dataset_loss(chunk_loss, p, x, y, chunk)
        hvp = lambda p, v: hessian.dataset_hvp(chunk_loss, p, v, x, y, chunk)
        return estimate(loss, variables["params"], hvp)

    return jax.jit(run)


def estimators(config: SpectrumConfig) -> dict[str, Callable]:
    """Each flatjax.spectrum measure as `estimate(loss, params, hvp)`, keyed by its name."""
    keys = dict(zip(("hutchinson", "hutchpp", "density"),
                    jax.random.split(jax.random.PRNGKey(config.seed), 3)))
    return {
        "hutchinson": lambda loss, params, hvp: spectrum.hutchinson_trace(
            loss, params, num_probes=config.trace_hvps, key=keys["hutchinson"], hvp_fn=hvp),
        "hutchpp": lambda loss, params, hvp: spectrum.hutchpp_trace(
            loss, params, num_hvps=config.trace_hvps, key=keys["hutchpp"], hvp_fn=hvp),
        "density": lambda loss, params, hvp: spectrum.spectral_density(
            loss, params, num_probes=config.probes, num_iters=config.slq_iters,
            key=keys["density"], hvp_fn=hvp),
        "layers": lambda loss, params, hvp: spectrum.layer_top_eigenvalues(
            loss, params, hvp_fn=hvp, num_iters=config.lambda_iters),
        "adaptive": lambda loss, params, hvp: spectrum.adaptive_sharpness(
            loss, params, rho=config.adaptive_rho, eta=config.adaptive_eta,
            num_steps=config.adaptive_steps),
    }


def block_sizes(params) -> dict[str, int]:
    """Parameters in each group of spectrum.layer_top_eigenvalues."""
    leaves = jax.tree.leaves(params)
    return {name: sum(int(leaves[i].size) for i in indices)
            for name, indices in spectrum.parameter_groups(params).items()}


def measure(model, variables: dict, x, y, config: SpectrumConfig) -> Measures:
    """Every measure of the loss on (x, y) at `variables` (module docstring)."""
    chunk = hessian.protocol_chunk(config.batch_size)
    steps = {"lambda_max": lambda: hessian.lambda_max(
        model, variables, x, y, batch_size=config.batch_size, subset_size=None,
        num_iters=config.lambda_iters)}
    for name, estimate in estimators(config).items():
        steps[name] = lambda estimate=estimate: on_loss(model, chunk, estimate)(variables, x, y)
    values, wall_s = {}, {}
    for name, step in steps.items():
        log.info("measuring %s", name)
        values[name], wall_s[name] = timed(step)
        log.info("%s: %.1f s", name, wall_s[name])
    return Measures(**values, block_sizes=block_sizes(variables["params"]), wall_s=wall_s)


def density_curve(density: spectrum.SpectralDensity, sigma_fraction: float) -> Curve:
    """The density smoothed at `sigma_fraction` of its nodes' range, on a grid covering them."""
    nodes = np.asarray(density.nodes, np.float64)
    low, high = float(nodes.min()), float(nodes.max())
    span = high - low if high > low else max(abs(high), 1.0)
    sigma = sigma_fraction * span
    grid = np.linspace(low - GRID_MARGIN * sigma, high + GRID_MARGIN * sigma, GRID_POINTS)
    return Curve(grid, np.asarray(spectrum.density_on_grid(density, grid, sigma), np.float64),
                 sigma)


def load_checked(config: SpectrumConfig, data_dir: str | None = None, *,
                 load_data: Callable = data_lib.load) -> data_lib.Dataset:
    """The training data of `config`; ConfigError when they cannot be loaded or are too few."""
    try:
        dataset = load_data(config.dataset, data_dir, train_subset=config.train_subset)
    except (OSError, ValueError) as error:
        raise ConfigError(f"could not load dataset {config.dataset!r}: {error}") from error
    problems = data_problems(config, len(dataset.x_train))
    if problems:
        raise ConfigError("; ".join(problems))
    return dataset


def run(config: SpectrumConfig, dataset: data_lib.Dataset, quiet: bool = False) -> Report:
    """Train the network of `config` on `dataset` and measure it (module docstring)."""
    model = build_model(config)
    log.info("training %s on %d examples of %s", config.model, len(dataset.x_train),
             config.dataset)
    training, train_s = timed(lambda: train_lib.train(
        model, dataset, batch_size=config.batch_size, lrs=[config.lr], seeds=[config.seed],
        max_epochs=config.max_epochs, target_acc=config.target_acc, progress=not quiet,
        desc="train"))
    log.info("training: %s after %d epochs, %.1f s", training.status[0], training.epochs[0],
             train_s)
    if training.status[0] == "diverged":
        raise Diverged(f"training diverged at --lr={config.lr:g} after {training.epochs[0]} "
                       f"epochs: there are no final weights to measure; lower --lr")
    variables = model_variables(training)
    x, y = strided_subset(dataset.x_train, dataset.y_train,
                          config.lambda_subset or len(dataset.x_train))
    measures = measure(model, variables, x, y, config)
    curve = density_curve(measures.density, config.sigma_fraction)
    return Report(config, model, dataset, training, variables, measures, curve, train_s)


# ---------------------------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------------------------


def scalar(value) -> float | int | bool | None:
    """A JSON scalar: Python numbers, None for NaN and infinities."""
    value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def trace_json(estimate: spectrum.TraceEstimate, wall_s: float) -> dict:
    """A trace estimate's entry of spectrum.json."""
    return {"value": scalar(estimate.trace), "stderr": scalar(estimate.stderr),
            "num_hvps": scalar(estimate.num_hvps), "wall_s": wall_s}


def slq_trace(report: Report) -> spectrum.MomentEstimate:
    """tr(H) from the SLQ density: n times its first moment, with its standard error."""
    n = sum(report.measures.block_sizes.values())
    moment = spectrum.density_moment(report.measures.density, 1)
    return spectrum.MomentEstimate(n * moment.moment, n * moment.stderr)


def loss_examples(report: Report) -> tuple[int, int]:
    """(examples, chunk) of the measured loss: the strided subset, in chunks of at most its size."""
    examples = report.config.lambda_subset or len(report.dataset.x_train)
    return examples, min(hessian.protocol_chunk(report.config.batch_size), examples)


def summary_json(report: Report) -> dict:
    """spectrum.json: settings, training outcome and every scalar measure."""
    c, m, t = report.config, report.measures, report.training
    nodes = np.asarray(m.density.nodes)
    trace = slq_trace(report)
    examples, chunk = loss_examples(report)
    return {
        "settings": dataclasses.asdict(c),
        "loss": {"examples": examples, "chunk": chunk,
                 "batch_norm": "train" if c.batch_norm else "none", "dropout": "off",
                 "num_params": sum(m.block_sizes.values())},
        "training": {"status": t.status[0], "epochs": scalar(t.epochs[0]),
                     "train_loss": scalar(t.train_loss[0]), "train_acc": scalar(t.train_acc[0]),
                     "test_loss": scalar(t.test_loss[0]), "test_acc": scalar(t.test_acc[0]),
                     "wall_s": report.train_s},
        "edge_of_stability": 2 / c.lr,
        "lambda_max": {"value": scalar(m.lambda_max.eigenvalue),
                       "residual": scalar(m.lambda_max.residual),
                       "converged": scalar(m.lambda_max.converged),
                       "num_hvps": scalar(m.lambda_max.num_hvps),
                       "wall_s": m.wall_s["lambda_max"]},
        "trace_hutchinson": trace_json(m.hutchinson, m.wall_s["hutchinson"]),
        "trace_hutchpp": trace_json(m.hutchpp, m.wall_s["hutchpp"]),
        "density": {"num_probes": c.probes, "num_iters": c.slq_iters,
                    "num_hvps_at_most": c.probes * c.slq_iters,
                    "largest_node": scalar(nodes.max()), "smallest_node": scalar(nodes.min()),
                    "trace": scalar(trace.moment), "trace_stderr": scalar(trace.stderr),
                    "sigma": report.curve.sigma,
                    "sigma_rule": f"{c.sigma_fraction:g} x (largest - smallest Ritz node)",
                    "grid_points": len(report.curve.grid), "wall_s": m.wall_s["density"]},
        "layers": {"num_hvps": sum(scalar(r.num_hvps) for r in m.layers.values()),
                   "wall_s": m.wall_s["layers"],
                   "top": {row["layer"]: {k: row[k] for k in LAYER_COLUMNS[1:]}
                           for row in layer_rows(report)}},
        "adaptive_sharpness": {"value": scalar(m.adaptive.sharpness),
                               "loss": scalar(m.adaptive.loss),
                               "perturbed_loss": scalar(m.adaptive.perturbed_loss),
                               "rho": c.adaptive_rho, "eta": c.adaptive_eta,
                               "num_steps": c.adaptive_steps,
                               "num_gradients": c.adaptive_steps + 1,
                               "wall_s": m.wall_s["adaptive"]},
        "wall_s_note": "wall times include compilation",
        "environment": results.environment(),
        "finished_at": results.timestamp(),
    }


def layer_rows(report: Report) -> list[dict]:
    """layers.csv: one row per parameter group, in parameter order."""
    m = report.measures
    return [{"layer": name, "top_eigenvalue": scalar(r.eigenvalue),
             "block_size": m.block_sizes[name], "residual": scalar(r.residual),
             "num_hvps": scalar(r.num_hvps), "converged": scalar(r.converged)}
            for name, r in m.layers.items()]


def density_rows(curve: Curve) -> list[dict]:
    """density.csv: the smoothed density at each grid point."""
    return [{"eigenvalue": float(g), "density": float(d)}
            for g, d in zip(curve.grid, curve.density, strict=True)]


def title_of(report: Report) -> str:
    """E.g. "vgg11 width 0.25 on cifar10 (1000 train examples), batch 100, LR 0.1, seed 0: ..."."""
    c, t = report.config, report.training
    model = c.model + "".join(f" {k} {v:g}" for k, v in (("width", c.width), ("hidden", c.hidden))
                              if v is not None) + (" with BatchNorm" if c.batch_norm else "")
    return (f"{model} on {c.dataset} ({len(report.dataset.x_train)} train examples), batch "
            f"{c.batch_size}, LR {c.lr:g}, seed {c.seed}: {t.status[0].replace('_', ' ')} after "
            f"{t.epochs[0]} epochs, train acc {t.train_acc[0]:.3f}, test acc {t.test_acc[0]:.3f}")


def caption_of(report: Report) -> str:
    """How the figure's measures were taken."""
    c, curve = report.config, report.curve
    examples, chunk = loss_examples(report)
    batch_norm = "BatchNorm in train mode, " if c.batch_norm else ""
    return (f"Loss: {examples} strided train examples in chunks of "
            f"{chunk}, {batch_norm}dropout off. Density: SLQ, "
            f"{c.probes} probes x {c.slq_iters} Lanczos steps, Gaussian smoothing sigma = "
            f"{c.sigma_fraction:g} x node range = {curve.sigma:.3g}.")


def draw(report: Report) -> Figure:
    """spectrum.png: the density (left) and the layers' top eigenvalues (right)."""
    c, m, curve = report.config, report.measures, report.curve
    lam = float(m.lambda_max.eigenvalue)
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    floor = DENSITY_FLOOR * curve.density.max()
    left.plot(curve.grid, np.maximum(curve.density, floor), color="C0", label="SLQ density")
    left.axvline(lam, color="C3", label=f"lambda_max = {lam:.4g}")
    left.axvline(2 / c.lr, color="gray", linestyle="--", label=f"2 / LR = {2 / c.lr:.4g}")
    left.set_yscale("log")
    left.set_ylim(floor, 2 * curve.density.max())
    left.set_xlabel("eigenvalue")
    left.set_ylabel("density")
    left.set_title("Hessian eigenvalue density")
    rows = layer_rows(report)
    labels = [f"{r['layer']} ({r['block_size']:,})" for r in rows]
    right.barh(labels, [r["top_eigenvalue"] for r in rows], color="C0")
    right.axvline(lam, color="C3", label="lambda_max (bounds every block)")
    right.invert_yaxis()
    right.set_xlabel("top eigenvalue of the layer's Hessian block")
    right.set_title("per layer (parameters)")
    for ax, where in ((left, "best"), (right, "lower right")):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small", loc=where)
    fig.suptitle(title_of(report))
    fig.supxlabel(caption_of(report), fontsize="small")
    return fig


def write_outputs(report: Report, workdir: Path) -> dict[str, Path]:
    """Write the four outputs into `workdir`, each atomically and only once all four are made (a
    failure leaves the previous ones whole); their paths by file name."""
    contents = {
        JSON_FILE: json.dumps(summary_json(report), indent=2, allow_nan=False) + "\n",
        DENSITY_FILE: results.to_csv(density_rows(report.curve), DENSITY_COLUMNS),
        LAYERS_FILE: results.to_csv(layer_rows(report), LAYER_COLUMNS),
        FIGURE_FILE: plot.png_bytes(draw(report)),
    }
    for name, content in contents.items():
        results.write_atomic(workdir / name, content)
    return {name: workdir / name for name in contents}


def table(report: Report) -> str:
    """The summary printed at the end: one line per measure."""
    m, summary = report.measures, summary_json(report)
    fmt = "{:<32} {:>12} {:>10} {:>9} {:>8}"
    number = lambda v: "-" if v is None else f"{v:.5g}"
    lines = [fmt.format("measure", "value", "stderr", "HVPs", "wall s")]
    for name, key in (("lambda_max", "lambda_max"), ("trace, Hutchinson", "trace_hutchinson"),
                      ("trace, Hutch++", "trace_hutchpp")):
        s = summary[key]
        lines.append(fmt.format(name, number(s["value"]), number(s.get("stderr")),
                                s["num_hvps"], f"{s['wall_s']:.1f}"))
    d = summary["density"]
    lines.append(fmt.format("trace, SLQ (n x first moment)", number(d["trace"]),
                            number(d["trace_stderr"]), f"<={d['num_hvps_at_most']}",
                            f"{d['wall_s']:.1f}"))
    lines.append(fmt.format("largest SLQ node", number(d["largest_node"]), "", "", ""))
    lines.append(fmt.format("smallest SLQ node", number(d["smallest_node"]), "", "", ""))
    a = summary["adaptive_sharpness"]
    lines.append(fmt.format(f"adaptive sharpness (rho {a['rho']:g})", number(a["value"]), "",
                            f"{a['num_gradients']} grads", f"{a['wall_s']:.1f}"))
    for row in layer_rows(report):
        lines.append(fmt.format(f"layer {row['layer']} ({row['block_size']:,})",
                                number(row["top_eigenvalue"]), "", row["num_hvps"], ""))
    lines.append(fmt.format("layers, all blocks", "", "", summary["layers"]["num_hvps"],
                            f"{m.wall_s['layers']:.1f}"))
    t = summary["training"]
    lines += ["", (f"training: {t['status']} after {t['epochs']} epochs ({t['wall_s']:.1f} s), "
                   f"train acc {t['train_acc']:.4f}, test acc {t['test_acc']:.4f}; "
                   f"2 / LR = {summary['edge_of_stability']:.4g}; "
                   f"density sigma = {summary['density']['sigma']:.3g}")]
    return "\n".join(lines)


def main(argv=None, *, load_data: Callable = data_lib.load) -> int:
    """The spectrum of one network from the command-line flags `argv`; the exit code."""
    flags = vars(build_parser().parse_args(argv))
    cli.setup_logging()
    try:
        cli.select_platform(flags.get("platform"))
        config, options = resolve(flags)
        dataset = load_checked(config, options["data_dir"], load_data=load_data)
        workdir = sweep.make_workdir(options["workdir"])
        report = run(config, dataset, options["quiet"])
        paths = write_outputs(report, workdir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(table(report))
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0
