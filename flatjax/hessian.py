"""Hessian eigenvalues of training losses: HVPs, Lanczos, power iteration, dataset operators.

The solvers work on any params pytree, compile once (``lax`` loops, no Python unrolling), stop early
when converged, and run under ``jit`` and under ``vmap`` over a leading seed axis of ``params``.

Example::

    res = top_eigenvalue(lambda p: loss(p, batch), params)
    res.eigenvalue, res.residual, res.num_hvps
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from flatjax.losses import chunked_mean, cross_entropy

Array = jax.Array
PyTree = Any

WHICH = ("LA", "LM", "SA")
DEFAULT_TOL = {8: 1e-10, 4: 1e-5}  # by the params' bytes per value; 1e-2 for half precision
METHODS = ("lanczos", "power")
BATCH_NORM_MODES = ("train", "eval")


class EigenResult(NamedTuple):
  """Result of an eigenvalue solve.

  Attributes:
    eigenvalue: the eigenvalue, or shape (k,) sorted by ``which`` when k > 1.
    eigenvector: unit-norm eigenvector as a pytree like params (leading axis k when k > 1).
    residual: ||H v - lambda v|| per eigenpair, measured with one extra HVP each.
    num_hvps: Hessian-vector products used: the iterations plus one per eigenpair for the
      measured residual.
    converged: whether every requested pair met ``tol`` before ``num_iters``.
  """
  eigenvalue: Array
  eigenvector: PyTree
  residual: Array
  num_hvps: Array
  converged: Array


def hvp(loss_fn: Callable[[PyTree], Array], params: PyTree, v: PyTree) -> PyTree:
  """Hessian-vector product of ``loss_fn`` at ``params`` with ``v``, forward-over-reverse."""
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def top_eigenvalue(
    loss_fn: Callable[[PyTree], Array],
    params: PyTree,
    *,
    k: int = 1,
    method: str = "lanczos",
    which: str = "LA",
    num_iters: int | None = None,
    tol: float | None = None,
    key: Array | None = None,
    init: PyTree | None = None,
    hvp_fn: Callable[[PyTree, PyTree], PyTree] | None = None,
) -> EigenResult:
  """Extreme eigenvalue(s) of the Hessian of ``loss_fn`` at ``params``.

  Args:
    loss_fn: maps a params pytree to a scalar loss.
    params: the point at which the Hessian is taken (any pytree of float arrays).
    k: number of eigenpairs (Lanczos only for k > 1). Lanczos from one start vector finds each
      distinct eigenvalue once, so a repeated eigenvalue is not returned twice.
    method: "lanczos" (full reorthogonalization, default) or "power" (Rayleigh quotient).
    which: "LA" largest algebraic, "LM" largest magnitude, "SA" smallest algebraic.
    num_iters: cap on Lanczos steps (the Krylov basis holds this many vectors of the size of
      ``params``, so memory is num_iters x the size of params) or on power iterations. Defaults:
      64 for Lanczos, 1000 for power.
    tol: stop once every wanted pair has ||H v - lambda v|| <= tol * |lambda|. Defaults to 1e-5
      in float32, 1e-10 in float64 and 1e-2 in float16/bfloat16 (whose vectors and eigensolves
      run in float32, their HVPs in the params' dtype). The eigenvalue's relative error is about
      tol^2 * |lambda| / gap.
    key: PRNG key for the random start vector (default PRNGKey(0)).
    init: a start vector like ``params`` (e.g. the previous eigenvector, to warm-start tracking);
      an all-zero or non-finite one is replaced by the random start.
    hvp_fn: ``hvp_fn(params, v)`` replacing the forward-over-reverse product of ``loss_fn``
      (e.g. a chunked dataset HVP from :func:`dataset_hvp`).

  Returns:
    An :class:`EigenResult`. A non-finite product (e.g. at diverged weights) ends the solve at
    once, with a NaN eigenvalue and ``converged`` False, so that a vmapped solve is not held to
    ``num_iters`` by one member.
  """
  _check_choice("method", method, METHODS)
  _check_choice("which", which, WHICH)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  if method == "power" and k != 1:
    raise ValueError("method='power' finds one eigenpair; use method='lanczos' for k > 1.")
  num_iters = num_iters if num_iters is not None else (64 if method == "lanczos" else 1000)
  if num_iters < k:
    raise ValueError(f"num_iters ({num_iters}) must be at least k ({k}).")
  if tol is not None and not tol >= 0:
    raise ValueError(f"tol must be >= 0, got {tol}.")
  flat_params = _check_params(params)
  if k > flat_params.size:
    raise ValueError(f"k ({k}) exceeds the number of parameters ({flat_params.size}).")

  if tol is None:
    tol = DEFAULT_TOL.get(jnp.dtype(flat_params.dtype).itemsize, 1e-2)
  key = jax.random.PRNGKey(0) if key is None else key
  return _solve(loss_fn, hvp_fn, params, key, init, k=k, method=method, which=which,
                num_iters=num_iters, tol=tol)


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("k", "method", "which", "num_iters", "tol"))
def _solve(loss_fn, hvp_fn, params, key, init, *, k, method, which, num_iters, tol):
  """:func:`top_eigenvalue` after argument checks, compiled as one program."""
  matvec, flat_params, unravel = _flat_operator(loss_fn, hvp_fn, params)
  dtype = flat_params.dtype

  v0 = jax.random.normal(key, flat_params.shape, dtype)
  if init is not None:
    start = ravel_pytree(init)[0].astype(dtype)
    usable = jnp.all(jnp.isfinite(start)) & jnp.any(start != 0)
    v0 = jnp.where(usable, start, v0)
  v0 = v0 / jnp.linalg.norm(v0)

  if method == "lanczos":
    vals, vecs, hvps, converged = lanczos(matvec, v0, k=k, which=which, num_iters=num_iters,
                                          tol=tol)
  else:
    val, vec, hvps, converged = power_iteration(matvec, v0, which=which, num_iters=num_iters,
                                                tol=tol)
    vals, vecs = val[None], vec[None]

  residual = jax.vmap(lambda lam, v: jnp.linalg.norm(matvec(v) - lam * v))(vals, vecs)
  eigenvectors = jax.vmap(unravel)(vecs)
  if k == 1:
    vals, residual = vals[0], residual[0]
    eigenvectors = jax.tree.map(lambda x: x[0], eigenvectors)
  return EigenResult(vals, eigenvectors, residual, hvps + k, converged)


def lanczos(matvec, v0, *, k=1, which="LA", num_iters=64, tol=1e-5):
  """Lanczos with full reorthogonalization on flat vectors.

  Runs in a ``lax.while_loop`` over a Krylov basis of ``num_iters`` vectors and stops as soon as
  the k wanted Ritz pairs have residual estimates |beta_j s_j| <= tol * |theta|.

  A single start vector sees each distinct eigenvalue once: with k > 1 a repeated eigenvalue is
  returned once, and if the Krylov space is exhausted before k Ritz values exist the missing ones
  are NaN and ``converged`` is False.

  Returns:
    (eigenvalues (k,), eigenvectors (k, n), number of HVPs, converged).
  """
  m = num_iters

  def converged(alphas, betas, size):
    theta, _, res = _ritz_pairs(alphas, betas, size, which, k)
    return (size >= k) & jnp.all(res <= tol * jnp.abs(theta))

  size, basis, alphas, betas, done = _lanczos_recurrence(matvec, v0, m, converged)
  theta, s, _ = _ritz_pairs(alphas, betas, size, which, k)
  vectors = s.T @ basis[:m]
  vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
  # An exhausted Krylov space holds only `size` Ritz values: the others do not exist.
  found = jnp.arange(k) < size
  theta = jnp.where(found, theta, jnp.nan)
  return theta, vectors, size, done & jnp.all(found)


REORTH_BLOCK = 16
NUM_SIZE_BUCKETS = 3


def _lanczos_recurrence(matvec, v0, num_iters, stop=None):
  """The Lanczos recurrence with full reorthogonalization from the unit vector ``v0``.

  Runs at most ``num_iters`` steps in a ``lax.while_loop`` and stops early when the Krylov space
  is invariant, when ``stop(alphas, betas, size)`` is true, or after a non-finite product (the
  last step then reports not stopped early).

  Returns:
    (number of steps taken, basis (rows >= num_iters + 1, n) whose first rows are the Lanczos
    vectors, the diagonal alphas (num_iters,), the off-diagonal betas (num_iters,), where
    betas[size - 1] is the norm of the last residual, whether it stopped early).
  """
  n, dtype, m = v0.shape[0], v0.dtype, num_iters
  rows = -(-(m + 1) // REORTH_BLOCK) * REORTH_BLOCK
  basis = jnp.zeros((rows, n), dtype).at[0].set(v0)
  alphas = jnp.zeros((m,), dtype)
  betas = jnp.zeros((m,), dtype)

  def cond(state):
    i, _, alphas, betas, done = state
    return (i < m) & ~done & jnp.all(jnp.isfinite(alphas)) & jnp.all(jnp.isfinite(betas))

  def body(state):
    i, basis, alphas, betas, _ = state
    w = matvec(basis[i])
    alpha = jnp.vdot(basis[i], w)
    for _ in range(2):  # block Gram-Schmidt against the filled rows, twice ("twice is enough")
      w = _orthogonalize(w, basis, i + 1)
    beta = jnp.linalg.norm(w)
    alphas, betas = alphas.at[i].set(alpha), betas.at[i].set(beta)
    invariant = beta <= jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(alpha), 1.0)
    basis = basis.at[i + 1].set(jnp.where(invariant, 0.0, w / jnp.where(invariant, 1.0, beta)))
    done = invariant if stop is None else invariant | stop(alphas, betas, i + 1)
    return i + 1, basis, alphas, betas, done

  return jax.lax.while_loop(
      cond, body, (jnp.asarray(0), basis, alphas, betas, jnp.asarray(False)))


def _orthogonalize(w, basis, count):
  """w minus its projection on the first ``count`` rows of ``basis``, one block of rows at a time.

  Rows past ``count`` are zero, so only the blocks that hold filled rows are visited and a step
  costs O(count * n) rather than O(num_iters * n).
  """
  blocks = basis.reshape(-1, REORTH_BLOCK, basis.shape[1])

  def body(j, w):
    block = blocks[j]
    return w - block.T @ (block @ w)

  return jax.lax.fori_loop(0, -(-count // REORTH_BLOCK), body, w)


def _ritz_pairs(alphas, betas, size, which, k):
  """The k wanted Ritz values of the Lanczos matrix's leading ``size`` block.

  The eigen-decomposition runs on the smallest of a few fixed block sizes (m, m/4, m/16) that
  holds the active block, so a step costs O(size^3) however large the cap m is, and the program
  holds the same number of branches for every m.

  Returns:
    (values (k,), their eigenvectors of the Lanczos matrix padded to (m, k), residual estimates
    |beta_size * s_size| (k,)).
  """
  m = alphas.shape[0]
  sizes = sorted(max(min(m, max(k, 2)), -(-m // 4**j)) for j in range(NUM_SIZE_BUCKETS))

  def block(b):
    def solve(alphas, betas, size):
      theta, s = _tridiagonal_eigh(alphas[:b], betas[:b], size)
      order = _select(theta, jnp.arange(b) >= b - size, which, k)
      s = s[:, order]
      residual = jnp.abs(betas[size - 1] * s[size - 1])
      padded = jax.lax.dynamic_update_slice(jnp.zeros((m, k), s.dtype), s, (0, 0))
      return theta[order], padded, residual
    return solve

  index = jnp.searchsorted(jnp.asarray(sizes), size)
  return jax.lax.switch(index, [block(b) for b in sizes], alphas, betas, size)


def power_iteration(matvec, v0, *, which="LA", num_iters=1000, tol=1e-5):
  """Power iteration with Rayleigh quotients on flat vectors.

  "LM" iterates on H. "LA" and "SA" first find the dominant eigenvalue mu; if its sign is not the
  one asked for, they iterate again on H - mu I, whose dominant eigenvalue is the other end of the
  spectrum shifted by -mu.

  Returns:
    (eigenvalue, eigenvector (n,), number of HVPs, converged).
  """
  val, vec, hvps, conv = _power(matvec, v0, 0.0, num_iters, tol)
  if which == "LM":
    return val, vec, hvps, conv
  wrong_end = (val < 0) if which == "LA" else (val > 0)

  def other_end(_):
    v2, vec2, h2, c2 = _power(lambda x: matvec(x) - val * x, v0, val, num_iters, tol)
    return v2 + val, vec2, hvps + h2, c2

  return jax.lax.cond(wrong_end, other_end, lambda _: (val, vec, hvps, conv), None)


def _power(matvec, v0, shift, num_iters, tol):
  """Power iteration on ``matvec``; ``shift`` is added back only for the convergence scale."""

  def cond(state):
    i, _, theta, done = state
    return (i < num_iters) & ~done & jnp.isfinite(theta)

  def body(state):
    i, v, _, _ = state
    w = matvec(v)
    theta = jnp.vdot(v, w)
    residual = jnp.linalg.norm(w - theta * v)
    norm = jnp.linalg.norm(w)
    v_next = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v)
    return i + 1, v_next, theta, residual <= tol * jnp.abs(theta + shift)

  dtype = v0.dtype
  i, v, theta, done = jax.lax.while_loop(
      cond, body, (jnp.asarray(0), v0, jnp.asarray(0.0, dtype), jnp.asarray(False)))
  return theta, v, i, done


def _tridiagonal_eigh(alphas, betas, size):
  """Eigen-decomposition of the leading ``size`` x ``size`` block of the Lanczos matrix.

  The matrix keeps the static shape of its inputs; the inactive block is decoupled and its diagonal
  is set below a Gershgorin lower bound of the active block, so its eigenvalues sort first.
  """
  m = alphas.shape[0]
  active = jnp.arange(m) < size
  off = jnp.where(jnp.arange(m - 1) < size - 1, betas[:-1], 0.0)
  radius = jnp.abs(jnp.pad(off, (1, 0))) + jnp.abs(jnp.pad(off, (0, 1)))
  lower = jnp.min(jnp.where(active, alphas - radius, jnp.inf))
  upper = jnp.max(jnp.where(active, alphas + radius, -jnp.inf))
  pad = lower - (upper - lower) - 1.0
  diag = jnp.where(active, alphas, pad)
  t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
  return jnp.linalg.eigh(t)


def _select(theta, valid, which, k):
  """Indices of the k wanted eigenvalues among the valid ones, best first."""
  score = {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]
  return jax.lax.top_k(jnp.where(valid, score, -jnp.inf), k)[1]


def _flat_operator(loss_fn, hvp_fn, params):
  """The Hessian of ``loss_fn`` at ``params`` (or ``hvp_fn(params, .)``) on flat vectors.

  The vectors are in the params' dtype promoted to at least float32, so half-precision params
  (whose HVPs still run in their own dtype) get float32 Krylov arithmetic and eigensolvers.

  Returns:
    (matvec on flat vectors, flat params in that dtype, unravel back to a pytree like params).
  """
  flat_params, unravel_flat = ravel_pytree(params)
  product = hvp_fn if hvp_fn is not None else (lambda p, v: hvp(loss_fn, p, v))
  dtype = jnp.promote_types(flat_params.dtype, jnp.float32)

  def unravel(v):
    return unravel_flat(v.astype(flat_params.dtype))

  def matvec(v):
    return ravel_pytree(product(params, unravel(v)))[0].astype(dtype)

  return matvec, flat_params.astype(dtype), unravel


def _check_params(params):
  """The flat params, after checking that they hold at least one real floating-point value."""
  flat_params = ravel_pytree(params)[0]
  if flat_params.size == 0 or not jnp.issubdtype(flat_params.dtype, jnp.floating):
    raise ValueError("params must hold at least one real floating-point array; got "
                     f"{flat_params.size} values of dtype {flat_params.dtype}.")
  return flat_params


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}.")


# ---------------------------------------------------------------------------------------------
# Dataset-averaged operators.
# ---------------------------------------------------------------------------------------------

ChunkLoss = Callable[[PyTree, Array, Array, Array], Array]


def model_loss(model, variables: PyTree, *, batch_norm: str = "train",
               dropout_key: Array | None = None) -> ChunkLoss:
  """Mean cross-entropy of a Flax model on one chunk, as ``chunk_loss(params, x, y, chunk_index)``.

  Args:
    model: a Flax module called as ``model.apply(variables, x, train=...)``.
    variables: the model's variables; ``params`` is replaced by the argument of the chunk loss and
      ``batch_stats``, if any, is held fixed.
    batch_norm: "train" normalizes every chunk with its own batch statistics (ghost batches of
      the chunk size, the reference's protocol); "eval" uses the running statistics.
    dropout_key: None for dropout off (the reference for lambda_max); a key for dropout on, folded
      with the chunk index so that every chunk has a fixed mask.
  """
  _check_choice("batch_norm", batch_norm, BATCH_NORM_MODES)
  has_bn = bool(variables.get("batch_stats"))
  bn_train = has_bn and batch_norm == "train"
  dropout_on = dropout_key is not None
  if has_bn and bn_train != dropout_on and _has_dropout(model):
    raise ValueError("This model has both BatchNorm and dropout, which share one `train` flag: "
                     "BatchNorm in train mode needs dropout on, and in eval mode dropout off.")
  train = bn_train or dropout_on

  def chunk_loss(params, x, y, index):
    full = {**variables, "params": params}
    rngs = {"dropout": jax.random.fold_in(dropout_key, index)} if dropout_on else {}
    if bn_train:
      logits, _ = model.apply(full, x, train=True, rngs=rngs, mutable=["batch_stats"])
    else:
      logits = model.apply(full, x, train=train, rngs=rngs)
    return cross_entropy(logits, y)

  return chunk_loss


def dataset_loss(chunk_loss: ChunkLoss, params: PyTree, x: Array, y: Array,
                 chunk_size: int) -> Array:
  """Mean loss over a dataset evaluated in chunks (see :func:`flatjax.losses.chunked_mean`)."""
  return chunked_mean(lambda xc, yc, i: chunk_loss(params, xc, yc, i), x, y, chunk_size)


def dataset_hvp(chunk_loss: ChunkLoss, params: PyTree, v: PyTree, x: Array, y: Array,
                chunk_size: int) -> PyTree:
  """HVP of :func:`dataset_loss`, one chunk at a time (memory of one chunk's backward pass)."""
  return chunked_mean(
      lambda xc, yc, i: hvp(lambda p: chunk_loss(p, xc, yc, i), params, v), x, y, chunk_size)


def protocol_chunk(batch_size: int, chunk_size: int | None = None) -> int:
  """The chunk (ghost batch) of the lambda_max protocol: ``chunk_size``, else
  min(batch_size, 1000)."""
  return chunk_size if chunk_size is not None else min(batch_size, 1000)


def lambda_max(model, variables: PyTree, x_train: Array, y_train: Array, *,
               batch_size: int = 1000, subset_size: int | None = 1000,
               chunk_size: int | None = None, batch_norm: str = "train",
               dropout_key: Array | None = None, **solver_kwargs) -> EigenResult:
  """lambda_max of the training loss of a Flax model, following the paper's protocol by default.

  The mean cross-entropy over a fixed strided subset of ``subset_size`` training examples (every
  N // subset_size-th; None for all), with HVPs averaged over chunks of
  ``min(batch_size, 1000)`` examples, BatchNorm in train mode (ghost batches of the chunk size)
  and dropout off.

  Args:
    model, variables: the Flax model and its variables (``params``, optional ``batch_stats``).
    x_train, y_train: the (standardized) training set.
    batch_size: the training batch size, which sets the default chunk size.
    subset_size: size of the strided subset, or None for the whole set.
    chunk_size: override the chunk (ghost batch) size.
    batch_norm, dropout_key: modes, see :func:`model_loss`.
    **solver_kwargs: passed to :func:`top_eigenvalue` (k, method, which, num_iters, tol, ...).
  """
  if subset_size is not None:
    from flatjax.data import strided_subset  # pylint: disable=import-outside-toplevel
    x_train, y_train = strided_subset(x_train, y_train, subset_size)
  chunk = protocol_chunk(batch_size, chunk_size)
  key, init = solver_kwargs.pop("key", None), solver_kwargs.pop("init", None)
  program = _lambda_max_program(model, chunk, batch_norm, dropout_key is not None,
                                tuple(sorted(solver_kwargs.items())))
  return program(variables, jnp.asarray(x_train), jnp.asarray(y_train), dropout_key, key, init)


@functools.lru_cache(maxsize=64)
def _lambda_max_program(model, chunk, batch_norm, dropout, solver_items):
  """A jitted lambda_max for one model and protocol, reused across weights and data."""

  def run(variables, x, y, dropout_key, key, init):
    chunk_loss = model_loss(model, variables, batch_norm=batch_norm,
                            dropout_key=dropout_key if dropout else None)

    return top_eigenvalue(
        lambda p: dataset_loss(chunk_loss, p, x, y, chunk), variables["params"],
        hvp_fn=lambda p, v: dataset_hvp(chunk_loss, p, v, x, y, chunk),
        key=key, init=init, **dict(solver_items))

  return jax.jit(run)


def interpolated_lambda_max(model, variables_a: PyTree, variables_b: PyTree, x_train: Array,
                            y_train: Array, *, num_points: int = 8,
                            **kwargs) -> tuple[EigenResult, Array]:
  """Largest lambda_max over ``num_points`` evenly spaced interpolations of two variable sets.

  The points are ``(1 - t) a + t b`` for t in linspace(0, 1, num_points) (both ends included),
  applied to every collection, BatchNorm statistics included. Used for BatchNorm networks at
  small learning rates, with ``b`` one extra SGD step from ``a``. ``kwargs`` go to
  :func:`lambda_max`.

  Returns:
    (the :class:`EigenResult` of the point with the largest eigenvalue, its ``num_hvps`` summed
    over all points; the eigenvalue at every point). A point whose solve failed (NaN) makes the
    largest eigenvalue NaN: a maximum over the other points could understate it.
  """
  if num_points < 2:
    raise ValueError(f"num_points must be >= 2, got {num_points}.")
  ts = jnp.linspace(0.0, 1.0, num_points)

  def at(t):
    mixed = jax.tree.map(lambda a, b: (1 - t) * a + t * b, variables_a, variables_b)
    return lambda_max(model, mixed, x_train, y_train, **kwargs)

  results = jax.lax.map(at, ts)
  top = jnp.argmax(results.eigenvalue)  # a NaN counts as the largest
  largest = jax.tree.map(lambda a: a[top], results)
  return largest._replace(num_hvps=results.num_hvps.sum()), results.eigenvalue


def _has_dropout(model) -> bool:
  return bool(getattr(model, "dropout", 0.0))
