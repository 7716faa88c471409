"""Curvature beyond lambda_max: Hessian traces, spectral densities, per-layer blocks, adaptive sharpness.

Like :mod:`flatjax.hessian`, every estimator is a pure function of a params pytree that compiles once
(``lax`` loops, no Python unrolling over probes or iterations), runs under ``jit`` and under ``vmap``
over a leading seed axis of ``params``, and takes an optional ``hvp_fn(params, v)`` in place of the
forward-over-reverse HVP of ``loss_fn`` (e.g. the chunked :func:`flatjax.hessian.dataset_hvp`).

Example::

    loss = lambda p: cross_entropy(model.apply({"params": p}, x), y)
    hutchpp_trace(loss, params, num_hvps=99, key=key).trace
    density = spectral_density(loss, params, num_probes=8, num_iters=80, key=key)
    density_on_grid(density, jnp.linspace(-1.0, 10.0, 500), sigma=0.05)
    layer_top_eigenvalues(loss, params)["Dense_0"].eigenvalue
    adaptive_sharpness(loss, params, rho=0.5).sharpness
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from flatjax.hessian import (EigenResult, _check_choice, _check_params, _flat_operator,
                             _lanczos_recurrence, _tridiagonal_eigh, top_eigenvalue)

Array = jax.Array
PyTree = Any
HvpFn = Callable[[PyTree, PyTree], PyTree]

PROBES = ("rademacher", "normal")
# SLQ stops once beta <= ROUNDING_FACTOR * eps * (an estimate of ||H||): after full
# reorthogonalization an exhausted Krylov space leaves a residual of a few eps * ||H||, above the
# exact-invariance test of the shared recurrence.
ROUNDING_FACTOR = 64


class TraceEstimate(NamedTuple):
  """A stochastic estimate of the Hessian's trace.

  Attributes:
    trace: the estimate.
    stderr: its standard error, estimated from the spread of the stochastic samples (NaN with a
      single sample).
    num_hvps: Hessian-vector products used.
  """
  trace: Array
  stderr: Array
  num_hvps: Array


class SpectralDensity(NamedTuple):
  """Stochastic Lanczos quadrature of the Hessian's eigenvalue density, one row per probe.

  Each probe's rows are a quadrature rule: for any smooth f, ``sum(weights * f(nodes))``
  estimates (1/n) tr f(H), n the number of parameters; it is exact for polynomials of degree
  below 2 * num_iters up to the randomness of the probe.

  Attributes:
    nodes: Ritz values, shape (num_probes, num_iters), ascending within a row. When a probe's
      Krylov space is exhausted after j < num_iters steps (n < num_iters, or repeated
      eigenvalues), its last num_iters - j entries repeat the largest node with zero weight.
    weights: squared first components of the Ritz vectors, shape (num_probes, num_iters);
      every row sums to 1.
  """
  nodes: Array
  weights: Array


class MomentEstimate(NamedTuple):
  """An estimate of (1/n) tr(H^k) and its standard error over probes."""
  moment: Array
  stderr: Array


class SharpnessEstimate(NamedTuple):
  """Adaptive sharpness (a lower bound on the worst case found by ascent).

  Attributes:
    sharpness: perturbed_loss - loss.
    loss: L(w).
    perturbed_loss: the largest L(w + d) seen among the ascent's iterates, all inside the ball.
  """
  sharpness: Array
  loss: Array
  perturbed_loss: Array


# ---------------------------------------------------------------------------------------------
# Traces.
# ---------------------------------------------------------------------------------------------


def hutchinson_trace(loss_fn: Callable[[PyTree], Array], params: PyTree, *, num_probes: int,
                     key: Array, hvp_fn: HvpFn | None = None,
                     probes: str = "rademacher") -> TraceEstimate:
  """Hutchinson's estimate of tr(H), the mean of z^T H z over ``num_probes`` random probes z.

  Args:
    loss_fn: maps a params pytree to a scalar loss.
    params: the point at which the Hessian is taken.
    num_probes: number of probes (= HVPs). The standard error falls like 1/sqrt(num_probes).
    key: PRNG key for the probes.
    hvp_fn: ``hvp_fn(params, v)`` replacing the HVP of ``loss_fn``.
    probes: "rademacher" (entries +-1, the smallest variance for a fixed H) or "normal".

  Returns:
    A :class:`TraceEstimate` whose stderr is the sample standard deviation / sqrt(num_probes).
  """
  _check_count("num_probes", num_probes, 1)
  _check_choice("probes", probes, PROBES)
  _check_params(params)
  return _hutchinson(loss_fn, hvp_fn, params, key, num_probes=num_probes, probes=probes)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("num_probes", "probes"))
def _hutchinson(loss_fn, hvp_fn, params, key, *, num_probes, probes):
  matvec, flat, _ = _flat_operator(loss_fn, hvp_fn, params)
  samples = _quadratic_forms(matvec, flat, key, num_probes, probes)
  trace, stderr = _mean_and_stderr(samples)
  return TraceEstimate(trace, stderr, jnp.asarray(num_probes))


def hutchpp_trace(loss_fn: Callable[[PyTree], Array], params: PyTree, *, num_hvps: int,
                  key: Array, hvp_fn: HvpFn | None = None,
                  probes: str = "rademacher") -> TraceEstimate:
  """Hutch++ estimate of tr(H) with a budget of ``num_hvps`` Hessian-vector products.

  A third of the budget sketches the range of H (random probes S, Q = orth(H S)); a third takes
  the trace on that range exactly, tr(Q^T H Q); the rest runs Hutchinson on the deflated
  remainder (I - QQ^T) H (I - QQ^T). Much more accurate than Hutchinson at equal cost when a few
  large eigenvalues dominate the trace; exact when the rank of H is at most num_hvps // 3.

  Args:
    loss_fn, params, key, hvp_fn, probes: as in :func:`hutchinson_trace`.
    num_hvps: the budget, >= 3: num_hvps // 3 sketch probes and num_hvps - 2 * (num_hvps // 3)
      remainder probes. The sketch holds num_hvps // 3 vectors of the size of params.

  Returns:
    A :class:`TraceEstimate`; stderr is that of the Hutchinson remainder (the rest is exact).

  References:
    Meyer, Musco, Musco & Woodruff, `Hutch++: Optimal Stochastic Trace Estimation
    <https://arxiv.org/abs/2010.09649>`_, SOSA 2021.
  """
  _check_count("num_hvps", num_hvps, 3)
  _check_choice("probes", probes, PROBES)
  _check_params(params)
  return _hutchpp(loss_fn, hvp_fn, params, key, num_hvps=num_hvps, probes=probes)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("num_hvps", "probes"))
def _hutchpp(loss_fn, hvp_fn, params, key, *, num_hvps, probes):
  matvec, flat, _ = _flat_operator(loss_fn, hvp_fn, params)
  num_sketch = num_hvps // 3
  num_rest = num_hvps - 2 * num_sketch
  sketch_key, rest_key = jax.random.split(key)
  sketch = jax.lax.map(lambda k: matvec(_probe(k, flat, probes)),
                       jax.random.split(sketch_key, num_sketch))
  q = jnp.linalg.qr(sketch.T)[0]  # (n, min(n, num_sketch)), orthonormal columns
  exact = jnp.sum(q.T * jax.lax.map(matvec, q.T))
  deflate = lambda z: z - q @ (q.T @ z)  # then z^T H z = z^T (I - QQ^T) H (I - QQ^T) z
  samples = _quadratic_forms(matvec, flat, rest_key, num_rest, probes, transform=deflate)
  rest, stderr = _mean_and_stderr(samples)
  return TraceEstimate(exact + rest, stderr, jnp.asarray(num_sketch + q.shape[1] + num_rest))


def _quadratic_forms(matvec, flat, key, num_probes, probes, transform=None):
  """z^T matvec(z) for ``num_probes`` random probes z (optionally ``transform``ed), one at a time."""

  def sample(k):
    z = _probe(k, flat, probes)
    z = z if transform is None else transform(z)
    return jnp.vdot(z, matvec(z))

  return jax.lax.map(sample, jax.random.split(key, num_probes))


def _probe(key, like, kind):
  if kind == "rademacher":
    return jax.random.rademacher(key, like.shape, like.dtype)
  return jax.random.normal(key, like.shape, like.dtype)


def _mean_and_stderr(samples):
  count = samples.shape[0]
  if count == 1:
    return samples[0], jnp.asarray(jnp.nan, samples.dtype)
  return jnp.mean(samples), jnp.std(samples, ddof=1) / jnp.sqrt(count)


# ---------------------------------------------------------------------------------------------
# Spectral density.
# ---------------------------------------------------------------------------------------------


def spectral_density(loss_fn: Callable[[PyTree], Array], params: PyTree, *, num_probes: int,
                     num_iters: int, key: Array, hvp_fn: HvpFn | None = None,
                     probes: str = "rademacher") -> SpectralDensity:
  """Eigenvalue density of the Hessian by stochastic Lanczos quadrature (SLQ).

  Each of ``num_probes`` random unit probes runs ``num_iters`` Lanczos steps (full
  reorthogonalization); the eigen-decomposition of its tridiagonal matrix gives a quadrature rule
  (Ritz values, squared first components of the Ritz vectors). Extreme eigenvalues are resolved
  first; the bulk is resolved at a scale of about (spread of the spectrum) / num_iters, so smooth
  with :func:`density_on_grid` at a comparable ``sigma``.

  Args:
    loss_fn, params, key, hvp_fn, probes: as in :func:`hutchinson_trace`.
    num_probes: number of probes (rows of the result); costs num_probes * num_iters HVPs.
    num_iters: Lanczos steps per probe; holds num_iters vectors of the size of params at a time.

  Returns:
    A :class:`SpectralDensity`. ``density_moment(density, 1).moment * n`` estimates tr(H).

  References:
    Golub & Meurant, Matrices, Moments and Quadrature with Applications, 2010;
    Ghorbani, Krishnan & Xiao, `An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density <https://arxiv.org/abs/1901.10159>`_, ICML 2019.
  """
  _check_count("num_probes", num_probes, 1)
  _check_count("num_iters", num_iters, 1)
  _check_choice("probes", probes, PROBES)
  _check_params(params)
  return _slq(loss_fn, hvp_fn, params, key, num_probes=num_probes, num_iters=num_iters,
              probes=probes)


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("num_probes", "num_iters", "probes"))
def _slq(loss_fn, hvp_fn, params, key, *, num_probes, num_iters, probes):
  matvec, flat, _ = _flat_operator(loss_fn, hvp_fn, params)
  m = min(num_iters, flat.size)  # n steps exhaust the space: never run more
  noise = ROUNDING_FACTOR * jnp.finfo(flat.dtype).eps

  def exhausted(alphas, betas, size):
    """The next Lanczos vector would be rounding noise: the Krylov space is invariant."""
    return betas[size - 1] <= noise * jnp.max(jnp.abs(alphas) + jnp.abs(betas))

  def one(k):
    v = _probe(k, flat, probes)
    size, _, alphas, betas, _ = _lanczos_recurrence(matvec, v / jnp.linalg.norm(v), m, exhausted)
    theta, s = _tridiagonal_eigh(alphas, betas, size)
    # The m - size smallest eigenvalues belong to the inactive, decoupled block: move them last.
    theta, first = jnp.roll(theta, size - m), jnp.roll(s[0], size - m)
    valid = jnp.arange(num_iters) < size
    theta = jnp.pad(theta, (0, num_iters - m))
    first = jnp.pad(first, (0, num_iters - m))
    return (jnp.where(valid, theta, theta[size - 1]), jnp.where(valid, first**2, 0.0))

  nodes, weights = jax.lax.map(one, jax.random.split(key, num_probes))
  return SpectralDensity(nodes, weights)


def density_on_grid(density: SpectralDensity, grid: Array, sigma: float) -> Array:
  """The density smoothed by a Gaussian of width ``sigma``, averaged over probes, at ``grid``.

  It integrates to 1 over a grid that covers the nodes with a margin of a few sigma. Memory:
  len(grid) x num_probes x num_iters values.
  """
  grid = jnp.asarray(grid)
  z = (grid[:, None, None] - density.nodes[None]) / sigma
  kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2.0 * jnp.pi))
  return jnp.sum(kernel * density.weights[None], axis=(1, 2)) / density.nodes.shape[0]


def density_moment(density: SpectralDensity, k: int) -> MomentEstimate:
  """Estimate of the k-th spectral moment (1/n) tr(H^k), with its standard error over probes.

  Exact per probe (a Gauss quadrature) for k < 2 * num_iters; k = 0 gives 1.
  """
  per_probe = jnp.sum(density.weights * density.nodes**k, axis=-1)
  return MomentEstimate(*_mean_and_stderr(per_probe))


# ---------------------------------------------------------------------------------------------
# Per-layer Hessian blocks.
# ---------------------------------------------------------------------------------------------


def parameter_groups(params: PyTree) -> dict[str, list[int]]:
  """The parameter groups of :func:`layer_top_eigenvalues`: group name -> leaf indices.

  A group is the set of leaves that share a parent container, named by the parent's path joined
  with "/" ("Dense_0", "Block_1/Conv_0"; "" for leaves at the root). In Flax params this is one
  group per module (its kernel, bias, scale, ...); a submodule's leaves form their own group.
  Leaf indices follow ``jax.tree.leaves(params)``; groups appear in that order.
  """
  groups: dict[str, list[int]] = {}
  for index, (path, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
    name = "/".join(_key_name(k) for k in path[:-1])
    groups.setdefault(name, []).append(index)
  return groups


def layer_top_eigenvalues(loss_fn: Callable[[PyTree], Array], params: PyTree,
                          **solver_kwargs) -> dict[str, EigenResult]:
  """Top eigenvalue of each diagonal block of the Hessian, one block per parameter group.

  The block of a group is the Hessian of ``loss_fn`` with respect to that group's parameters
  with all others held fixed (see :func:`parameter_groups` for the grouping). A block's largest
  eigenvalue is at most lambda_max of the whole Hessian (a block's Rayleigh quotient is one of
  the whole Hessian's); the blocks show which layers carry the curvature.

  Every call compiles one program for all blocks (under an outer ``jit`` it is traced once).

  Args:
    loss_fn: maps a params pytree to a scalar loss.
    params: the point at which the Hessian is taken.
    **solver_kwargs: passed to :func:`flatjax.hessian.top_eigenvalue` for every block (k, method,
      which, num_iters, tol, key). ``init`` (like params) is split by group. ``hvp_fn`` (full
      params) is restricted to each block by padding v with zeros and keeping the block's
      output, at the cost of a full HVP per step.

  Returns:
    A dict from group name to the block's :class:`flatjax.hessian.EigenResult`, whose
    eigenvector is a dict {leaf name: array} of the group's leaves.
  """
  _check_params(params)
  groups = parameter_groups(params)
  init = solver_kwargs.pop("init", None)
  key = solver_kwargs.pop("key", None)
  hvp_fn = solver_kwargs.pop("hvp_fn", None)
  names = {i: _key_name(path[-1]) for i, (path, _) in
           enumerate(jax.tree_util.tree_flatten_with_path(params)[0])}

  def run(params, key, init):
    leaves, treedef = jax.tree.flatten(params)
    init_leaves = None if init is None else jax.tree.leaves(init)
    results = {}
    for group, indices in groups.items():
      select = lambda values, indices=indices: {names[i]: values[i] for i in indices}

      def merge(sub, base, indices=indices):
        full = list(base)
        for i in indices:
          full[i] = sub[names[i]]
        return treedef.unflatten(full)

      block_hvp = None
      if hvp_fn is not None:
        zeros = [jnp.zeros_like(leaf) for leaf in leaves]
        block_hvp = lambda sub, v, merge=merge, select=select, zeros=zeros: select(
            jax.tree.leaves(hvp_fn(merge(sub, leaves), merge(v, zeros))))
      results[group] = top_eigenvalue(
          lambda sub, merge=merge: loss_fn(merge(sub, leaves)), select(leaves),
          key=key, init=None if init_leaves is None else select(init_leaves), hvp_fn=block_hvp,
          **solver_kwargs)
    return results

  return jax.jit(run)(params, key, init)


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


# ---------------------------------------------------------------------------------------------
# Adaptive sharpness.
# ---------------------------------------------------------------------------------------------


def adaptive_sharpness(loss_fn: Callable[[PyTree], Array], params: PyTree, *, rho: float,
                       eta: float = 0.01, num_steps: int = 20, step_size: float | None = None,
                       key: Array | None = None) -> SharpnessEstimate:
  """Worst-case adaptive sharpness max L(w + d) - L(w) over ||d / (|w| + eta)||_2 <= rho.

  The ball is scaled elementwise by |w| + eta, which makes the measure invariant (as eta -> 0)
  to rescalings that leave the network's function unchanged, such as multiplying one ReLU layer
  by c > 0 and the next by 1/c; lambda_max is not.

  The maximum is sought by projected gradient ascent in the scaled coordinates u = d / (|w| + eta):
  a start on the sphere ||u|| = rho (the scaled gradient direction, which is ASAM's perturbation,
  or a random direction), then ``num_steps`` normalized gradient steps of length ``step_size``,
  each projected back to the ball. The result is the largest loss among the iterates, so it is a
  lower bound on the true maximum (exact for a convex quadratic as the ascent converges, not in
  general). In float32 the difference of losses loses precision for small rho.

  Args:
    loss_fn: maps a params pytree to a scalar loss.
    params: the weights w.
    rho: radius of the scaled ball, >= 0.
    eta: offset of the scale |w| + eta, >= 0 (0.01 as in ASAM; tiny for exact invariance, but
      parameters at zero then cannot move).
    num_steps: ascent steps after the start (gradient evaluations); 0 gives the one-step ASAM
      perturbation.
    step_size: length of a step in the scaled coordinates; defaults to rho.
    key: None for the gradient start (a random start from PRNGKey(0) where the gradient is zero,
      as at a minimum); a key for a random start.

  Returns:
    A :class:`SharpnessEstimate`.

  References:
    Kwon et al., `ASAM <https://arxiv.org/abs/2102.11600>`_, ICML 2021; Andriushchenko et al.,
    `A Modern Look at the Relationship between Sharpness and Generalization
    <https://arxiv.org/abs/2302.07011>`_, ICML 2023.
  """
  _check_count("num_steps", num_steps, 0)
  for name, value in (("rho", rho), ("eta", eta), ("step_size", step_size)):
    if value is not None and not isinstance(value, jax.core.Tracer) and not value >= 0:
      raise ValueError(f"{name} must be >= 0, got {value}.")
  _check_params(params)
  random_start = key is not None
  key = jax.random.PRNGKey(0) if key is None else key
  step_size = rho if step_size is None else step_size
  return _ascent(loss_fn, params, rho, eta, step_size, key, num_steps=num_steps,
                 random_start=random_start)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("num_steps", "random_start"))
def _ascent(loss_fn, params, rho, eta, step_size, key, *, num_steps, random_start):
  flat, unravel = ravel_pytree(params)
  scale = jnp.abs(flat) + eta
  value_at = lambda u: loss_fn(unravel(flat + scale * u))
  perturbed = jax.value_and_grad(value_at)
  loss, gradient = perturbed(jnp.zeros_like(flat))
  direction = jax.random.normal(key, flat.shape, flat.dtype)
  if not random_start:
    direction = jnp.where(jnp.linalg.norm(gradient) > 0, gradient, direction)
  u = rho * _unit(direction)

  def step(carry, _):
    u, best = carry
    value, g = perturbed(u)
    u = u + step_size * _unit(g)
    norm = jnp.linalg.norm(u)
    u = u * jnp.where(norm > rho, rho / jnp.where(norm > 0, norm, 1.0), 1.0)
    return (u, jnp.maximum(best, value)), None

  (u, best), _ = jax.lax.scan(step, (u, loss), None, length=num_steps)
  best = jnp.maximum(best, value_at(u))
  return SharpnessEstimate(best - loss, loss, best)


def _unit(v):
  norm = jnp.linalg.norm(v)
  return jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), 0.0)


def _check_count(name, value, minimum):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
