"""The command line shared by every experiment script: flags -> settings -> `run_sweep`.

    python experiments/batch_lr.py --platform=cpu --preset=smoke --workdir=runs/x --seeds=2 \\
        --lrs=0.01,0.1 --batch_sizes=100,1000 --max_epochs=50 --quiet

Flags left out take the preset's value (flatjax.presets). Exit codes: 0 when every run
finished, 1 when some run failed, 2 for bad input.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
from tqdm.auto import tqdm

from flatjax import data as data_lib
from flatjax import parallel, presets, results, summary, sweep
from flatjax.config import ConfigError, split_settings

PLATFORMS = ("cpu", "gpu", "tpu")


def parse_bool(text: str) -> bool:
    """"true"/"false" (also 1/0, yes/no), case-insensitive."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def finite_float(text: str) -> float:
    """A finite number (inf and nan are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def list_of(parse: Callable, kind: str) -> Callable[[str], tuple]:
    """An argparse type for a comma-separated list of `kind`."""

    def parse_list(text: str) -> tuple:
        try:
            return tuple(parse(item) for item in text.split(",") if item.strip())
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {kind}, got {text!r}") from None

    return parse_list


def zero_is_none(parse: Callable) -> Callable[[str], object]:
    """An argparse type where 0 means None (e.g. "no subset")."""

    def parse_value(text: str):
        value = parse(text)
        return None if value == 0 else value

    parse_value.__name__ = getattr(parse, "__name__", "value")  # argparse's "invalid int value"
    return parse_value


FLAGS = (
    # (name, type, help)
    ("preset", str, "smoke | cpu | paper (default: cpu on the CPU, paper elsewhere)"),
    ("workdir", Path, "output folder (default: runs/EXPERIMENT_PRESET)"),
    ("data_dir", str, "folder holding the datasets (see flatjax.data)"),
    ("seeds", int, "number of seeds per grid point (seeds 0..N-1)"),
    ("lrs", list_of(finite_float, "finite numbers"), "learning rates, e.g. 0.01,0.1"),
    ("batch_sizes", list_of(int, "integers"), "batch sizes, e.g. 100,1000"),
    ("rhos", list_of(finite_float, "finite numbers"), "SAM radii (SAM experiments only)"),
    ("dropouts", list_of(finite_float, "finite numbers"), "dropout probabilities in [0, 1)"),
    ("batch_norms", list_of(parse_bool, "true/false"), "BatchNorm off/on, e.g. false,true"),
    ("max_epochs", int, "epoch cap; a run that has not reached the target is not_converged"),
    ("target_acc", finite_float, "train accuracy at which a run has converged (paper: 0.99)"),
    ("train_subset", zero_is_none(int), "strided training subset size (0: the full set)"),
    ("width", finite_float, "VGG width multiplier"),
    ("hidden", int, "MLP hidden units"),
    ("sam_policy", str, "which SAM pass updates BatchNorm statistics: clean | perturbed | both"),
    ("lambda_subset", zero_is_none(int), "examples in the strided lambda_max subset (0: all)"),
    ("lambda_batch_norm", str, "BatchNorm mode of the lambda_max loss: train | eval"),
    ("lambda_iters", int, "Lanczos iterations cap"),
    ("lambda_tol", finite_float, "Lanczos relative residual tolerance"),
    ("between_iterates_below_lr", zero_is_none(finite_float),
     "BatchNorm nets with LR below this use the between-iterates lambda_max (0: never)"),
    ("between_iterates_points", int, "interpolation points of the between-iterates measure"),
    ("adaptive_rho", zero_is_none(finite_float),
     "radius of the adaptive sharpness measured next to lambda_max (0: not measured)"),
    ("adaptive_steps", int, "gradient-ascent steps of the adaptive sharpness measure"),
    ("track_every", int, "measure lambda_max every K training steps too, warm-started (0: off)"),
    ("checkpoint_every", int, "checkpoint each group every N epochs (0: no checkpoints)"),
    ("max_members", int, "members per compiled training call (0: the whole group)"),
    ("lambda_members", int, "members per vmapped lambda_max call (0: all at once)"),
    ("data_parallel", int, "devices that split each batch; the other devices split the seeds"),
)
SWITCHES = (
    ("quiet", "log lines only, no progress bars"),
    ("fresh", "move the workdir's previous results aside and start over"),
    ("keep_checkpoints", "keep each group's checkpoints after its rows are written"),
    ("distributed", "multi-host: call jax.distributed.initialize() first (run on every host)"),
)


def build_parser(experiment: str) -> argparse.ArgumentParser:
    """The parser of the shared flags; flags not given are absent from the namespace."""
    parser = argparse.ArgumentParser(
        prog=f"experiments/{experiment}.py", argument_default=argparse.SUPPRESS,
        description=f"Run (or resume) the {experiment} sweep. Flags left out take the preset's "
                    f"value. Exit code 0: every run finished; 1: some failed; 2: bad input.")
    parser.add_argument("--platform", choices=PLATFORMS,
                        help="JAX backend (default: JAX's choice)")
    for name, kind, text in FLAGS:
        parser.add_argument(f"--{name}", type=kind, help=text)
    for name, text in SWITCHES:
        parser.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, help=text)
    return parser


def select_platform(platform: str | None) -> str:
    """Make `platform` JAX's backend (before any computation); return the backend in use.

    "cpu" is forced through `jax_platforms`. JAX already prefers a GPU or TPU whenever one is
    present, so "gpu" and "tpu" are checked rather than forced (`jax_platforms=gpu` would also
    demand a ROCm backend on CUDA machines).
    """
    if platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
    try:
        backend = jax.default_backend()
    except RuntimeError as error:
        raise ConfigError(f"JAX could not start a backend: {error}") from error
    if platform is not None and backend != platform:
        raise ConfigError(
            f"--platform={platform} was asked for, but JAX has no {platform} backend here "
            f"(it found {backend}); install the JAX build for it (pip install -e '.[cuda12]' "
            f"or '.[tpu]') or use --platform={backend}")
    return backend


class TqdmHandler(logging.Handler):
    """Log records written between progress bars."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging() -> None:
    """flatjax's INFO log lines on stderr, with times."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("flatjax")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def settings_from_flags(experiment: str, flags: dict, backend: str,
                        experiments: Mapping[str, presets.Experiment]) -> dict:
    """Flat settings: the preset (default by backend) with the given flags on top."""
    overrides = {k: v for k, v in flags.items() if k not in ("platform", "preset", "distributed")}
    preset = flags.get("preset") or ("cpu" if backend == "cpu" else "paper")
    settings = presets.resolve(experiment, preset, overrides, experiments)
    settings.setdefault("workdir", Path("runs") / f"{experiment}_{preset}")
    return settings


def report(outcome: sweep.SweepOutcome, note: str, workdir: Path) -> str:
    """The text printed after a sweep: summary table, status counts, where outputs are."""
    lines = [summary.table(outcome.rows), "",
             f"runs: {sweep.status_counts(outcome.rows)}",
             f"results: {workdir / results.FILENAME}",
             f"figure: {outcome.figure or 'not drawn (see the log)'}"]
    if (workdir / results.TRAJECTORY_FILENAME).exists():
        lines += [f"trajectory: {workdir / results.TRAJECTORY_FILENAME}",
                  f"trajectory figure: {outcome.trajectory_figure or 'not drawn (see the log)'}"]
    if note:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def main(experiment: str, argv=None, *,
         experiments: Mapping[str, presets.Experiment] = presets.EXPERIMENTS,
         load_data: Callable = data_lib.load) -> int:
    """Run the sweep of `experiment` with the command-line flags `argv`; the exit code."""
    flags = vars(build_parser(experiment).parse_args(argv))
    setup_logging()
    try:
        spec = presets.get_experiment(experiment, experiments)
        if flags.get("distributed"):
            parallel.initialize_distributed()
        backend = select_platform(flags.get("platform"))
        config, options = split_settings(
            settings_from_flags(experiment, flags, backend, experiments))
        if spec.note:
            logging.getLogger("flatjax").info("note: %s", spec.note)
        outcome = sweep.run_sweep(config, options, load_data=load_data)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are in results.csv and running groups resume from "
              "their last checkpoint; rerun the same command to continue", file=sys.stderr)
        return 130
    print(report(outcome, spec.note, options.workdir))
    return outcome.exit_code
