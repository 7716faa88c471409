"""lambda_max of every member of a trained group, in vmapped calls.

Two measures (the paper's lambda_max protocol):
- "final": lambda_max at the final weights.
- "between_iterates" (BatchNorm networks whose LR is below a threshold): one more step of the
  run's optimizer (plain SGD in the paper) from the final state, on the first minibatch of the
  epoch the run would have trained next, then the largest lambda_max over evenly spaced
  interpolations of the two variable sets (BatchNorm statistics included); the residual
  reported is that of the largest point, the HVP count the sum over points.

With `adaptive_rho` set, also the adaptive sharpness at the final weights: the largest rise of
the same loss within the |w| + 0.01-scaled ball of that radius (flatjax.spectrum.
adaptive_sharpness, by `adaptive_steps` steps of projected gradient ascent: a lower bound).

Diverged members are not measured: their cells are NaN and their method is "".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from flatjax import hessian, parallel, spectrum
from flatjax import train as train_lib
from flatjax.data import strided_subset

FINAL, BETWEEN_ITERATES = "final", "between_iterates"


class Sharpness(NamedTuple):
    """Per-member lambda_max results (NaN and "" for members not measured)."""

    eigenvalue: np.ndarray
    residual: np.ndarray
    num_hvps: np.ndarray
    converged: np.ndarray
    method: list
    adaptive: np.ndarray


def model_variables(params, batch_stats) -> dict:
    """Flax variables; `batch_stats` only when the model has any."""
    return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def lambda_settings(config) -> tuple:
    """`hessian.lambda_max` keyword arguments from a SweepConfig, as sorted (name, value) pairs."""
    settings = {"batch_norm": config.lambda_batch_norm, "subset_size": None,
                "num_iters": config.lambda_iters}
    if config.lambda_tol is not None:
        settings["tol"] = config.lambda_tol
    return tuple(sorted(settings.items()))


def map_members(fn, tree, members_per_call: int, mesh):
    """fn over the leading member axis of `tree`: one vmap, or chunks of `members_per_call`.

    Under a mesh every device holds only its share of the members, and all are vmapped at once.
    """
    if members_per_call and mesh is None:
        return jax.lax.map(fn, tree, batch_size=members_per_call)
    return parallel.vmap_members(fn, mesh)(tree)


def measure(model, variables, x, y, batch_size: int, settings: tuple):
    """(eigenvalue, residual, HVPs, converged) of lambda_max at `variables`."""
    r = hessian.lambda_max(model, variables, x, y, batch_size=batch_size, **dict(settings))
    return r.eigenvalue, r.residual, r.num_hvps, r.converged


@functools.lru_cache(maxsize=32)
def final_program(model, batch_size: int, settings: tuple, members_per_call: int, mesh):
    """Jitted `(state, x, y) ->` per-member `measure` at the final weights."""

    def one(member, x, y):
        variables = model_variables(member.params, member.batch_stats)
        return measure(model, variables, x, y, batch_size, settings)

    return parallel.jit_members(
        lambda state, x, y: map_members(lambda m: one(m, x, y), state, members_per_call, mesh),
        mesh, (0, None, None))


@functools.lru_cache(maxsize=32)
def adaptive_program(model, batch_size: int, batch_norm: str, rho: float, num_steps: int,
                     members_per_call: int, mesh):
    """Jitted `(state, x, y) ->` per-member adaptive sharpness of the lambda_max loss."""

    def one(member, x, y):
        variables = model_variables(member.params, member.batch_stats)
        chunk_loss = hessian.model_loss(model, variables, batch_norm=batch_norm)
        chunk = hessian.protocol_chunk(batch_size)
        loss = lambda p: hessian.dataset_loss(chunk_loss, p, x, y, chunk)  # noqa: E731
        return spectrum.adaptive_sharpness(loss, member.params, rho=rho,
                                           num_steps=num_steps).sharpness

    return parallel.jit_members(
        lambda state, x, y: map_members(lambda m: one(m, x, y), state, members_per_call, mesh),
        mesh, (0, None, None))


def next_step_variables(model, optimizer, batch_size: int, member: train_lib.TrainState, x, y,
                        mesh):
    """One member's variables after one more step, on the first minibatch of its next epoch."""
    _, perm_key, dropout_key = train_lib.split_epoch_key(member.key)
    first = train_lib.epoch_batches(perm_key, x.shape[0], batch_size)[0][0]
    tx = optimizer.make(member.hparams)
    params, batch_stats, _, _ = train_lib.train_step(
        model, optimizer, tx, member.params, member.batch_stats, member.opt_state,
        parallel.split_examples(train_lib.Batch(x[first], y[first]), mesh),
        jax.random.fold_in(dropout_key, 0))
    return model_variables(params, batch_stats)


@functools.lru_cache(maxsize=32)
def between_iterates_program(model, optimizer, batch_size: int, num_points: int,
                             settings: tuple, members_per_call: int, mesh):
    """Jitted `(state, x_train, y_train, x, y) ->` per-member largest `measure` between iterates."""

    def one(member, x_train, y_train, x, y):
        start = model_variables(member.params, member.batch_stats)
        end = next_step_variables(model, optimizer, batch_size, member, x_train, y_train, mesh)
        r, _ = hessian.interpolated_lambda_max(model, start, end, x, y, num_points=num_points,
                                               batch_size=batch_size, **dict(settings))
        return r.eigenvalue, r.residual, r.num_hvps, r.converged

    return parallel.jit_members(
        lambda state, *data: map_members(lambda m: one(m, *data), state, members_per_call, mesh),
        mesh, (0, None, None, None, None))


def group_sharpness(model, optimizer, config, batch_size: int, batch_norm: bool, lrs,
                    members_per_call: int, state: train_lib.TrainState, status: list,
                    data, mesh=None) -> Sharpness:
    """lambda_max of every member of a trained group's final `state` (module docstring).

    Args:
      model, optimizer: those the group was trained with.
      config: the SweepConfig (lambda_* settings and the between-iterates threshold).
      batch_size, batch_norm: the group's.
      lrs: the members' configured learning rates (compared with the threshold).
      members_per_call: see `map_members`.
      state: the final TrainState (leading member axis).
      status: the members' status names.
      data: the training data (x_train, y_train); the measure uses its strided subset.
      mesh: a (seed, data) mesh to shard the members over (flatjax.parallel); the HVP chunks are
        not split over its data axis (see flatjax.parallel).
    """
    n = len(status)
    x_train, y_train = parallel.place((data.x_train, data.y_train), mesh, members=False)
    subset = config.lambda_subset or len(data.x_train)
    x, y = parallel.place(strided_subset(data.x_train, data.y_train, subset), mesh, members=False)
    settings = lambda_settings(config)
    measured = np.array([s != "diverged" for s in status])
    between = np.zeros(n, bool)
    if batch_norm and config.between_iterates_below_lr is not None:
        between = measured & (np.asarray(lrs) < config.between_iterates_below_lr)

    def final(s):
        return final_program(model, batch_size, settings, members_per_call, mesh)(s, x, y)

    def between_iterates(s):
        program = between_iterates_program(model, optimizer, batch_size,
                                           config.between_iterates_points, settings,
                                           members_per_call, mesh)
        return program(s, x_train, y_train, x, y)

    def adaptive(s):
        program = adaptive_program(model, batch_size, config.lambda_batch_norm,
                                   config.adaptive_rho, config.adaptive_steps, members_per_call,
                                   mesh)
        return (program(s, x, y),)

    columns = [np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool)]
    adaptive_column = [np.full(n, np.nan)]
    method = [""] * n
    measures = [(measured & ~between, FINAL, final, columns),
                (between, BETWEEN_ITERATES, between_iterates, columns)]
    if config.adaptive_rho is not None:
        measures.append((measured, None, adaptive, adaptive_column))
    for mask, name, measure, into in measures:
        index = np.flatnonzero(mask)
        if index.size == 0:
            continue
        members = jax.tree.map(lambda a, index=index: a[index], state)
        results = measure(parallel.place_members(members, index.size, mesh))
        for column, values in zip(into, parallel.to_host(results), strict=True):
            column[index] = values[:index.size]
        for i in index:
            method[i] = name or method[i]
    return Sharpness(*columns, method, *adaptive_column)
