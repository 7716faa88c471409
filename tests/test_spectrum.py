"""flatjax.spectrum against independent truths: dense Hessians, closed forms, explicit loops."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from flatjax import hessian as H
from flatjax import spectrum as S

# ----------------------------------------------------------------------------- small problems


class TinyMLP(nn.Module):
  activation: str = "tanh"

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6)(x.reshape(x.shape[0], -1))
    x = jnp.tanh(x) if self.activation == "tanh" else nn.relu(x)
    return nn.Dense(3)(x)


@functools.lru_cache(maxsize=None)
def mlp_problem(seed=0, activation="tanh"):
  """A float64 cross-entropy loss of a 5-6-3 MLP (57 parameters) on 20 random examples.

  Cached, so that tests share the loss function and with it the compiled programs. Call it under
  ``jax.enable_x64(True)``.
  """
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(20, 5)), jnp.float64)
  y = jnp.asarray(rng.integers(0, 3, size=20), jnp.int32)
  model = TinyMLP(activation)
  params = model.init(jax.random.PRNGKey(seed), x)["params"]
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
  return (lambda p: H.cross_entropy(model.apply({"params": p}, x), y)), params


def dense_hessian(loss_fn, params):
  flat, unravel = ravel_pytree(params)
  return np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f))))(flat), np.float64)


@functools.lru_cache(maxsize=None)
def mlp_hessian(seed=0, activation="tanh"):
  return dense_hessian(*mlp_problem(seed, activation))


def quadratic(eigenvalues, seed=0, center=None):
  """0.5 (w - c)^T A (w - c) on a two-leaf pytree, A with exactly these eigenvalues."""
  n = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  a = (q * np.asarray(eigenvalues, np.float64)) @ q.T
  c = np.zeros(n) if center is None else np.asarray(center, np.float64)
  unravel = ravel_pytree({"u": jnp.zeros(n - n // 2), "w": jnp.zeros(n // 2)})[1]
  a_, c_ = jnp.asarray(a), jnp.asarray(c)

  def loss(p):
    d = ravel_pytree(p)[0] - c_
    return 0.5 * d @ (a_ @ d)

  return loss, unravel, a


# ----------------------------------------------------------------------------- traces


@pytest.mark.parametrize("probes", ["rademacher", "normal"])
def test_hutchinson_matches_the_dense_trace_within_4_stderr(probes):
  with jax.enable_x64(True):
    loss, params = mlp_problem()
    truth = np.trace(mlp_hessian())
    est = S.hutchinson_trace(loss, params, num_probes=200, key=jax.random.PRNGKey(1),
                             probes=probes)
  assert int(est.num_hvps) == 200
  assert 0 < float(est.stderr) < 0.2 * abs(truth)
  assert abs(float(est.trace) - truth) <= 4 * float(est.stderr), (float(est.trace), truth)


def test_hutchpp_matches_the_dense_trace_within_4_stderr():
  with jax.enable_x64(True):
    loss, params = mlp_problem()
    truth = np.trace(mlp_hessian())
    est = S.hutchpp_trace(loss, params, num_hvps=62, key=jax.random.PRNGKey(2))
  assert int(est.num_hvps) == 62  # 20 sketch + 20 exact + 22 remainder
  assert float(est.stderr) > 0
  assert abs(float(est.trace) - truth) <= 4 * float(est.stderr), (float(est.trace), truth)


def test_hutchpp_is_exact_when_the_rank_fits_the_sketch():
  """Rank 5 <= 18 // 3: the sketch spans the range, the remainder is zero."""
  with jax.enable_x64(True):
    loss, unravel, a = quadratic(np.concatenate([[9.0, 5.0, -3.0, 2.0, 1.0], np.zeros(35)]))
    est = S.hutchpp_trace(loss, unravel(jnp.ones(40)), num_hvps=18, key=jax.random.PRNGKey(0))
  np.testing.assert_allclose(est.trace, np.trace(a), rtol=1e-10)
  assert float(est.stderr) < 1e-10


def test_hutchpp_beats_hutchinson_at_equal_hvps_on_a_few_large_eigenvalues():
  """Five eigenvalues of 100-1000 over a bulk in [0, 1]: RMS errors over 16 keys at 30 HVPs each."""
  with jax.enable_x64(True):
    spectrum = np.concatenate([[1000.0, 500.0, 300.0, 200.0, 100.0], np.linspace(0, 1, 95)])
    loss, unravel, a = quadratic(spectrum, seed=3)
    params = unravel(jnp.zeros(100))
    keys = jax.random.split(jax.random.PRNGKey(5), 16)
    plain = jax.vmap(lambda k: S.hutchinson_trace(loss, params, num_probes=30, key=k))(keys)
    plus = jax.vmap(lambda k: S.hutchpp_trace(loss, params, num_hvps=30, key=k))(keys)
  truth = np.trace(a)
  rms = lambda e: float(np.sqrt(np.mean((np.asarray(e.trace) - truth) ** 2)))
  assert rms(plus) < rms(plain) / 20, (rms(plus), rms(plain))
  assert rms(plus) < 1e-2 * truth


# ----------------------------------------------------------------------------- spectral density


def test_slq_moments_match_the_dense_spectrum_within_4_stderr():
  with jax.enable_x64(True):
    loss, params = mlp_problem()
    eig = np.linalg.eigvalsh(mlp_hessian())
    density = S.spectral_density(loss, params, num_probes=30, num_iters=12,
                                 key=jax.random.PRNGKey(3))
    assert density.nodes.shape == density.weights.shape == (30, 12)
    np.testing.assert_allclose(density.weights.sum(axis=1), 1.0, rtol=1e-12)
    zeroth = S.density_moment(density, 0)
    np.testing.assert_allclose(zeroth.moment, 1.0, rtol=1e-12)
    for k in (1, 2):
      est = S.density_moment(density, k)
      truth = np.mean(eig**k)
      assert 0 < float(est.stderr) < 0.3 * abs(truth)
      assert abs(float(est.moment) - truth) <= 4 * float(est.stderr), (k, float(est.moment), truth)


@pytest.mark.parametrize("spectrum,distinct", [
    (np.linspace(-2.0, 5.0, 12), 12),  # n = 12 < num_iters = 16: the Krylov space is all of R^n
    (np.repeat([-2.0, 1.0, 5.0], 4), 3),  # three distinct eigenvalues: exhausted after 3 steps
])
def test_slq_nodes_are_the_exact_eigenvalues_when_the_krylov_space_is_exhausted(spectrum,
                                                                                 distinct):
  with jax.enable_x64(True):
    loss, unravel, _ = quadratic(spectrum)
    density = S.spectral_density(loss, unravel(jnp.zeros(12)), num_probes=4, num_iters=16,
                                 key=jax.random.PRNGKey(4))
  nodes, weights = np.asarray(density.nodes), np.asarray(density.weights)
  for row_nodes, row_weights in zip(nodes, weights):
    np.testing.assert_allclose(row_nodes[:distinct], np.unique(spectrum), atol=1e-10)
    assert np.all(row_weights[:distinct] > 1e-6)
    np.testing.assert_array_equal(row_weights[distinct:], 0.0)
    np.testing.assert_allclose(row_weights.sum(), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(row_nodes[distinct:], row_nodes[distinct - 1])


def test_density_on_grid_integrates_to_one_and_keeps_the_mean():
  with jax.enable_x64(True):
    loss, params = mlp_problem()
    density = S.spectral_density(loss, params, num_probes=5, num_iters=20,
                                 key=jax.random.PRNGKey(6))
    sigma = 0.01
    lo, hi = float(density.nodes.min()) - 10 * sigma, float(density.nodes.max()) + 10 * sigma
    grid = jnp.linspace(lo, hi, 20001)
    values = np.asarray(S.density_on_grid(density, grid, sigma))
    mean = float(S.density_moment(density, 1).moment)
  assert np.all(values >= 0)
  np.testing.assert_allclose(np.trapezoid(values, grid), 1.0, atol=1e-8)
  # Gaussian smoothing keeps the first moment.
  np.testing.assert_allclose(np.trapezoid(values * np.asarray(grid), grid), mean, atol=1e-8)


# ----------------------------------------------------------------------------- layer blocks


def test_parameter_groups_follow_parent_containers():
  params = {"Outer": {"w": jnp.ones(2), "Inner": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
            "scale": jnp.ones(1), "Dense_0": {"kernel": jnp.ones((3, 1))}}
  groups = S.parameter_groups(params)
  # Leaves in jax.tree.leaves order: Dense_0/kernel, Outer/Inner/bias, Outer/Inner/kernel,
  # Outer/w, scale.
  assert groups == {"Dense_0": [0], "Outer/Inner": [1, 2], "Outer": [3], "": [4]}


def test_layer_blocks_match_the_dense_hessian_diagonal_blocks():
  with jax.enable_x64(True):
    loss, params = mlp_problem(seed=1)
    hess = mlp_hessian(seed=1)
    blocks = S.layer_top_eigenvalues(loss, params, num_iters=40)
    # The same blocks through a full-params hvp_fn, restricted by zero padding, and other
    # solver settings passed through (power iteration: a smaller program to compile).
    via_hvp_fn = S.layer_top_eigenvalues(loss, params, method="power", num_iters=3000, tol=1e-12,
                                         hvp_fn=lambda p, v: H.hvp(loss, p, v))
  assert list(blocks) == ["Dense_0", "Dense_1"]
  sizes = [leaf.size for leaf in jax.tree.leaves(params)]
  offsets = np.cumsum([0] + sizes)
  for name, indices in S.parameter_groups(params).items():
    index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in indices])
    truth = np.linalg.eigvalsh(hess[np.ix_(index, index)])[-1]
    for result in (blocks[name], via_hvp_fn[name]):
      assert abs(float(result.eigenvalue) - truth) <= 1e-8 * abs(truth), (name, truth)
      assert bool(result.converged)
    assert set(blocks[name].eigenvector) == {"kernel", "bias"}


# ----------------------------------------------------------------------------- adaptive sharpness


def scaled_quadratic_truth(a, w, c, rho, eta):
  """max over ||u|| <= rho of L(w + s u) - L(w), s = |w| + eta, L = 0.5 (w-c)^T A (w-c).

  With M = S A S and g = S A (w - c) this is max g.u + 0.5 u.M u over the ball: for g = 0 it is
  0.5 rho^2 lambda_max(M); otherwise u = (mu I - M)^-1 g with mu > lambda_max(M) and ||u|| = rho
  (the trust-region subproblem), mu found by bisection.
  """
  s = np.abs(w) + eta
  m = s[:, None] * a * s[None, :]
  g = s * (a @ (w - c))
  lam, v = np.linalg.eigh(m)
  if np.linalg.norm(g) == 0:
    return 0.5 * rho**2 * lam[-1]
  gv = v.T @ g
  norm = lambda mu: np.sqrt(np.sum((gv / (mu - lam)) ** 2))
  lo, hi = lam[-1] + 1e-15, lam[-1] + np.linalg.norm(g) / rho + 1.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
  u = v @ (gv / (0.5 * (lo + hi) - lam))
  return g @ u + 0.5 * u @ m @ u


@pytest.mark.parametrize("at_minimum", [True, False])
@pytest.mark.parametrize("random_start", [False, True])
def test_adaptive_sharpness_of_a_quadratic_reaches_the_closed_form(at_minimum, random_start):
  with jax.enable_x64(True):
    rng = np.random.default_rng(8)
    c = rng.normal(size=20)
    w = c if at_minimum else c + 0.3 * rng.normal(size=20)
    loss, unravel, a = quadratic(np.concatenate([[10.0, 5.0], np.linspace(0.1, 3, 18)]), seed=8,
                                 center=c)
    rho, eta = 0.2, 0.1
    est = S.adaptive_sharpness(loss, unravel(jnp.asarray(w)), rho=rho, eta=eta,
                               key=jax.random.PRNGKey(9) if random_start else None)
  truth = scaled_quadratic_truth(a, w, c, rho, eta)
  assert abs(float(est.sharpness) - truth) <= 1e-3 * truth, (float(est.sharpness), truth)
  assert float(est.sharpness) <= truth * (1 + 1e-12)  # a lower bound
  np.testing.assert_allclose(est.perturbed_loss - est.loss, est.sharpness, rtol=1e-12)


def test_adaptive_sharpness_is_invariant_to_relu_rescaling_while_lambda_max_is_not():
  """Dense_0 (kernel and bias) times c and Dense_1's kernel over c: the same function."""
  with jax.enable_x64(True):
    loss, params = mlp_problem(seed=2, activation="relu")
    c = 4.0
    rescaled = {"Dense_0": jax.tree.map(lambda a: c * a, params["Dense_0"]),
                "Dense_1": {"kernel": params["Dense_1"]["kernel"] / c,
                            "bias": params["Dense_1"]["bias"]}}
    np.testing.assert_allclose(loss(rescaled), loss(params), rtol=1e-12)
    sharp = [S.adaptive_sharpness(loss, p, rho=0.05, eta=1e-12) for p in (params, rescaled)]
    lam = [np.linalg.eigvalsh(dense_hessian(loss, p))[-1] for p in (params, rescaled)]
  assert float(sharp[0].sharpness) > 0
  np.testing.assert_allclose(sharp[1].sharpness, sharp[0].sharpness, rtol=1e-6)
  assert abs(float(lam[1]) / float(lam[0]) - 1) > 0.5, lam


# ----------------------------------------------------------------------------- jit / vmap


def test_jit_and_vmap_over_two_parameter_sets_equal_a_python_loop():
  with jax.enable_x64(True):
    loss, params0 = mlp_problem(seed=0)
    params1 = mlp_problem(seed=1)[1]  # another init, same shapes, evaluated on seed 0's data
    stack = jax.tree.map(lambda *a: jnp.stack(a), params0, params1)
    key = jax.random.PRNGKey(11)

    def measures(p):
      return (S.hutchinson_trace(loss, p, num_probes=8, key=key),
              S.spectral_density(loss, p, num_probes=2, num_iters=10, key=key))

    batched = jax.jit(jax.vmap(measures))(stack)
    for i, p in enumerate((params0, params1)):
      for got, want in zip(batched, measures(p)):
        for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
          np.testing.assert_allclose(u[i], v, rtol=1e-9, atol=1e-12)
  assert not np.allclose(batched[0].trace[0], batched[0].trace[1])


def test_bad_arguments_raise_clear_errors():
  loss = lambda p: jnp.sum(p["x"] ** 2)
  params = {"x": jnp.ones(3)}
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="num_probes"):
    S.hutchinson_trace(loss, params, num_probes=0, key=key)
  with pytest.raises(ValueError, match="probes"):
    S.hutchinson_trace(loss, params, num_probes=4, key=key, probes="gaussian")
  with pytest.raises(ValueError, match="num_hvps"):
    S.hutchpp_trace(loss, params, num_hvps=2, key=key)
  with pytest.raises(ValueError, match="num_iters"):
    S.spectral_density(loss, params, num_probes=2, num_iters=0, key=key)
  with pytest.raises(ValueError, match="rho"):
    S.adaptive_sharpness(loss, params, rho=-1.0)
  with pytest.raises(ValueError, match="floating-point"):
    S.hutchinson_trace(loss, {"x": jnp.ones(3, jnp.int32)}, num_probes=4, key=key)
