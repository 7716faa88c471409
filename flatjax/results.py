"""results.csv: one row per run (grid point and seed), keyed by (config_hash, seed), atomic writes.

Every write replaces the whole file: the rows go to a temporary file in the same folder, which
is flushed, synced and renamed over results.csv, so a crash leaves either the old file or the
new one, never a partial row. Rows with the same key are merged (the newest wins), so a failed
run that is retried replaces its row rather than adding one.

trajectory.csv (sweeps with --track_every) is written the same way: one row per run and
lambda_max measurement during training, keyed by (config_hash, seed, step).
"""

from __future__ import annotations

import csv
import datetime
import functools
import io
import math
import os
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import jax

FILENAME = "results.csv"
FINISHED = ("converged", "not_converged", "diverged")
STATUSES = FINISHED + ("failed",)

SETTINGS_COLUMNS = (
    "experiment", "seed", "dataset", "train_subset", "model", "width", "hidden", "batch_norm",
    "dropout", "optimizer", "sam_policy", "rho", "batch_size", "lr", "max_epochs", "target_acc",
    "lambda_subset", "lambda_batch_norm", "lambda_iters", "lambda_tol",
    "between_iterates_below_lr", "between_iterates_points", "adaptive_rho", "adaptive_steps",
)
OUTCOME_COLUMNS = (
    "status", "epochs", "train_loss", "train_acc", "test_loss", "test_acc", "lambda_max",
    "lambda_max_residual", "lambda_max_hvps", "lambda_max_converged", "lambda_method",
    "adaptive_sharpness", "wall_s", "error",
)
PROVENANCE_COLUMNS = (
    "config_hash", "group_hash", "jax_version", "flax_version", "optax_version",
    "flatjax_version", "device_kind", "device_count", "finished_at",
)
COLUMNS = SETTINGS_COLUMNS + OUTCOME_COLUMNS + PROVENANCE_COLUMNS

TRAJECTORY_FILENAME = "trajectory.csv"
TRAJECTORY_COLUMNS = SETTINGS_COLUMNS + (
    "config_hash", "group_hash", "step", "epoch", "lambda_max", "num_hvps", "converged")


def format_value(value) -> str:
    """A CSV cell: "" for None, exact repr for floats (they read back bitwise), str otherwise."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def parse_float(cell: str) -> float:
    """A numeric cell as float; NaN when empty."""
    return float(cell) if cell not in ("", None) else math.nan


def row_key(row: dict) -> tuple[str, int]:
    """(config_hash, seed) of a row."""
    return row["config_hash"], int(row["seed"])


def trajectory_key(row: dict) -> tuple[str, int, int]:
    """(config_hash, seed, step) of a trajectory.csv row."""
    return row["config_hash"], int(row["seed"]), int(row["step"])


def merge(old: Iterable[dict], new: Iterable[dict], key=row_key) -> list[dict]:
    """Rows of `old` then `new`, one per key; a later row replaces an earlier one in place."""
    merged: dict[tuple, dict] = {}
    for row in [*old, *new]:
        merged[key(row)] = row
    return list(merged.values())


def read_rows(path: Path, key=row_key) -> list[dict]:
    """The rows of a results.csv (or, with `trajectory_key`, a trajectory.csv) as dicts of
    strings, one per key (empty if the file is absent)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return merge([], csv.DictReader(f), key)


def to_csv(rows: Iterable[dict], columns=COLUMNS) -> str:
    """Rows as CSV text with the header `columns`; missing cells are empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: format_value(row.get(k)) for k in columns})
    return out.getvalue()


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` by a file holding `content`, atomically and durably."""
    path = Path(path)
    data = content.encode() if isinstance(content, str) else content
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def append_rows(path: Path, rows: Iterable[dict], columns=COLUMNS, key=row_key) -> list[dict]:
    """Merge `rows` into the results file at `path` atomically; returns all rows now in it.

    `columns` and `key` are those of the file (TRAJECTORY_COLUMNS and `trajectory_key` for a
    trajectory.csv).
    """
    cells = [{k: format_value(r.get(k)) for k in columns} for r in rows]
    merged = merge(read_rows(path, key), cells, key)
    write_atomic(path, to_csv(merged, columns))
    return merged


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    """Package versions and the JAX devices, as row cells."""
    devices = jax.devices()
    versions = {f"{name}_version": _version(name) for name in ("jax", "flax", "optax", "flatjax")}
    return {**versions, "device_kind": devices[0].device_kind, "device_count": len(devices)}


def timestamp() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""
