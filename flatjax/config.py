"""What a sweep computes (`SweepConfig`) and how it is run (`RunOptions`), from flat settings.

Settings are flat dicts keyed by command-line flag names (`lrs`, `batch_sizes`, `lambda_subset`,
...), the form presets are written in (flatjax.presets). `SweepConfig` holds everything that
changes the numbers in results.csv; it is stored as WORKDIR/config.json and hashed. `RunOptions`
holds how the work is carried out (workdir, checkpoints, memory chunking, output).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

CONFIG_FILE = "config.json"
OPTIMIZERS = ("sgd", "sam")
SAM_POLICIES = ("clean", "perturbed", "both")
LAMBDA_BATCH_NORM_MODES = ("train", "eval")


class ConfigError(ValueError):
    """Bad input: the message says what was wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The resolved grid and protocol of one sweep; every field can change the results.

    Runs are the product batch_sizes x batch_norms x dropouts x lrs x rhos x seeds (seeds are
    0..seeds-1). `width` and `hidden` are passed to the model when set (VGG width multiplier,
    MLP hidden units). `lambda_*` fields set how lambda_max is measured (flatjax.sharpness).
    `track_every` > 0 also measures lambda_max every that many training steps, with the same
    settings, into trajectory.csv (flatjax.train.Tracking); it leaves the runs' results alone, so
    it is not part of their hash. `adaptive_rho` set also measures adaptive sharpness at the final
    weights (flatjax.sharpness), with `adaptive_steps` ascent steps.
    """

    experiment: str
    preset: str
    figure: str
    dataset: str
    model: str
    batch_sizes: tuple[int, ...]
    lrs: tuple[float, ...]
    max_epochs: int
    seeds: int = 1
    train_subset: int | None = None
    width: float | None = None
    hidden: int | None = None
    optimizer: str = "sgd"
    sam_policy: str = "both"
    rhos: tuple[float, ...] = (0.0,)
    dropouts: tuple[float, ...] = (0.0,)
    batch_norms: tuple[bool, ...] = (False,)
    target_acc: float = 0.99
    lambda_subset: int | None = 1000
    lambda_batch_norm: str = "train"
    lambda_iters: int = 100
    lambda_tol: float | None = None
    between_iterates_below_lr: float | None = None
    between_iterates_points: int = 8
    track_every: int = 0
    adaptive_rho: float | None = None
    adaptive_steps: int = 10

    def __post_init__(self):
        problems = config_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))

    def to_json(self) -> dict:
        """A JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a sweep is carried out, not what it computes.

    (`max_members` and `lambda_members` change the width of vmapped programs, which may round
    differently in the last bits.)

    Attributes:
      workdir: folder of results.csv, config.json, checkpoints/ and the figure.
      data_dir: where datasets are looked for first (flatjax.data); None for the default search.
      checkpoint_every: save each group's training state every this many epochs and at the end of
        training; 0 disables checkpoints.
      keep_checkpoints: keep a group's checkpoints after its rows are written.
      fresh: move away the results of a different configuration in `workdir` and start over.
      quiet: log lines only, no progress bars.
      max_members: train at most this many members per compiled call (0: a whole group).
      lambda_members: members per vmapped lambda_max call, the rest one chunk after another
        (0: all members at once; ignored on a mesh of several devices).
      data_parallel: devices per data-axis row of the device mesh (flatjax.parallel): each
        minibatch and HVP chunk is split over this many devices, and the members over the rest.
    """

    workdir: Path
    data_dir: str | None = None
    checkpoint_every: int = 5
    keep_checkpoints: bool = False
    fresh: bool = False
    quiet: bool = False
    max_members: int = 0
    lambda_members: int = 0
    data_parallel: int = 1

    def __post_init__(self):
        for name in ("checkpoint_every", "max_members", "lambda_members"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.data_parallel < 1:
            raise ConfigError(f"--data_parallel must be >= 1, got {self.data_parallel}")


SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(SweepConfig))
RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunOptions))
TUPLE_KEYS = ("batch_sizes", "lrs", "rhos", "dropouts", "batch_norms")


def config_problems(config: SweepConfig) -> list[str]:
    """Messages for every invalid field of `config` (empty when valid)."""
    problems = []
    for name in TUPLE_KEYS:
        if not getattr(config, name):
            problems.append(f"--{name} needs at least one value")
    if any(b < 1 for b in config.batch_sizes):
        problems.append(f"batch sizes must be positive integers, got {list(config.batch_sizes)}")
    if any(not 0 < lr < math.inf for lr in config.lrs):
        problems.append(f"learning rates must be positive and finite, got {list(config.lrs)}")
    if any(not rho >= 0 for rho in config.rhos):
        problems.append(f"rho must be >= 0, got {list(config.rhos)}")
    if any(not 0 <= p < 1 for p in config.dropouts):
        problems.append(f"dropout probabilities must be in [0, 1), got {list(config.dropouts)}")
    if config.optimizer not in OPTIMIZERS:
        problems.append(f"unknown optimizer {config.optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if config.optimizer == "sgd" and config.rhos != (0.0,):
        problems.append(f"rho is a SAM setting; experiment {config.experiment!r} uses plain SGD "
                        f"(drop --rhos)")
    if config.sam_policy not in SAM_POLICIES:
        problems.append(f"unknown SAM BatchNorm policy {config.sam_policy!r}; "
                        f"known: {', '.join(SAM_POLICIES)}")
    if config.lambda_batch_norm not in LAMBDA_BATCH_NORM_MODES:
        problems.append(f"--lambda_batch_norm must be one of {', '.join(LAMBDA_BATCH_NORM_MODES)}, "
                        f"got {config.lambda_batch_norm!r}")
    positive = {"seeds": config.seeds, "max_epochs": config.max_epochs,
                "lambda_iters": config.lambda_iters}
    for name, value in positive.items():
        if value < 1:
            problems.append(f"--{name} must be >= 1, got {value}")
    for name in ("train_subset", "lambda_subset", "hidden"):
        value = getattr(config, name)
        if value is not None and value < 1:
            problems.append(f"--{name} must be >= 1, got {value}")
    if config.lambda_tol is not None and not config.lambda_tol >= 0:
        problems.append(f"--lambda_tol must be >= 0, got {config.lambda_tol}")
    if config.width is not None and not config.width > 0:
        problems.append(f"--width must be > 0, got {config.width}")
    if not 0 < config.target_acc <= 1:
        problems.append(f"--target_acc must be in (0, 1], got {config.target_acc}")
    if config.track_every < 0:
        problems.append(f"--track_every must be >= 0 (0: no tracking), got {config.track_every}")
    if config.adaptive_rho is not None and not 0 < config.adaptive_rho < math.inf:
        problems.append(f"--adaptive_rho must be > 0 and finite (0: not measured), "
                        f"got {config.adaptive_rho}")
    if config.adaptive_steps < 0:
        problems.append(f"--adaptive_steps must be >= 0, got {config.adaptive_steps}")
    if config.between_iterates_points < 2:
        problems.append(f"--between_iterates_points must be >= 2, "
                        f"got {config.between_iterates_points}")
    return problems


def with_defaults(saved: dict) -> dict:
    """A saved config.json's dict with the defaults of the fields it lacks (fields added since
    it was written, which it ran with)."""
    defaults = {f.name: f.default for f in dataclasses.fields(SweepConfig)
                if f.default is not dataclasses.MISSING}
    return {**json.loads(json.dumps(defaults)), **saved}


def split_settings(settings: dict) -> tuple[SweepConfig, RunOptions]:
    """(SweepConfig, RunOptions) from one flat settings dict; unknown keys are an error."""
    unknown = set(settings) - set(SWEEP_KEYS) - set(RUN_KEYS)
    if unknown:
        raise ConfigError(f"unknown settings {', '.join(sorted(unknown))}")
    sweep = {k: v for k, v in settings.items() if k in SWEEP_KEYS}
    run = {k: v for k, v in settings.items() if k in RUN_KEYS}
    for name in TUPLE_KEYS:
        if name in sweep:
            sweep[name] = tuple(sweep[name])
    required = [f.name for f in dataclasses.fields(SweepConfig) if f.default is dataclasses.MISSING]
    missing = [name for name in required + ["workdir"] if name not in settings]
    if missing:
        raise ConfigError(f"settings lack {', '.join(missing)}")
    run["workdir"] = Path(run["workdir"])
    return SweepConfig(**sweep), RunOptions(**run)


def without_unmeasured(settings: dict) -> dict:
    """`settings` less the adaptive sharpness settings when it is not measured (adaptive_rho
    None): they then change no result."""
    if settings.get("adaptive_rho") is None:
        return {k: v for k, v in settings.items() if k not in ("adaptive_rho", "adaptive_steps")}
    return settings


def config_hash(payload: dict) -> str:
    """A short, stable hash of a JSON-ready dict (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
