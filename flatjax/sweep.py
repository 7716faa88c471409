"""The sweep runner shared by every experiment: train each group, measure, record, resume.

`run_sweep(config, options)` locks the workdir, refuses one holding results of another
configuration, plans the groups of the grid (flatjax.grid), skips runs whose rows in
WORKDIR/results.csv are finished, and for each remaining group:

1. builds the model and optimizer, restores the newest good checkpoint if there is one
   (flatjax.checkpoint), and trains all members in one `train` call (tracking lambda_max every
   `track_every` steps when set), checkpointing every `checkpoint_every` epochs and at the end;
2. measures lambda_max of its members (flatjax.sharpness);
3. with tracking, appends its measurements to trajectory.csv; then appends its rows to
   results.csv (both atomically, flatjax.results; in this order, so a run whose row is in
   results.csv has its trajectory) and deletes its checkpoints.

A group that raises is recorded as `failed` with the error message, its checkpoints kept, and
the sweep goes on; a rerun retries it. Finally the experiment's figure is drawn (flatjax.plot),
and with tracking the trajectory figure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from flatjax import assemble, grid, parallel, plot, results, sharpness
from flatjax import data as data_lib
from flatjax import train as train_lib
from flatjax.checkpoint import GroupCheckpoints
from flatjax.config import (
    CONFIG_FILE,
    ConfigError,
    RunOptions,
    SweepConfig,
    config_hash,
    with_defaults,
    without_unmeasured,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"
ERROR_CHARS = 2000


class SweepOutcome(NamedTuple):
    """The rows of every run of the sweep, whether all finished, and the figures drawn."""

    rows: list
    exit_code: int
    figure: Path | None
    trajectory_figure: Path | None = None


def run_sweep(config: SweepConfig, options: RunOptions, *,
              load_data: Callable = data_lib.load) -> SweepOutcome:
    """Run (or resume) the sweep `config` in `options.workdir`; see the module docstring.

    Args:
      config: the grid and protocol.
      options: how to run it.
      load_data: `load_data(name, data_dir, train_subset=n)` -> a Dataset (flatjax.data.load).

    Returns:
      SweepOutcome; exit_code is 0 when every run finished (converged, not_converged or
      diverged) and 1 when some failed.

    Raises:
      ConfigError: bad input (workdir, data, grid), before any training.
    """
    mesh = device_mesh(options)
    created = not Path(options.workdir).exists()
    workdir = make_workdir(options.workdir)
    try:
        return sweep_in(workdir, config, options, load_data, mesh)
    except ConfigError:
        if created:  # refused before any output: leave no trace
            (workdir / LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                workdir.rmdir()
        raise


def sweep_in(workdir: Path, config: SweepConfig, options: RunOptions, load_data: Callable,
             mesh) -> SweepOutcome:
    """`run_sweep` in a created `workdir`."""
    with workdir_lock(workdir):
        check_configuration(workdir, config, options.fresh)
        groups = grid.plan_groups(config, options.max_members)
        for batch_norm, dropout in {(g.batch_norm, g.dropout) for g in groups}:
            assemble.build_model(config, batch_norm, dropout)
        rows = [] if options.fresh else results.read_rows(workdir / results.FILENAME)
        pending = pending_groups(config, groups, rows)
        dataset = None
        if pending:
            dataset = load_dataset(config, options, load_data)
            check_against_data(config, dataset)
        claim_workdir(workdir, config, options.fresh)
        rows = run_groups(config, options, groups, pending, dataset, workdir, rows, mesh)
    planned = {grid.run_key(config, g, m) for g in groups for m in g.members}
    sweep_rows = [r for r in rows if results.row_key(r) in planned]
    all_finished = all(r["status"] in results.FINISHED for r in sweep_rows)
    all_finished = all_finished and len(sweep_rows) == len(planned)
    trajectory = None
    if (workdir / results.TRAJECTORY_FILENAME).exists():
        trajectory = draw_figure(workdir, plot.plot_trajectory)
    return SweepOutcome(sweep_rows, 0 if all_finished else 1, draw_figure(workdir), trajectory)


def pending_groups(config, groups, rows) -> list[grid.Group]:
    """The groups with a run that has no finished row."""
    finished = {results.row_key(r) for r in rows if r["status"] in results.FINISHED}
    return [g for g in groups
            if not all(grid.run_key(config, g, m) in finished for m in g.members)]


def device_mesh(options: RunOptions):
    """The (seed, data) mesh over all devices, None for one device; ConfigError if impossible."""
    try:
        return parallel.default_mesh(options.data_parallel)
    except ValueError as error:
        raise ConfigError(f"--data_parallel: {error}") from error


def run_groups(config, options, groups, pending, dataset, workdir, rows, mesh) -> list[dict]:
    """Run the pending groups, appending their rows; all rows of results.csv after."""
    total = sum(len(g.members) for g in groups)
    to_do = sum(len(g.members) for g in pending)
    log.info("%s (%s preset): %d runs in %d groups, %d to do; workdir %s", config.experiment,
             config.preset, total, len(groups), to_do, workdir)
    with tqdm(total=total, initial=total - to_do, unit="run", desc=config.experiment,
              disable=options.quiet, dynamic_ncols=True) as bar:
        for number, group in enumerate(pending, 1):
            log.info("group %d/%d: %s", number, len(pending), group.label())
            group_rows, trajectory_rows = run_group_or_fail(config, options, group, dataset,
                                                            workdir, mesh)
            if trajectory_rows:
                results.append_rows(workdir / results.TRAJECTORY_FILENAME, trajectory_rows,
                                    results.TRAJECTORY_COLUMNS, results.trajectory_key)
            rows = results.append_rows(workdir / results.FILENAME, group_rows)
            if not options.keep_checkpoints and all(
                    r["status"] in results.FINISHED for r in group_rows):
                shutil.rmtree(checkpoint_dir(workdir, config, group), ignore_errors=True)
            log.info("group %d/%d done in %.0fs: %s", number, len(pending),
                     group_rows[0]["wall_s"], status_counts(group_rows))
            bar.update(len(group.members))
    with contextlib.suppress(OSError):
        (workdir / CHECKPOINTS).rmdir()  # only when every group's checkpoints are gone
    return rows


def make_workdir(workdir) -> Path:
    """Create the workdir; ConfigError if it cannot be written."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise ConfigError(f"workdir {workdir} is not writable ({error.strerror or error}); "
                          f"choose another with --workdir") from error
    return workdir


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Hold an exclusive lock on the workdir (released even if the process is killed)."""
    with open(workdir / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another sweep is running in {workdir}; wait for it to end or "
                              f"choose another --workdir") from None
        yield


def check_configuration(workdir: Path, config: SweepConfig, fresh: bool) -> None:
    """ConfigError if the workdir holds results of another configuration, unless `fresh`."""
    differences = config_differences(workdir, config)
    if differences and not fresh:
        raise ConfigError(
            f"workdir {workdir} holds results of a different configuration ({differences}); "
            f"rerun with --fresh to move them aside and start over, or choose another --workdir")


def claim_workdir(workdir: Path, config: SweepConfig, fresh: bool) -> None:
    """With `fresh` move the previous outputs aside; write config.json."""
    if fresh:
        archive_previous(workdir)
    results.write_atomic(workdir / CONFIG_FILE, json.dumps(config.to_json(), indent=2) + "\n")


def holds_results(workdir: Path) -> bool:
    """Whether `workdir` has results.csv, trajectory.csv or checkpoints."""
    checkpoints = workdir / CHECKPOINTS
    return any((workdir / name).exists()
               for name in (results.FILENAME, results.TRAJECTORY_FILENAME)) or (
        checkpoints.is_dir() and any(checkpoints.iterdir()))


def config_differences(workdir: Path, config: SweepConfig) -> str:
    """What differs between `config` and the results already in `workdir` ("" if nothing)."""
    if not holds_results(workdir):
        return ""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return f"it has results or checkpoints but no {CONFIG_FILE}"
    try:
        saved = with_defaults(json.loads(path.read_text()))
    except json.JSONDecodeError:
        return f"{path} is not valid JSON"
    saved, new = without_unmeasured(saved), without_unmeasured(config.to_json())
    keys = sorted(k for k in set(saved) | set(new) if saved.get(k) != new.get(k))
    text = ", ".join(f"{k}: {saved.get(k)!r} -> {new.get(k)!r}" for k in keys)
    if "adaptive_rho" in keys and saved.get("adaptive_rho") is None:
        text += "; --adaptive_rho=0 keeps adaptive sharpness unmeasured, as these results are"
    return text


def archive_previous(workdir: Path) -> None:
    """Move results.csv, trajectory.csv, config.json, checkpoints and figures into
    workdir/replaced-<time>/."""
    names = [results.FILENAME, results.TRAJECTORY_FILENAME, CONFIG_FILE, CHECKPOINTS] + [
        p.name for p in workdir.glob("*.png")]
    present = [workdir / n for n in names if (workdir / n).exists()]
    if not present:
        return
    target = Path(tempfile.mkdtemp(prefix=f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-",
                                   dir=workdir))
    for p in present:
        shutil.move(str(p), str(target / p.name))
    log.info("--fresh: moved the previous results of %s to %s", workdir, target)


def load_dataset(config: SweepConfig, options: RunOptions, load_data: Callable):
    """The sweep's dataset; ConfigError when it cannot be loaded."""
    try:
        return load_data(config.dataset, options.data_dir, train_subset=config.train_subset)
    except (OSError, ValueError) as error:
        raise ConfigError(f"could not load dataset {config.dataset!r}: {error}") from error


def check_against_data(config: SweepConfig, dataset) -> None:
    """ConfigError when a batch size or the lambda_max subset exceeds the training set."""
    n = len(dataset.x_train)
    where = f"the {n} training examples of {config.dataset}"
    if config.train_subset is not None:
        where += f" (--train_subset={config.train_subset})"
    too_big = [b for b in config.batch_sizes if b > n]
    if too_big:
        raise ConfigError(f"batch size {too_big[0]} exceeds {where}; lower --batch_sizes")
    if config.lambda_subset is not None and config.lambda_subset > n:
        raise ConfigError(f"--lambda_subset={config.lambda_subset} exceeds {where}")


def run_group_or_fail(config, options, group, dataset, workdir, mesh):
    """The group's (rows, trajectory rows); `failed` rows carrying the error if it raises."""
    start = time.monotonic()
    try:
        return run_group(config, options, group, dataset, workdir, mesh)
    except Exception as error:  # a failed group must not stop the sweep
        log.error("group %s failed:\n%s", group.label(), traceback.format_exc())
        message = f"{type(error).__name__}: {error}".strip()[:ERROR_CHARS]
        return [
            {**base_row(config, group, m), "status": "failed", "error": message,
             "wall_s": time.monotonic() - start, "finished_at": results.timestamp()}
            for m in group.members
        ], []


def run_group(config, options, group, dataset, workdir, mesh):
    """Train, checkpoint and measure one group on `mesh`; its rows and trajectory rows (see the
    module docstring)."""
    start = time.monotonic()
    model = assemble.build_model(config, group.batch_norm, group.dropout)
    optimizer = assemble.build_optimizer(config, model, dataset.x_train.shape[1:])
    seeds = [m.seed for m in group.members]
    lrs = [m.lr for m in group.members]
    hparams = assemble.member_hparams(config, [m.rho for m in group.members])
    checkpoints = GroupCheckpoints(checkpoint_dir(workdir, config, group),
                                   options.checkpoint_every, group.label())
    try:
        restored = None
        if checkpoints.exist():
            restored = checkpoints.restore(abstract_state(
                model, optimizer, config, group.batch_size, seeds, lrs, hparams, dataset))
        spent_before = restored.elapsed_s if restored else 0.0

        def elapsed():
            return spent_before + time.monotonic() - start

        def on_epoch(state, _):
            epoch = int(np.max(state.epoch))
            if checkpoints.due(epoch):
                checkpoints.save(state, epoch, elapsed())

        result = train_lib.train(
            model, dataset, batch_size=group.batch_size, lrs=lrs, seeds=seeds,
            max_epochs=config.max_epochs, target_acc=config.target_acc, optimizer=optimizer,
            hparams=hparams, tracking=assemble.tracking(config),
            state=restored.state if restored else None, callback=on_epoch,
            progress=not options.quiet, desc=group.label(), mesh=mesh)
        checkpoints.save(result.state, int(np.max(result.epochs)), elapsed())
    finally:
        checkpoints.close()
    log.info("group %s: measuring lambda_max", group.label())
    measured = sharpness.group_sharpness(
        model, optimizer, config, group.batch_size, group.batch_norm, lrs,
        options.lambda_members, result.state, result.status, dataset, mesh)
    return (member_rows(config, group, result, measured, elapsed()),
            trajectory_rows(config, group, result.trajectory))


def checkpoint_dir(workdir: Path, config: SweepConfig, group: grid.Group) -> Path:
    """WORKDIR/checkpoints/<group hash>."""
    return workdir / CHECKPOINTS / grid.group_hash(config, group)


def abstract_state(model, optimizer, config, batch_size, seeds, lrs, hparams, dataset):
    """Structure, shapes and dtypes of the group's TrainState, without computing it."""
    programs = train_lib.compile_programs(model, optimizer, train_lib.TrainConfig(
        batch_size, config.max_epochs, config.target_acc, tracking=assemble.tracking(config)))
    x = jax.ShapeDtypeStruct(dataset.x_train.shape, dataset.x_train.dtype)
    y = jax.ShapeDtypeStruct(dataset.y_train.shape, dataset.y_train.dtype)
    member_hp = train_lib.member_hparams(lrs, hparams, len(seeds))
    shapes = jax.eval_shape(programs.init, train_lib.member_seeds(seeds), member_hp, x, y)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def base_row(config: SweepConfig, group: grid.Group, member: grid.Member) -> dict:
    """The settings and provenance cells of a run's row."""
    settings = grid.run_settings(config, group, member)
    return {**settings, "seed": member.seed, "config_hash": config_hash(settings),
            "group_hash": grid.group_hash(config, group), **results.environment()}


def member_rows(config, group, result: train_lib.TrainResult, measured: sharpness.Sharpness,
                wall_s: float) -> list[dict]:
    """One finished row per member of a trained and measured group."""
    rows = []
    for i, member in enumerate(group.members):
        was_measured = bool(measured.method[i])
        rows.append({
            **base_row(config, group, member),
            "status": result.status[i],
            "epochs": int(result.epochs[i]),
            "train_loss": float(result.train_loss[i]),
            "train_acc": float(result.train_acc[i]),
            "test_loss": float(result.test_loss[i]),
            "test_acc": float(result.test_acc[i]),
            "lambda_max": float(measured.eigenvalue[i]),
            "lambda_max_residual": float(measured.residual[i]),
            "lambda_max_hvps": int(measured.num_hvps[i]) if was_measured else None,
            "lambda_max_converged": bool(measured.converged[i]) if was_measured else None,
            "lambda_method": measured.method[i],
            "adaptive_sharpness": float(measured.adaptive[i]),
            "wall_s": wall_s,
            "error": "",
            "finished_at": results.timestamp(),
        })
    return rows


def trajectory_rows(config, group, trajectory: train_lib.Trajectory | None) -> list[dict]:
    """One row per member and lambda_max measurement taken during training ([] without)."""
    if trajectory is None:
        return []
    return [
        {**base_row(config, group, member), "step": int(trajectory.step[j]),
         "epoch": int(trajectory.epoch[j]), "lambda_max": float(trajectory.eigenvalue[i, j]),
         "num_hvps": int(trajectory.num_hvps[i, j]), "converged": bool(trajectory.converged[i, j])}
        for i, member in enumerate(group.members) for j in range(trajectory.count[i])
    ]


def status_counts(rows) -> str:
    """E.g. "3 converged, 1 diverged"."""
    counts = {s: sum(r["status"] == s for r in rows) for s in results.STATUSES}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs"


def draw_figure(workdir: Path, draw: Callable = plot.plot_workdir) -> Path | None:
    """Redraw a figure of the workdir (`draw(workdir)`, the experiment's by default); None (with
    a logged error) when that fails."""
    try:
        return draw(workdir)
    except Exception:  # the results are safe on disk; a figure problem must not hide them
        log.error("could not draw the figure of %s:\n%s", workdir, traceback.format_exc())
        return None

