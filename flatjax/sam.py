"""Sharpness-aware minimization (SAM) and adaptive SAM (ASAM) as optax transformations.

`sam` wraps a base optimizer. Each call to ``update`` receives the clean minibatch gradient ``g``
at the weights ``w`` and a gradient function; it computes the ascent gradient at ``w + e`` on the
same minibatch, feeds it to the base optimizer and returns the base optimizer's updates relative to
``w``.

BatchNorm running statistics are updated by the training loop, which chooses one of three policies
(``BATCH_STATS_POLICIES``):

- ``"clean"``: only the clean pass at ``w`` updates them;
- ``"perturbed"``: only the perturbed pass at ``w + e`` updates them, starting from the old ones;
- ``"both"``: the clean pass updates them, then the perturbed pass updates them again starting from
  the clean pass's result (the reference implementation; the default for reproduction).

The perturbed pass runs inside ``update``; its auxiliary output (the new statistics) is kept in the
``aux`` field of `SAMState`, whose structure is fixed at construction by ``aux_like``. A train step
for a Flax model with ``batch_stats``::

  variables = model.init({'params': key}, x, train=False)
  tx = sam(optax.sgd(0.1), rho=0.05, aux_like=variables['batch_stats'])
  opt_state = tx.init(variables['params'])

  def loss_fn(params, batch_stats, batch):
    logits, new = model.apply({'params': params, 'batch_stats': batch_stats}, batch['x'],
                              train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y']).mean()
    return loss, new['batch_stats']

  def train_step(params, batch_stats, opt_state, batch, policy='both'):
    grads, clean_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, batch)
    start = perturbed_pass_stats(policy, batch_stats, clean_stats)
    grad_fn = lambda p, b: jax.grad(loss_fn, has_aux=True)(p, start, b)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn, batch=batch)
    params = optax.apply_updates(params, updates)
    batch_stats = sam_batch_stats(policy, clean_stats, opt_state)
    return params, batch_stats, opt_state

Models without BatchNorm leave ``aux_like=None`` and may return any aux (e.g. ``None``) from
``grad_fn``; it is discarded.
"""

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

BATCH_STATS_POLICIES = ("clean", "perturbed", "both")


class SAMState(NamedTuple):
  """State of `sam`.

  Attributes:
    count: number of updates so far (int32), the step given to a ``rho`` schedule.
    base_state: state of the base optimizer.
    aux: auxiliary output of ``grad_fn`` at the last perturbed pass (zeros before the first
      update), or ``None`` when `sam` was built with ``aux_like=None``.
  """

  count: jax.Array
  base_state: optax.OptState
  aux: Any


def sam(
    base: optax.GradientTransformation,
    rho: Union[float, jax.Array, optax.Schedule],
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
    group_size: Optional[int] = None,
    eps: float = 1e-12,
    aux_like: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-aware minimization around a base optimizer.

  ``update(grads, state, params, *, grad_fn, batch)`` takes the clean minibatch gradient ``grads``
  at ``params`` and ``grad_fn(params, batch) -> (grads, aux)``. With ``g`` the clean gradient it
  perturbs the weights by

  - SAM: ``e = rho * g / (||g|| + eps)``,
  - ASAM: ``e = rho * T**2 g / (||T g|| + eps)`` with ``T = |w| + eta`` elementwise,

  norms taken over the whole pytree (a zero gradient gives ``e = 0``), evaluates
  ``grad_fn(params + e, batch)`` and returns the base optimizer's update for that gradient, taken at
  ``params``. Nothing is reduced across a ``vmap`` axis, so vmapped seeds each use their own norm.

  With ``group_size=m`` smaller than the batch size B (m-sharpness), the batch (every leaf split
  along its leading axis) is cut into B/m contiguous groups of m examples; each group gets its own
  clean gradient ``grad_fn(params, group)`` and perturbation, and the perturbed gradients and their
  aux are averaged over groups (BatchNorm inside ``grad_fn`` then normalizes each group with its own
  statistics). ``grads`` is then unused; groups run one after another in a
  ``lax.scan``, so memory stays that of one group. ``group_size=None`` or ``m = B`` is SAM as in
  Foret et al. and calls ``grad_fn`` once.

  Args:
    base: the base optimizer (``optax.sgd(lr)`` in the paper).
    rho: neighbourhood radius, >= 0; a float, a (possibly traced) scalar, or a schedule of the step.
    adaptive: use ASAM's scale-invariant perturbation instead of SAM's.
    eta: ASAM's offset in ``T = |w| + eta``, >= 0.
    mask: ASAM only: a pytree of booleans shaped like the params, or a function of the params
      returning one; leaves marked ``False`` get ``T = 1`` (e.g. biases, as in the ASAM authors'
      code, which scales only weights). ``None`` scales every parameter, as in the ASAM paper.
    group_size: m-sharpness group size m, a positive integer dividing the batch size, or ``None``.
    eps: added to the norm in the denominator, >= 0.
    aux_like: a pytree of arrays (or ``jax.ShapeDtypeStruct``) with the structure of the aux that
      ``grad_fn`` returns, kept in ``SAMState.aux``; ``None`` keeps no aux.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving Generalization
    <https://arxiv.org/abs/2010.01412>`_, 2021.
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep
    Neural Networks <https://arxiv.org/abs/2102.11600>`_, 2021.
  """
  if not callable(rho):
    _check_nonnegative("rho", rho)
  _check_nonnegative("eta", eta)
  _check_nonnegative("eps", eps)
  if mask is not None and not adaptive:
    raise ValueError("mask selects the parameters ASAM scales; it needs adaptive=True.")
  if group_size is not None and (isinstance(group_size, bool)
                                 or not isinstance(group_size, (int, np.integer))
                                 or group_size < 1):
    raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}.")
  base = optax.with_extra_args_support(base)

  def init_fn(params):
    aux = None
    if aux_like is not None:
      aux = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_like)
    return SAMState(count=jnp.zeros([], jnp.int32), base_state=base.init(params), aux=aux)

  def perturbation(grads, params, radius):
    if adaptive:
      scale = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
      if mask is not None:
        keep = mask(params) if callable(mask) else mask
        scale = jax.tree.map(lambda s, k: jnp.where(k, s, jnp.ones_like(s)), scale, keep)
      scaled = jax.tree.map(lambda s, g: s * g, scale, grads)
      norm = optax.tree.norm(scaled)
      direction = jax.tree.map(lambda s, sg: s * sg, scale, scaled)
    else:
      norm = optax.tree.norm(grads)
      direction = grads
    factor = jnp.where(norm > 0, radius / (norm + eps), 0.0)
    return jax.tree.map(lambda d: (factor * d).astype(d.dtype), direction)

  def update_fn(updates, state, params=None, *, grad_fn=None, batch=None, **extra_args):
    if params is None:
      raise ValueError("sam needs params in update.")
    if grad_fn is None:
      raise ValueError("sam needs grad_fn(params, batch) -> (grads, aux) in update.")
    radius = rho(state.count) if callable(rho) else rho

    def ascent(clean_grads, examples):
      e = perturbation(clean_grads, params, radius)
      return grad_fn(optax.apply_updates(params, e), examples)

    num_groups = 1 if group_size is None else _num_groups(batch, group_size)
    if num_groups == 1:
      grads, aux = ascent(updates, batch)
    else:
      groups = jax.tree.map(lambda x: x.reshape((num_groups, group_size) + x.shape[1:]), batch)

      def group_ascent(group):
        return ascent(grad_fn(params, group)[0], group)

      def body(total, group):
        return jax.tree.map(jnp.add, total, group_ascent(group)), None

      shapes = jax.eval_shape(group_ascent, jax.tree.map(lambda x: x[0], groups))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
      total, _ = jax.lax.scan(body, zeros, groups)
      grads, aux = jax.tree.map(lambda t: (t / num_groups).astype(t.dtype), total)

    updates, base_state = base.update(grads, state.base_state, params, **extra_args)
    return updates, SAMState(
        count=optax.safe_increment(state.count),
        base_state=base_state,
        aux=None if aux_like is None else aux,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def perturbed_pass_stats(policy: str, batch_stats: Any, clean_stats: Any) -> Any:
  """BatchNorm statistics the perturbed pass (``grad_fn``) starts from under ``policy``.

  Args:
    policy: one of ``BATCH_STATS_POLICIES``.
    batch_stats: running statistics before the step.
    clean_stats: running statistics after the clean pass.

  Returns:
    ``clean_stats`` for ``"both"``, else ``batch_stats``.
  """
  _check_policy(policy)
  return clean_stats if policy == "both" else batch_stats


def sam_batch_stats(policy: str, clean_stats: Any, state: optax.OptState) -> Any:
  """BatchNorm statistics to keep after a SAM step under ``policy``.

  Args:
    policy: one of ``BATCH_STATS_POLICIES``.
    clean_stats: running statistics after the clean pass.
    state: the optimizer state returned by ``update``: a `SAMState` or a state containing one.

  Returns:
    ``clean_stats`` for ``"clean"``, else the perturbed pass's statistics (``SAMState.aux``).
  """
  _check_policy(policy)
  if policy == "clean":
    return clean_stats
  sam_state = optax.tree.get(state, "SAMState")
  if sam_state is None or sam_state.aux is None:
    raise ValueError(f'policy "{policy}" needs a sam state built with aux_like=batch_stats.')
  return sam_state.aux


def _check_policy(policy):
  if policy not in BATCH_STATS_POLICIES:
    raise ValueError(f"unknown BatchNorm policy {policy!r}; known: {BATCH_STATS_POLICIES}.")


def _check_nonnegative(name, value):
  if isinstance(value, jax.core.Tracer):
    return
  array = np.asarray(value)
  if array.dtype.kind not in "iuf" or np.any(np.isnan(array)) or np.any(array < 0):
    raise ValueError(f"{name} must be a non-negative number, got {value!r}.")


def _num_groups(batch, group_size):
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        "group_size needs a batch whose leaves share a leading (example) axis; "
        f"got leading sizes {sorted(map(str, sizes))}.")
  (size,) = sizes
  if size % group_size:
    raise ValueError(f"group_size {group_size} does not divide the batch size {size}.")
  return size // group_size
