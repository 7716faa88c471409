"""Device meshes: members sharded over a "seed" axis, examples over a "data" axis.

flatjax uses JAX's own partitioner (GSPMD) rather than hand-written collectives. A run over a
mesh places the members' state with its leading member axis split over `SEED` (each device
trains and measures its share of the seeds and hyperparameters) and the data replicated; inside
the compiled training programs each minibatch and evaluation chunk is constrained to be split
over `DATA`, so the partitioner computes every mean over a batch (losses, gradients, BatchNorm
statistics) across the devices of the data axis. The numbers are those of one device up to the
order of floating-point sums.

lambda_max is split over the seed axis only; the devices of a data row repeat its HVPs. Its
Lanczos loop stops on a residual test, and with HVP chunks split over the data axis the devices
could round that test differently, leave the loop at different iterations and wait on each other
for ever (seen on 8 forced CPU devices).

Members are padded to a multiple of the seed axis with copies of the last member, which train
and stop exactly like it, and the copies are dropped from every result.

Several hosts: call `initialize_distributed()` (`jax.distributed.initialize`) on every host
before anything else touches JAX; `jax.devices()` then lists the devices of all hosts, the mesh
spans them, and every process runs the same program on the same inputs.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

SEED, DATA = "seed", "data"


def make_mesh(data_parallel: int = 1, devices=None) -> Mesh:
    """A (seed, data) mesh over `devices` (default: all), `data_parallel` devices per data row."""
    devices = list(jax.devices() if devices is None else devices)
    if data_parallel < 1 or len(devices) % data_parallel:
        raise ValueError(
            f"data_parallel must be a positive divisor of the device count {len(devices)}, "
            f"got {data_parallel}")
    grid = np.asarray(devices, dtype=object).reshape(len(devices) // data_parallel, data_parallel)
    return Mesh(grid, (SEED, DATA))


def default_mesh(data_parallel: int = 1) -> Mesh | None:
    """A mesh over all devices, or None (plain single-device programs) when there is one."""
    if jax.device_count() == 1 and data_parallel == 1:
        return None
    return make_mesh(data_parallel)


def vmap_members(fn, mesh: Mesh | None, in_axes=0):
    """`jax.vmap` over the member axis, which is the mesh's seed axis under sharding constraints."""
    return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=SEED if mesh is not None else None)


def jit_members(fn, mesh: Mesh | None, in_axes):
    """`jax.jit` of a function over members: arguments with in_axes 0 split over the seed axis,
    those with None replicated, and every output split over the seed axis."""
    if mesh is None:
        return jax.jit(fn)
    members, shared = NamedSharding(mesh, PartitionSpec(SEED)), NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=tuple(members if axis == 0 else shared for axis in in_axes),
                   out_shardings=members)


def split_examples(tree, mesh: Mesh | None):
    """Constrain the leading (example) axis of every leaf to be split over the data axis."""
    if mesh is None or mesh.shape[DATA] == 1:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec(DATA)))


def padded_size(num_members: int, mesh: Mesh | None) -> int:
    """`num_members` rounded up to a multiple of the seed axis."""
    if mesh is None:
        return num_members
    per = mesh.shape[SEED]
    return math.ceil(num_members / per) * per


def pad_members(tree, size: int):
    """Host copies of `tree`'s leaves with the leading axis padded to `size` by the last member."""
    def pad(leaf):
        leaf = np.asarray(to_host(leaf))
        extra = size - leaf.shape[0]
        return np.concatenate([leaf, np.repeat(leaf[-1:], extra, axis=0)]) if extra else leaf
    return jax.tree.map(pad, tree)


def place(tree, mesh: Mesh | None, members: bool):
    """Put host arrays on the mesh: split over the seed axis (`members`) or replicated."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)
    sharding = NamedSharding(mesh, PartitionSpec(SEED) if members else PartitionSpec())

    def put(leaf):
        leaf = np.asarray(leaf)
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])
    return jax.tree.map(put, tree)


def place_members(tree, num_members: int, mesh: Mesh | None):
    """`tree` (leading member axis) padded for the mesh and split over its seed axis."""
    if mesh is None:
        return tree
    return place(pad_members(tree, padded_size(num_members, mesh)), mesh, members=True)


def first_members(tree, num_members: int):
    """The first `num_members` members of `tree` (drops the padding copies)."""
    return jax.tree.map(
        lambda leaf: leaf if leaf.shape[0] == num_members else leaf[:num_members], tree)


def to_host(tree):
    """Numpy copies of (possibly sharded, possibly multi-host) arrays."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def initialize_distributed(**kwargs) -> None:
    """`jax.distributed.initialize(**kwargs)`: join the hosts of a multi-host job (see module doc)."""
    jax.distributed.initialize(**kwargs)
