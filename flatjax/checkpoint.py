"""Verified orbax checkpoints of one group's training state, with fallback to older ones.

Each checkpoint step (the group's epoch) holds the full `TrainState` and a JSON record with a
SHA-256 digest of its arrays and the training seconds spent so far. A step that cannot be read,
or whose arrays do not match the digest, is reported, deleted, and the next older one is tried;
if none is good training starts from scratch. Orbax writes each step to a temporary folder and
renames it when complete, so a killed process never leaves a step that looks finished.

A state that is a NamedTuple is stored as a dict of its fields that are not None, so an optional
field left None (the TrainState's tracker without tracking) is not written, and checkpoints made
before such a field existed still restore.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Restored(NamedTuple):
    """A restored training state, its epoch and the training seconds spent before it."""

    state: Any
    epoch: int
    elapsed_s: float


def digest(tree) -> str:
    """SHA-256 over the dtypes, shapes and bytes of every leaf of `tree`, in order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        leaf = np.ascontiguousarray(leaf)
        h.update(f"{leaf.dtype.str}{leaf.shape}".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


def is_namedtuple(tree) -> bool:
    """Whether `tree` is a NamedTuple instance."""
    return isinstance(tree, tuple) and hasattr(tree, "_fields")


def stored(state):
    """The tree a checkpoint holds for `state` (module docstring)."""
    if is_namedtuple(state):
        return {k: v for k, v in state._asdict().items() if v is not None}
    return state


class GroupCheckpoints:
    """One group's checkpoints under `directory`: saved every `every` epochs, newest good restored.

    Keeps the two newest steps, so a damaged newest step falls back to the one before it.
    """

    def __init__(self, directory: Path, every: int, label: str = ""):
        self.directory = Path(directory)
        self.every = every
        self.label = label or self.directory.name
        self._manager = None

    @property
    def manager(self) -> ocp.CheckpointManager:
        """The orbax manager, created on first use."""
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=2, create=True, enable_async_checkpointing=False,
                cleanup_tmp_directories=True)
            self._manager = ocp.CheckpointManager(self.directory.absolute(), options=options)
        return self._manager

    def save(self, state, epoch: int, elapsed_s: float) -> None:
        """Save `state` as step `epoch` unless that step exists already."""
        if self.every == 0 or epoch in self.manager.all_steps():
            return
        meta = {"digest": digest(state), "epoch": epoch, "elapsed_s": elapsed_s}
        self.manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(stored(state)), meta=ocp.args.JsonSave(meta)))

    def exist(self) -> bool:
        """Whether any checkpoint step folder is present."""
        return self.directory.is_dir() and any(
            p.name.isdigit() for p in self.directory.iterdir())

    def due(self, epoch: int) -> bool:
        """Whether a periodic checkpoint falls at `epoch`."""
        return self.every > 0 and epoch % self.every == 0

    def restore(self, abstract_state) -> Restored | None:
        """The newest step that reads back and matches its digest, or None (see module docstring).

        Checkpoints are restored whatever `every` is.

        Args:
          abstract_state: the state's structure, shapes and dtypes (e.g. from `jax.eval_shape`).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._restore_step(step, abstract_state)
            except Exception as error:  # any damage, whatever orbax or the digest raise
                log.warning("checkpoint %s of group %s is damaged (%s: %s); deleted it, falling "
                            "back to an older checkpoint or to training from scratch",
                            self.directory / str(step), self.label, type(error).__name__,
                            _first_line(error))
                self._delete_step(step)
        log.info("group %s: no usable checkpoint, training from scratch", self.label)
        return None

    def _restore_step(self, step: int, abstract_state) -> Restored:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(stored(abstract_state)), meta=ocp.args.JsonRestore()))
        meta, state = restored.meta, restored.state
        if is_namedtuple(abstract_state):
            state = abstract_state._replace(**state)
        if digest(state) != meta["digest"]:
            raise ValueError("its arrays do not match the digest saved with them")
        log.info("group %s: resuming from the checkpoint at epoch %d", self.label, step)
        return Restored(state, int(meta["epoch"]), float(meta["elapsed_s"]))

    def _delete_step(self, step: int) -> None:
        try:
            self.manager.delete(step)
        except Exception:  # a step too damaged for orbax to delete: remove its folder
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
            self.close()

    def close(self) -> None:
        """Release the orbax manager."""
        if self._manager is not None:
            self._manager.close()
            self._manager = None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "no message"
