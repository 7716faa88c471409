"""Tests for flatjax.sam: hand-computed steps, optax.contrib.sam, m-sharpness, vmap, BatchNorm."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flatjax.sam import (BATCH_STATS_POLICIES, SAMState, perturbed_pass_stats, sam,
                         sam_batch_stats)

# float32 against float64 numpy: a few ulps of float32 on O(1) numbers.
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------- a quadratic, by hand

def _quadratic(seed=0, n=5):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(n, n))
  a = m @ m.T / n + np.eye(n)
  b = rng.normal(size=n)
  w = rng.normal(size=n)
  return a, b, w


def _split(v):
  """A two-leaf pytree, so that norms must run over the whole tree."""
  return {"u": jnp.asarray(v[:2], jnp.float32), "v": jnp.asarray(v[2:], jnp.float32)}


def _join(tree):
  return np.concatenate([np.asarray(tree["u"]), np.asarray(tree["v"])]).astype(np.float64)


def _quadratic_step(tx, a, b, w):
  def grad_fn(params, batch):
    del batch
    x = jnp.concatenate([params["u"], params["v"]])
    g = jnp.asarray(a, jnp.float32) @ x - jnp.asarray(b, jnp.float32)
    return {"u": g[:2], "v": g[2:]}, None

  params = _split(w)
  state = tx.init(params)
  grads, _ = grad_fn(params, None)
  updates, _ = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn, batch=None))(
      grads, state, params)
  return _join(optax.apply_updates(params, updates))


def test_sam_step_on_quadratic_matches_hand_computation():
  a, b, w = _quadratic()
  lr, rho, eps = 0.1, 0.3, 1e-12
  g = a @ w - b
  e = rho * g / (np.linalg.norm(g) + eps)
  expected = w - lr * (a @ (w + e) - b)
  got = _quadratic_step(sam(optax.sgd(lr), rho), a, b, w)
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("masked", [False, True])
def test_asam_step_on_quadratic_matches_hand_computation(masked):
  a, b, w = _quadratic(seed=1)
  lr, rho, eta, eps = 0.1, 0.5, 0.01, 1e-12
  g = a @ w - b
  t = np.abs(w) + eta
  mask = None
  if masked:  # leaf "v" (entries 2:) unscaled: T = 1 there
    t[2:] = 1.0
    mask = {"u": True, "v": False}
  e = rho * t**2 * g / (np.linalg.norm(t * g) + eps)
  expected = w - lr * (a @ (w + e) - b)
  tx = sam(optax.sgd(lr), rho, adaptive=True, eta=eta, mask=mask)
  np.testing.assert_allclose(_quadratic_step(tx, a, b, w), expected, rtol=RTOL, atol=ATOL)


def test_asam_mask_as_function_equals_mask_as_tree():
  a, b, w = _quadratic(seed=2)
  tree = sam(optax.sgd(0.1), 0.5, adaptive=True, mask={"u": False, "v": True})
  fn = sam(optax.sgd(0.1), 0.5, adaptive=True, mask=lambda p: {"u": False, "v": True})
  np.testing.assert_array_equal(_quadratic_step(tree, a, b, w), _quadratic_step(fn, a, b, w))


# ---------------------------------------------------------------- a small MLP

def _mlp_params(seed, sizes=(5, 8, 3)):
  rng = np.random.default_rng(seed)
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"w{i}"] = jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in), jnp.float32)
    params[f"b{i}"] = jnp.asarray(0.1 * rng.normal(size=n_out), jnp.float32)
  return params


def _mlp_loss(params, batch):
  x, y = batch
  h = jnp.tanh(x @ params["w0"] + params["b0"])
  logits = h @ params["w1"] + params["b1"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _mlp_grad_fn(params, batch):
  loss, grads = jax.value_and_grad(_mlp_loss)(params, batch)
  return grads, loss


_mlp_grad = jax.jit(jax.grad(_mlp_loss))
_mlp_value_and_grad = jax.jit(jax.value_and_grad(_mlp_loss))


def _batch(seed, n=12):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
  return x, jnp.asarray(rng.integers(0, 3, n), jnp.int32)


def _train(tx, params, batches):
  """Python loop over jitted steps; returns the params after every step."""

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(_mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params, grad_fn=_mlp_grad_fn, batch=batch)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  trajectory = []
  for batch in batches:
    params, state = step(params, state, batch)
    trajectory.append(params)
  return trajectory


def _batches(num, n=12, seed=1):
  return [_batch(seed * 100 + i, n) for i in range(num)]


def test_matches_optax_contrib_sam_over_several_steps():
  # contrib's normalize divides by ||g|| with no eps; ours adds eps=1e-12 to ||g|| ~ 0.1-1, a
  # relative difference of ~1e-12, far below float32 resolution.
  lr, rho = 0.5, 0.1
  params = _mlp_params(0)
  batches = _batches(5)
  ours = _train(sam(optax.sgd(lr), rho), params, batches)

  ref_tx = optax.contrib.sam(
      optimizer=optax.sgd(lr),
      adv_optimizer=optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      opaque_mode=True)

  @jax.jit
  def ref_step(params, state, batch):
    grads = jax.grad(_mlp_loss)(params, batch)
    grad_fn = lambda p, _: jax.grad(_mlp_loss)(p, batch)
    updates, state = ref_tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state

  state = ref_tx.init(params)
  p = params
  for batch, got in zip(batches, ours):
    p, state = ref_step(p, state, batch)
    chex.assert_trees_all_close(got, p, rtol=RTOL, atol=ATOL)
  # The runs moved: the comparison is not between two copies of the initial params.
  assert not np.allclose(ours[-1]["w0"], params["w0"])


@pytest.mark.parametrize("adaptive", [False, True])
def test_zero_gradient_gives_zero_perturbation(adaptive):
  params = _mlp_params(0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  # grad_fn reports where it was evaluated, through the aux kept in the state.
  grad_fn = lambda p, b: (jax.tree.map(jnp.zeros_like, p), p)
  tx = sam(optax.sgd(0.1), 0.05, adaptive=adaptive, aux_like=params)
  updates, state = jax.jit(lambda s, p: tx.update(zeros, s, p, grad_fn=grad_fn, batch=None))(
      tx.init(params), params)
  chex.assert_trees_all_equal(state.aux, params)
  chex.assert_trees_all_equal(updates, zeros)
  chex.assert_tree_all_finite((updates, state))


def test_rho_zero_equals_base_optimizer():
  params = _mlp_params(0)
  batches = _batches(3)
  base = lambda: optax.adam(1e-2)
  for got, want in zip(_train(sam(base(), 0.0), params, batches),
                       _train(base(), params, batches)):
    chex.assert_trees_all_equal(got, want)


def test_rho_schedule_is_read_at_the_step_count():
  # rho(0) = 0 (a plain SGD step), rho(1) = 0.2 (a SAM step with rho = 0.2).
  params = _mlp_params(0)
  b0, b1 = _batches(2)
  scheduled = _train(sam(optax.sgd(0.5), lambda count: 0.2 * (count > 0)), params, [b0, b1])
  first = _train(optax.sgd(0.5), params, [b0])[0]
  second = _train(sam(optax.sgd(0.5), 0.2), first, [b1])[0]
  chex.assert_trees_all_close(scheduled[0], first, rtol=RTOL, atol=ATOL)
  chex.assert_trees_all_close(scheduled[1], second, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- m-sharpness

def test_group_size_equal_to_batch_is_plain_sam_and_reuses_clean_gradient():
  params = _mlp_params(0)
  batch = _batch(1, n=12)
  grads = _mlp_grad(params, batch)
  calls = []

  def counting_grad_fn(p, b):
    calls.append(1)
    return _mlp_grad_fn(p, b)

  results = []
  for group_size in (None, 12):
    tx = sam(optax.sgd(0.5), 0.1, group_size=group_size)
    calls.clear()
    update = lambda s, p: tx.update(grads, s, p, grad_fn=counting_grad_fn, batch=batch)
    updates, _ = jax.jit(update)(tx.init(params), params)
    assert len(calls) == 1  # traced once: the clean gradient is the one passed in
    results.append(updates)
  chex.assert_trees_all_equal(*results)


@pytest.mark.parametrize("adaptive", [False, True])
def test_group_size_smaller_than_batch_equals_explicit_per_group_sam(adaptive):
  lr, rho, eta, m = 0.5, 0.1, 0.01, 4
  params = _mlp_params(0)
  batch = _batch(1, n=12)
  tx = sam(optax.sgd(lr), rho, adaptive=adaptive, eta=eta, group_size=m,
           aux_like=jax.ShapeDtypeStruct((), jnp.float32))
  grads = _mlp_grad(params, batch)
  updates, state = jax.jit(lambda s, p: tx.update(grads, s, p, grad_fn=_mlp_grad_fn, batch=batch))(
      tx.init(params), params)

  # Explicit: contiguous groups of m examples, each perturbed by its own gradient (numpy float64).
  w = {k: np.asarray(v, np.float64) for k, v in params.items()}
  t = {k: np.abs(v) + eta if adaptive else np.ones_like(v) for k, v in w.items()}
  grad_sum = {k: np.zeros_like(v) for k, v in w.items()}
  loss_sum = 0.0
  for k in range(12 // m):
    group = tuple(x[k * m:(k + 1) * m] for x in batch)
    g = {n: np.asarray(v, np.float64) for n, v in _mlp_grad(params, group).items()}
    norm = np.sqrt(sum(np.sum((t[n] * g[n]) ** 2) for n in g))
    perturbed = {n: jnp.asarray(w[n] + rho * t[n] ** 2 * g[n] / (norm + 1e-12), jnp.float32)
                 for n in w}
    loss, g2 = _mlp_value_and_grad(perturbed, group)
    loss_sum += float(loss)
    for n in grad_sum:
      grad_sum[n] += np.asarray(g2[n], np.float64)
  expected = {n: -lr * grad_sum[n] / (12 // m) for n in grad_sum}
  chex.assert_trees_all_close(updates, expected, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(state.aux, loss_sum / (12 // m), rtol=RTOL)


# ---------------------------------------------------------------- vmap over seeds, lax.scan

def test_vmap_over_seeds_equals_python_loop():
  seeds = 3
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  params = stack([_mlp_params(s) for s in range(seeds)])
  batches = stack([_batch(10 + s) for s in range(seeds)])
  # Scale seed s's data so the seeds' gradient norms differ a lot: a shared norm would show.
  batches = (batches[0] * jnp.array([0.1, 1.0, 10.0])[:, None, None], batches[1])
  rhos = jnp.array([0.05, 0.1, 0.2])

  def step(params, batch, rho):
    tx = sam(optax.sgd(0.5), rho, adaptive=True)
    grads = jax.grad(_mlp_loss)(params, batch)
    updates, _ = tx.update(grads, tx.init(params), params, grad_fn=_mlp_grad_fn, batch=batch)
    return updates

  vmapped = jax.jit(jax.vmap(step))(params, batches, rhos)
  for s in range(seeds):
    one = jax.tree.map(lambda x: x[s], (params, batches))
    looped = jax.jit(step)(*one, rhos[s])
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[s], vmapped), looped,
                                rtol=RTOL, atol=ATOL)


def test_state_is_a_lax_scan_carry():
  params = _mlp_params(0)
  batches = _batches(4)
  tx = sam(optax.sgd(0.5), optax.linear_schedule(0.0, 0.2, 4), group_size=6,
           aux_like=jax.ShapeDtypeStruct((), jnp.float32))

  def step(carry, batch):
    params, state = carry
    grads = jax.grad(_mlp_loss)(params, batch)
    updates, state = tx.update(grads, state, params, grad_fn=_mlp_grad_fn, batch=batch)
    return (optax.apply_updates(params, updates), state), None

  state0 = tx.init(params)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  scan = jax.jit(lambda c, b: jax.lax.scan(step, c, b))
  (scanned, scan_state), _ = scan((params, state0), stacked)
  chex.assert_trees_all_equal_shapes_and_dtypes(scan_state, state0)
  assert int(scan_state.count) == 4
  looped = _train(tx, params, batches)[-1]
  chex.assert_trees_all_close(scanned, looped, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- BatchNorm policies

class _BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4, name="dense0")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(3)(nn.relu(x))


def test_batchnorm_policies_update_the_statistics_they_say():
  model = _BNNet()
  x, y = _batch(1, n=8)
  x = x[:, :3] + 1.0  # nonzero mean, so the stats move visibly
  variables = jax.jit(lambda x: model.init({"params": jax.random.key(0)}, x, train=False))(x)
  params, stats0 = variables["params"], variables["batch_stats"]
  lr, rho, momentum = 0.5, 0.5, 0.9

  def loss_fn(params, batch_stats, batch):
    logits, new = model.apply({"params": params, "batch_stats": batch_stats}, batch[0],
                              train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()
    return loss, new["batch_stats"]

  def train_step(params, batch_stats, opt_state, batch, policy):
    grads, clean_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, batch)
    start = perturbed_pass_stats(policy, batch_stats, clean_stats)
    grad_fn = lambda p, b: jax.grad(loss_fn, has_aux=True)(p, start, b)
    updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn, batch=batch)
    params = optax.apply_updates(params, updates)
    return params, sam_batch_stats(policy, clean_stats, opt_state), opt_state

  tx = sam(optax.sgd(lr), rho, aux_like=stats0)

  # Explicit passes: the running mean of the BatchNorm input, from the first Dense layer's output.
  def pre_bn_mean(p):
    k, b = (np.asarray(p["dense0"][n], np.float64) for n in ("kernel", "bias"))
    return (np.asarray(x, np.float64) @ k + b).mean(axis=0)

  g = jax.jit(jax.grad(loss_fn, has_aux=True))(params, stats0, (x, y))[0]
  norm = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree.leaves(g)))
  perturbed = jax.tree.map(lambda w, gw: w + rho * gw / (norm + 1e-12), params, g)
  mean0 = np.asarray(stats0["BatchNorm_0"]["mean"], np.float64)
  clean = momentum * mean0 + (1 - momentum) * pre_bn_mean(params)
  perturbed_mean = pre_bn_mean(perturbed)
  expected = {
      "clean": clean,
      "perturbed": momentum * mean0 + (1 - momentum) * perturbed_mean,
      "both": momentum * clean + (1 - momentum) * perturbed_mean,
  }
  assert min(np.abs(expected[a] - expected[b]).max()
             for a in expected for b in expected if a != b) > 1e-3

  results = jax.jit(lambda: {policy: train_step(params, stats0, tx.init(params), (x, y), policy)
                             for policy in BATCH_STATS_POLICIES})()
  new_params = {}
  for policy, (new_params[policy], stats, state) in results.items():
    np.testing.assert_allclose(stats["BatchNorm_0"]["mean"], expected[policy], rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))
  # The policy changes only the statistics, never the weights.
  chex.assert_trees_all_equal(new_params["clean"], new_params["perturbed"], new_params["both"])


def test_sam_batch_stats_finds_the_state_inside_a_chain():
  stats = {"mean": jnp.ones(2)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), sam(optax.sgd(0.1), 0.1, aux_like=stats))
  state = tx.init({"w": jnp.ones(2)})
  assert isinstance(state[1], SAMState)
  chex.assert_trees_all_equal(sam_batch_stats("both", stats, state), {"mean": jnp.zeros(2)})
  chex.assert_trees_all_equal(sam_batch_stats("clean", stats, state), stats)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, message", [
    (dict(rho=-0.1), "rho"),
    (dict(rho=float("nan")), "rho"),
    (dict(rho=0.1, eta=-0.01), "eta"),
    (dict(rho=0.1, eps=-1.0), "eps"),
    (dict(rho=0.1, group_size=0), "group_size"),
    (dict(rho=0.1, group_size=2.5), "group_size"),
    (dict(rho=0.1, group_size=True), "group_size"),
    (dict(rho=0.1, mask={"w": True}), "adaptive"),
])
def test_bad_hyperparameters_raise(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sam(optax.sgd(0.1), **kwargs)


def test_group_size_must_divide_the_batch():
  params = _mlp_params(0)
  batch = _batch(1, n=12)
  tx = sam(optax.sgd(0.1), 0.1, group_size=5)
  with pytest.raises(ValueError, match="does not divide the batch size 12"):
    tx.update(params, tx.init(params), params, grad_fn=_mlp_grad_fn, batch=batch)


def test_missing_grad_fn_and_unknown_policy_raise():
  params = {"w": jnp.ones(2)}
  tx = sam(optax.sgd(0.1), 0.1)
  with pytest.raises(ValueError, match="grad_fn"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="policy"):
    perturbed_pass_stats("running", None, None)
  with pytest.raises(ValueError, match="aux_like"):
    sam_batch_stats("both", None, tx.init(params))
