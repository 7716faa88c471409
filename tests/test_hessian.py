"""flatjax.hessian against independent truths: dense Hessians, closed-form spectra, explicit loops."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from flatjax import hessian as H


# ----------------------------------------------------------------------------- small networks


class TinyMLP(nn.Module):
  batch_norm: bool = False
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(6)(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = jnp.tanh(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(3)(x)


class TinyConv(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(3, (3, 3), padding=1)(x)
    x = jnp.tanh(x)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def make_data(n, shape, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, *shape)), dtype)
  y = jnp.asarray(rng.integers(0, 3, size=n), jnp.int32)
  return x, y


def init(model, x, seed=0, with_running_stats=False):
  variables = model.init(jax.random.PRNGKey(seed), x[:4], train=False)
  if with_running_stats and "batch_stats" in variables:
    # Non-trivial running statistics, so eval mode differs from train mode.
    variables = {**variables, "batch_stats": jax.tree.map(
        lambda s: s + 0.3 * jax.random.uniform(jax.random.PRNGKey(7), s.shape, s.dtype),
        variables["batch_stats"])}
  return variables


def dense_eigvals(loss_fn, params):
  """All Hessian eigenvalues of loss_fn at params, from jax.hessian in float64."""
  flat, unravel = ravel_pytree(params)
  hess = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f))))(flat)
  return np.linalg.eigvalsh(np.asarray(hess, np.float64))


def explicit_chunk_loss(model, variables, x, y, chunk, train):
  """Mean loss as an explicit Python sum over chunks, each weighted by its size."""
  n = x.shape[0]

  def loss(params):
    total = 0.0
    for start in range(0, n, chunk):
      xc, yc = x[start:start + chunk], y[start:start + chunk]
      full = {**variables, "params": params}
      if train:
        logits, _ = model.apply(full, xc, train=True, mutable=["batch_stats"])
      else:
        logits = model.apply(full, xc, train=False)
      total = total + xc.shape[0] * H.cross_entropy(logits, yc)
    return total / n

  return loss


# ----------------------------------------------------------------------------- dense truth

NETWORKS = {
    "mlp": (TinyMLP(), (2, 3), "eval"),
    "mlp_bn_train": (TinyMLP(batch_norm=True), (2, 3), "train"),
    "mlp_bn_eval": (TinyMLP(batch_norm=True), (2, 3), "eval"),
    "conv": (TinyConv(), (4, 4, 2), "eval"),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_lambda_max_matches_dense_hessian(name, precision):
  model, shape, bn_mode = NETWORKS[name]
  x64 = precision == "float64"
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    x, y = make_data(23, shape, dtype=dtype)  # 23 = 2 chunks of 10 + a partial chunk of 3
    variables = jax.tree.map(lambda a: a.astype(dtype), init(model, x, with_running_stats=True))
    result = H.lambda_max(model, variables, x, y, batch_size=10, subset_size=None,
                          batch_norm=bn_mode)
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x64_, y64 = jnp.asarray(x, jnp.float64), y
    truth = dense_eigvals(
        explicit_chunk_loss(model, v64, x64_, y64, 10, bn_mode == "train"), v64["params"])[-1]
  rel = abs(float(result.eigenvalue) - truth) / abs(truth)
  assert rel <= (1e-8 if x64 else 1e-4), (rel, float(result.eigenvalue), truth)
  assert bool(result.converged)
  # The returned residual is a real ||Hv - lambda v|| and small relative to lambda.
  assert float(result.residual) <= (1e-8 if x64 else 1e-3) * abs(truth)


# ----------------------------------------------------------------------------- known spectra


def quadratic(eigenvalues, seed=0):
  """A quadratic loss on a two-leaf pytree whose Hessian has exactly these eigenvalues."""
  n = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  a = jnp.asarray((q * np.asarray(eigenvalues)) @ q.T)
  params = {"u": jnp.zeros(n - 7, a.dtype), "w": jnp.zeros((7,), a.dtype)}

  def loss(p):
    flat = ravel_pytree(p)[0]
    return 0.5 * flat @ (a @ flat)

  return loss, params


SPECTRUM = np.concatenate([[-10.0, 7.0, 6.5, 6.0, 5.0], np.linspace(-3.0, 3.0, 75)])


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("which,expected", [("LA", 7.0), ("LM", -10.0), ("SA", -10.0)])
def test_which_selects_the_right_end(method, which, expected):
  with jax.enable_x64(True):
    loss, params = quadratic(SPECTRUM)
    res = H.top_eigenvalue(loss, params, which=which, method=method,
                           num_iters=3000 if method == "power" else 100)
    np.testing.assert_allclose(res.eigenvalue, expected, rtol=1e-8)
    assert bool(res.converged)
    # The eigenvector is a unit eigenvector of the Hessian.
    v = res.eigenvector
    hv = H.hvp(loss, params, v)
    np.testing.assert_allclose(ravel_pytree(hv)[0], expected * ravel_pytree(v)[0], atol=1e-7)


def test_which_sa_on_a_positive_definite_spectrum():
  with jax.enable_x64(True):
    loss, params = quadratic(np.linspace(0.5, 4.0, 40))
    for method in ("lanczos", "power"):
      res = H.top_eigenvalue(loss, params, which="SA", method=method, num_iters=5000)
      np.testing.assert_allclose(res.eigenvalue, 0.5, rtol=1e-7)


@pytest.mark.parametrize("which,expected", [
    ("LA", [7.0, 6.5, 6.0, 5.0]), ("LM", [-10.0, 7.0, 6.5, 6.0]), ("SA", [-10.0, -3.0, 3.0 - 6.0 * 73 / 74, 3.0 - 6.0 * 72 / 74])])
def test_top_k(which, expected):
  with jax.enable_x64(True):
    loss, params = quadratic(SPECTRUM)
    res = H.top_eigenvalue(loss, params, k=4, which=which)
    np.testing.assert_allclose(res.eigenvalue, expected, rtol=1e-8)
    assert res.residual.shape == (4,)
    assert jax.tree.leaves(res.eigenvector)[0].shape[0] == 4
    vecs = jax.vmap(lambda v: ravel_pytree(v)[0])(res.eigenvector)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(4), atol=1e-8)


def test_lanczos_beats_power_iteration_on_a_small_relative_gap():
  """Top two eigenvalues 1.0 and 0.99: power needs ~log(1e-6)/log(0.99) steps, Lanczos far fewer."""
  with jax.enable_x64(True):
    spectrum = np.concatenate([[1.0, 0.99], np.linspace(-0.5, 0.98, 198)])
    loss, params = quadratic(spectrum)

    def hvps_to_accuracy(method, caps):
      for cap in caps:
        res = H.top_eigenvalue(loss, params, method=method, num_iters=cap, tol=0.0)
        if abs(float(res.eigenvalue) - 1.0) <= 1e-6:
          return int(res.num_hvps)
      return None

    lanczos = hvps_to_accuracy("lanczos", range(5, 200, 5))
    power = hvps_to_accuracy("power", range(100, 3000, 100))
  assert lanczos is not None and power is not None
  assert lanczos < power / 3, (lanczos, power)


def test_early_stopping_and_warm_start():
  with jax.enable_x64(True):
    loss, params = quadratic(SPECTRUM)
    cold = H.top_eigenvalue(loss, params, num_iters=150)
    assert int(cold.num_hvps) < 150  # stopped when converged, not at the cap
    warm = H.top_eigenvalue(loss, params, num_iters=150, init=cold.eigenvector)
    np.testing.assert_allclose(warm.eigenvalue, cold.eigenvalue, rtol=1e-10)
    assert int(warm.num_hvps) <= 3
    power_warm = H.top_eigenvalue(loss, params, method="power", init=cold.eigenvector)
    assert int(power_warm.num_hvps) <= 3


@pytest.mark.parametrize("fill", [0.0, np.nan])
def test_unusable_init_falls_back_to_the_random_start(fill):
  with jax.enable_x64(True):
    loss, params = quadratic(SPECTRUM)
    bad = jax.tree.map(lambda p: jnp.full_like(p, fill), params)
    res = H.top_eigenvalue(loss, params, num_iters=150, init=bad)
    cold = H.top_eigenvalue(loss, params, num_iters=150)
    np.testing.assert_allclose(res.eigenvalue, cold.eigenvalue, rtol=1e-12)
    assert int(res.num_hvps) == int(cold.num_hvps)


def test_invariant_subspace_stops_exactly():
  """A start vector in a 2-d invariant subspace: Lanczos finds it in two steps and stops."""
  with jax.enable_x64(True):
    loss, params = quadratic(np.array([3.0, 1.0] + [0.5] * 18))
    a = jax.hessian(lambda f: loss(ravel_pytree(params)[1](f)))(ravel_pytree(params)[0])
    w, q = np.linalg.eigh(np.asarray(a))
    start = ravel_pytree(params)[1](jnp.asarray(q[:, -1] + q[:, -2]))
    res = H.top_eigenvalue(loss, params, init=start)
    np.testing.assert_allclose(res.eigenvalue, 3.0, rtol=1e-12)
    assert int(res.num_hvps) == 3 and bool(res.converged)


# ----------------------------------------------------------------------------- dataset operators


def test_chunked_loss_and_hvp_equal_unchunked_in_eval_mode():
  model = TinyMLP(batch_norm=True)
  x, y = make_data(37, (2, 3))
  variables = init(model, x, with_running_stats=True)
  chunk_loss = H.model_loss(model, variables, batch_norm="eval")
  params = variables["params"]
  v = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
  whole = lambda p: chunk_loss(p, x, y, 0)
  for chunk in (5, 10, 37, 100):
    np.testing.assert_allclose(H.dataset_loss(chunk_loss, params, x, y, chunk), whole(params),
                               rtol=1e-6)
    chex_close(H.dataset_hvp(chunk_loss, params, v, x, y, chunk), H.hvp(whole, params, v))


def test_chunked_train_mode_equals_explicit_ghost_batches():
  model = TinyMLP(batch_norm=True)
  x, y = make_data(37, (2, 3))  # chunks of 10, 10, 10 and a partial chunk of 7
  variables = init(model, x)
  chunk_loss = H.model_loss(model, variables, batch_norm="train")
  params = variables["params"]
  v = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(4), p.shape), params)
  explicit = explicit_chunk_loss(model, variables, x, y, 10, train=True)
  np.testing.assert_allclose(H.dataset_loss(chunk_loss, params, x, y, 10), explicit(params),
                             rtol=1e-6)
  chex_close(H.dataset_hvp(chunk_loss, params, v, x, y, 10), H.hvp(explicit, params, v))
  # Ghost batches matter: the whole-batch train-mode loss is a different function.
  whole = explicit_chunk_loss(model, variables, x, y, 37, train=True)
  assert abs(float(whole(params)) - float(explicit(params))) > 1e-4


def test_partial_chunk_is_weighted_by_its_size():
  """Per-example losses make the weighting visible: the mean must be over examples, not chunks."""
  x = jnp.arange(7.0)[:, None]
  y = jnp.zeros(7, jnp.int32)
  mean = H.chunked_mean(lambda xc, yc, i: jnp.mean(xc), x, y, 3)  # chunks [0,1,2],[3,4,5],[6]
  np.testing.assert_allclose(mean, 3.0, rtol=1e-7)
  indices = H.chunked_mean(lambda xc, yc, i: i.astype(jnp.float32), x, y, 3)
  np.testing.assert_allclose(indices, (0 * 3 + 1 * 3 + 2 * 1) / 7, rtol=1e-7)


def test_dropout_on_uses_a_fixed_mask_per_chunk():
  model = TinyMLP(dropout=0.5)
  x, y = make_data(20, (2, 3))
  variables = init(model, x)
  params = variables["params"]
  key = jax.random.PRNGKey(11)
  on = H.model_loss(model, variables, dropout_key=key)
  off = H.model_loss(model, variables)
  l_on = H.dataset_loss(on, params, x, y, 10)
  np.testing.assert_allclose(l_on, H.dataset_loss(on, params, x, y, 10))  # deterministic
  explicit = sum(
      H.cross_entropy(model.apply(variables, x[s:s + 10], train=True,
                                  rngs={"dropout": jax.random.fold_in(key, i)}), y[s:s + 10])
      for i, s in enumerate((0, 10))) / 2
  np.testing.assert_allclose(l_on, explicit, rtol=1e-6)
  assert abs(float(l_on) - float(H.dataset_loss(off, params, x, y, 10))) > 1e-4


def test_lambda_max_uses_the_strided_subset_and_batch_size_chunks():
  model = TinyMLP(batch_norm=True)
  x, y = make_data(100, (2, 3))
  variables = init(model, x)
  res = H.lambda_max(model, variables, x, y, batch_size=4, subset_size=20)
  xs, ys = x[::5], y[::5]
  explicit = explicit_chunk_loss(model, variables, xs, ys, 4, train=True)
  with jax.enable_x64(True):
    truth = dense_eigvals(explicit, variables["params"])[-1]
  np.testing.assert_allclose(res.eigenvalue, truth, rtol=1e-4)


def test_interpolated_lambda_max_is_the_max_over_explicit_points():
  model = TinyMLP(batch_norm=True)
  x, y = make_data(30, (2, 3))
  a = init(model, x, seed=0, with_running_stats=True)
  b = init(model, x, seed=1)
  best, values = H.interpolated_lambda_max(model, a, b, x, y, num_points=4, batch_size=10,
                                           subset_size=None, batch_norm="eval")
  singles = []
  for t, value in zip(np.linspace(0, 1, 4), values):
    mixed = jax.tree.map(lambda u, w: (1 - t) * u + t * w, a, b)
    singles.append(H.lambda_max(model, mixed, x, y, batch_size=10, subset_size=None,
                                batch_norm="eval"))
    np.testing.assert_allclose(value, singles[-1].eigenvalue, rtol=1e-4)
  top = int(np.argmax(values))
  np.testing.assert_allclose(best.eigenvalue, np.max(values))
  np.testing.assert_allclose(best.residual, singles[top].residual, rtol=1e-2, atol=1e-6)
  assert int(best.num_hvps) == sum(int(r.num_hvps) for r in singles)
  assert len(set(np.round(np.asarray(values), 4))) == 4  # the points really differ


# ----------------------------------------------------------------------------- jit / vmap / compile


def test_vmap_over_seeds_equals_a_python_loop():
  model = TinyMLP()
  x, y = make_data(24, (2, 3))
  stack = [init(model, x, seed=s) for s in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *stack)
  solve = lambda v: H.lambda_max(model, v, x, y, batch_size=8, subset_size=None)
  batched = jax.jit(jax.vmap(solve))(stacked)
  for i, variables in enumerate(stack):
    single = solve(variables)
    np.testing.assert_allclose(batched.eigenvalue[i], single.eigenvalue, rtol=1e-5)
    assert int(batched.num_hvps[i]) == int(single.num_hvps)
  assert len(set(np.round(np.asarray(batched.eigenvalue), 5))) == 3


def test_program_size_does_not_grow_with_num_iters():
  loss, params = quadratic(SPECTRUM)
  sizes = []
  for method in ("lanczos", "power"):
    for num_iters in (10, 200):
      jaxpr = jax.make_jaxpr(lambda p: H.top_eigenvalue(loss, p, method=method,
                                                        num_iters=num_iters))(params)
      sizes.append(count_eqns(jaxpr.jaxpr))
  assert sizes[0] == sizes[1] and sizes[2] == sizes[3], sizes


def test_bad_arguments_raise_clear_errors():
  loss, params = quadratic(SPECTRUM)
  with pytest.raises(ValueError, match="which"):
    H.top_eigenvalue(loss, params, which="LR")
  with pytest.raises(ValueError, match="method"):
    H.top_eigenvalue(loss, params, method="arnoldi")
  with pytest.raises(ValueError, match="k > 1"):
    H.top_eigenvalue(loss, params, method="power", k=2)
  with pytest.raises(ValueError, match="batch_norm"):
    H.model_loss(TinyMLP(), {}, batch_norm="frozen")


# ----------------------------------------------------------------------------- helpers


def chex_close(a, b, rtol=1e-5, atol=1e-6):
  for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, w, rtol=rtol, atol=atol)


def count_eqns(jaxpr):
  """Equations in a jaxpr, sub-jaxprs (loop bodies) included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += count_eqns(sub)
  return total


def test_exhausted_krylov_space_reports_missing_eigenvalues():
  """Hessian 2I: one distinct eigenvalue, so k = 3 finds 2 once and reports the rest as missing."""
  with jax.enable_x64(True):
    params = {"p": jnp.ones(5)}
    res = H.top_eigenvalue(lambda p: jnp.sum(p["p"] ** 2), params, k=3)
    np.testing.assert_allclose(res.eigenvalue[0], 2.0, rtol=1e-12)
    assert np.all(np.isnan(res.eigenvalue[1:])) and not bool(res.converged)


def test_bad_parameters_raise_clear_errors():
  quad = lambda p: 0.5 * jnp.sum(p["x"] ** 2)
  with pytest.raises(ValueError, match="exceeds the number of parameters"):
    H.top_eigenvalue(quad, {"x": jnp.ones(3)}, k=5, num_iters=10)
  with pytest.raises(ValueError, match="tol"):
    H.top_eigenvalue(quad, {"x": jnp.ones(3)}, tol=-1.0)
  with pytest.raises(ValueError, match="floating-point"):
    H.top_eigenvalue(quad, {"x": jnp.ones(3, jnp.int32)})
  with pytest.raises(ValueError, match="floating-point"):
    H.top_eigenvalue(quad, {})


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_params(dtype):
  """Half-precision params: float32 Krylov arithmetic, eigenvalue to the dtype's precision."""
  scales = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.5, 0.5], dtype)
  params = {"w": jnp.ones(8, dtype)}
  res = H.top_eigenvalue(lambda p: 0.5 * jnp.sum(scales * p["w"] ** 2), params)
  np.testing.assert_allclose(float(res.eigenvalue), 7.5, rtol=2e-2)
  assert res.eigenvector["w"].dtype == dtype and bool(res.converged)
