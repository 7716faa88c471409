"""Tests of flatjax.models and flatjax.conv against flax's layers, lax.conv_general_dilated, numpy.

Tolerances compare the largest absolute difference with the largest absolute value of the truth:
float32 1e-5 (a few ulps of accumulated rounding), float64 1e-12.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatjax import conv as conv_lib
from flatjax import models

TOL = {np.float32: 1e-5, np.float64: 1e-12}
VGG11_SPEC = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")  # paper, config A


def assert_close(actual, truth, tol):
  """max |actual - truth| <= tol * max |truth|, maxima over all leaves; same tree and shapes."""
  actual, truth = jax.tree.map(np.asarray, actual), jax.tree.map(np.asarray, truth)
  assert jax.tree.structure(actual) == jax.tree.structure(truth)
  assert jax.tree.map(np.shape, actual) == jax.tree.map(np.shape, truth)
  pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(truth))
  error = max((float(np.max(np.abs(a - t))) for a, t in pairs), default=0.0)
  scale = max((float(np.max(np.abs(t))) for t in jax.tree.leaves(truth)), default=0.0)
  assert error <= tol * scale, (error / scale, tol)


def assert_outputs_close(actual, truth, tol):
  """assert_close for each entry of two `outputs` dicts (a gradient is compared as one vector)."""
  assert actual.keys() == truth.keys()
  for key in truth:
    assert_close(actual[key], truth[key], tol)


def n_params(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def normal(seed, shape, dtype=np.float32):
  """Standard normal numpy data (numpy, so that making test data compiles nothing)."""
  return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def normal_like(seed, tree):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), tree)


class ReferenceVGG(nn.Module):
  """VGG11 from flax's nn.Conv, nn.max_pool and nn.BatchNorm; parameter names as in models.VGG."""
  width: float
  batch_norm: bool

  @nn.compact
  def __call__(self, x, train=False):
    for layer in VGG11_SPEC:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), (2, 2))
        continue
      x = nn.Conv(max(1, round(layer * self.width)), (3, 3), padding=1)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         use_fast_variance=False)(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    hidden = max(1, round(512 * self.width))
    x = nn.relu(nn.Dense(hidden)(x))
    x = nn.relu(nn.Dense(hidden)(x))
    return nn.Dense(10)(x)


def cross_entropy(logits, y):
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def outputs(model, variables, x, y, v):
  """Eval logits; in train mode the logits, new batch stats, the loss's gradient and HVP along v."""
  def loss(params):
    logits, state = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
    return cross_entropy(logits, y), (logits, state)

  (grad, (train_logits, state)), (hvp, _) = jax.jvp(
      jax.grad(loss, has_aux=True), (variables["params"],), (v,))
  return {"eval": model.apply(variables, x, train=False), "train": train_logits, "state": state,
          "grad": grad, "hvp": hvp}


def init_vgg(model, batch, seed, dtype):
  """Input, labels, random numpy variables of `dtype` for `model`, and a tangent like the params.

  Kernels have std 1/sqrt(fan_in); biases, BatchNorm scales and running statistics are moved off
  their initial constants so that every parameter matters.
  """
  x = normal(seed, (batch, 32, 32, 3), dtype)
  shapes = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)}, x)
  noise = normal_like(seed + 1, shapes)

  def value(path, r):
    name = path[-1].key
    if name == "kernel":
      return r / np.sqrt(np.prod(r.shape[:-1]))
    return {"bias": 0.1 * r, "mean": 0.1 * r, "scale": 1 + 0.1 * r,
            "var": 1 + 0.1 * np.abs(r)}[name]

  variables = jax.tree_util.tree_map_with_path(lambda path, r: value(path, r).astype(dtype), noise)
  return x, np.arange(batch) % 10, variables, normal_like(seed + 2, variables["params"])


# ----------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("name, count, stats", [
    ("vgg11", 9_750_922, 0), ("vgg11_bn", 9_756_426, 5_504), ("mlp", 269_322, 0)])
def test_parameter_counts_at_full_width(name, count, stats):
  shape = (1, 28, 28, 1) if name == "mlp" else (1, 32, 32, 3)
  init = functools.partial(models.get_model(name).init, train=False)
  variables = jax.eval_shape(init, {"params": jax.random.PRNGKey(0)}, jnp.zeros(shape))
  assert n_params(variables["params"]) == count
  assert n_params(variables.get("batch_stats", {})) == stats


def test_width_scales_convolutions_and_classifier():
  variables = jax.eval_shape(models.get_model("vgg11", width=0.25).init,
                             {"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 3)))
  p = variables["params"]
  assert [p[f"Conv_{i}"]["kernel"].shape[-1] for i in range(8)] == [
      16, 32, 64, 64, 128, 128, 128, 128]
  assert p["Conv_0"]["kernel"].shape == (3, 3, 3, 16)
  assert [p[f"Dense_{i}"]["kernel"].shape for i in range(3)] == [(128, 128), (128, 128), (128, 10)]


# ----------------------------------------------------------------------------- initialization


def test_vgg_initialization_follows_pytorch_reference():
  params = jax.jit(models.get_model("vgg11").init)({"params": jax.random.PRNGKey(0)},
                                                   jnp.zeros((1, 32, 32, 3)))["params"]
  for i in range(2, 8):  # layers with >= 295k weights: std within 1% of sqrt(2 / (9 * C_out))
    kernel = np.asarray(params[f"Conv_{i}"]["kernel"])
    std = np.sqrt(2 / (9 * kernel.shape[-1]))
    assert abs(kernel.std() / std - 1) < 0.01 and abs(kernel.mean()) < 0.01 * std
    assert np.max(np.abs(kernel)) > 4 * std  # a normal, not a truncated normal
    assert not np.any(np.asarray(params[f"Conv_{i}"]["bias"]))
  for i in range(3):
    dense = params[f"Dense_{i}"]
    bound = 1 / np.sqrt(dense["kernel"].shape[0])
    for a in (np.asarray(dense["kernel"]), np.asarray(dense["bias"])):
      assert np.max(np.abs(a)) <= bound
      assert a.size < 100 or np.max(np.abs(a)) > 0.9 * bound
    assert abs(np.asarray(dense["kernel"]).std() / (bound / np.sqrt(3)) - 1) < 0.05


def test_mlp_initialization_and_forward_match_numpy():
  model = models.get_model("mlp")
  x = normal(0, (5, 28, 28, 1))
  params = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, x)["params"]
  layers = [params[f"Dense_{i}"] for i in range(3)]
  assert [d["kernel"].shape for d in layers] == [(784, 256), (256, 256), (256, 10)]
  for d in layers:
    bound = 1 / np.sqrt(d["kernel"].shape[0])
    assert np.max(np.abs(d["kernel"])) <= bound and np.max(np.abs(d["bias"])) <= bound
    assert np.max(np.abs(d["bias"])) > 0.5 * bound
  h = np.asarray(x, np.float64).reshape(5, -1)
  for i, d in enumerate(layers):
    h = h @ np.asarray(d["kernel"], np.float64) + np.asarray(d["bias"], np.float64)
    h = np.maximum(h, 0) if i < 2 else h
  assert_close(jax.jit(model.apply)({"params": params}, x), h.astype(np.float32), 1e-5)


# ----------------------------------------------------------------------------- get_model


def test_get_model_builds_the_named_models():
  assert isinstance(models.get_model("mlp", dropout=0.5), models.MLP)
  assert models.get_model("mlp", dropout=0.5).dropout == 0.5
  assert not models.get_model("vgg11").batch_norm
  assert models.get_model("vgg11_bn", width=0.5).batch_norm
  assert models.get_model("vgg11", batch_norm=True, conv="xla").conv == "xla"


@pytest.mark.parametrize("name, kwargs, message", [
    ("resnet18", {}, "known: mlp, vgg11, vgg11_bn"),
    ("mlp", {"width": 0.5}, "takes no argument width"),
    ("vgg11", {"dropout": 0.5}, "takes no argument dropout"),
    ("vgg11_bn", {"batch_norm": False}, "takes no argument batch_norm"),
    ("mlp", {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ("mlp", {"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ("mlp", {"hidden": 0}, "hidden must be >= 1"),
    ("vgg11", {"width": 0.0}, "width must be > 0"),
    ("vgg11", {"width": -1.0}, "width must be > 0"),
    ("vgg11", {"width": float("nan")}, "width must be > 0"),
    ("vgg11", {"conv": "fft"}, "unknown convolution 'fft'"),
])
def test_get_model_rejects_bad_arguments(name, kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.get_model(name, **kwargs)


# ----------------------------------------------------------------------------- convolution forms


CONV_SHAPES = [  # (batch, height, width, C_in, C_out, kernel size)
    (2, 5, 7, 3, 4, 3), (1, 8, 8, 16, 8, 3), (3, 4, 4, 2, 5, 1), (2, 6, 5, 3, 2, 5)]


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_im2col_matches_lax_conv_values_gradients_hvps(shape, dtype):
  n, h, w, c_in, c_out, k = shape
  with jax.enable_x64(dtype == np.float64):
    x, kernel = normal(0, (n, h, w, c_in), dtype), normal(1, (k, k, c_in, c_out), dtype)
    tx, tk = normal(2, x.shape, dtype), normal(3, kernel.shape, dtype)
    cot = normal(4, (n, h, w, c_out), dtype)
    truth = lambda x, kernel: jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    @jax.jit
    def derivatives(x, kernel, tx, tk, cot):
      out = {}
      forms = (("im2col", conv_lib.conv_im2col), ("xla", conv_lib.conv_xla), ("truth", truth))
      for name, f in forms:
        scalar = lambda x, kernel: jnp.sum(jnp.tanh(f(x, kernel)) * cot)  # curved: HVP is not 0
        grad = jax.grad(scalar, argnums=(0, 1))
        out[name] = {"value": f(x, kernel), "grad": grad(x, kernel),
                     "hvp": jax.jvp(grad, (x, kernel), (tx, tk))[1]}
      return out

    out = derivatives(x, kernel, tx, tk, cot)
    assert out["im2col"]["value"].dtype == dtype
    assert_outputs_close(out["im2col"], out["truth"], TOL[dtype])
    assert_outputs_close(out["xla"], out["truth"], TOL[dtype])


def test_even_kernel_is_rejected():
  with pytest.raises(ValueError, match="odd kernel size"):
    conv_lib.conv_im2col(jnp.zeros((1, 4, 4, 1)), jnp.zeros((2, 2, 1, 1)))


@pytest.mark.parametrize("impl", ["im2col", "xla"])
def test_conv_module_matches_flax_conv(impl):
  x = normal(0, (2, 6, 6, 3))
  module, truth = models.Conv(5, impl=impl), nn.Conv(5, (3, 3), padding="SAME")
  variables = jax.eval_shape(module.init, {"params": jax.random.PRNGKey(0)}, x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, jax.eval_shape(truth.init, {"params": jax.random.PRNGKey(0)}, x))
  variables = normal_like(1, variables)  # nonzero bias too
  assert_close(jax.jit(module.apply)(variables, x), jax.jit(truth.apply)(variables, x), 1e-5)


def test_auto_is_im2col_on_cpu_and_xla_elsewhere(monkeypatch):
  x = jnp.zeros((1, 32, 32, 3))
  model = models.get_model("vgg11", width=1 / 16)
  variables = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)}, x)

  def uses_xla_conv(model):
    return "conv_general_dilated" in str(jax.make_jaxpr(model.apply)(variables, x))

  assert jax.default_backend() == "cpu"
  assert not uses_xla_conv(model)
  assert uses_xla_conv(models.get_model("vgg11", width=1 / 16, conv="xla"))
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert conv_lib.resolve_impl("auto") == "xla"
  assert uses_xla_conv(model)


# ----------------------------------------------------------------------------- max-pooling


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 5, 2), (3, 2, 2, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool_matches_flax_values_gradients_hvps(shape, dtype):
  with jax.enable_x64(dtype == np.float64):
    x, t = normal(0, shape, dtype), normal(1, shape, dtype)  # continuous: no ties
    cot = normal(2, (shape[0], shape[1] // 2, shape[2] // 2, shape[3]), dtype)

    @jax.jit
    def derivatives(x, t, cot):
      out = {}
      for name, pool in (("mine", conv_lib.max_pool_2x2),
                         ("truth", lambda x: nn.max_pool(x, (2, 2), (2, 2)))):
        grad = jax.grad(lambda x: jnp.sum(jnp.sin(pool(x)) * cot))
        out[name] = {"value": pool(x), "grad": grad(x), "hvp": jax.jvp(grad, (x,), (t,))[1]}
      return out

    out = derivatives(x, t, cot)
    assert_outputs_close(out["mine"], out["truth"], TOL[dtype])


def test_max_pool_gives_a_tied_gradient_to_the_first_maximum():
  x = jnp.array([[1.0, 3.0], [3.0, 0.0]]).reshape(1, 2, 2, 1)
  grad = jax.grad(lambda x: conv_lib.max_pool_2x2(x).sum())(x)
  np.testing.assert_array_equal(np.asarray(grad).ravel(), [0, 1, 0, 0])


def test_max_pool_propagates_nan():
  x = jnp.array([[1.0, np.nan], [3.0, 0.0], [np.nan, 2.0], [1.0, 1.0]]).reshape(1, 4, 2, 1)
  assert np.isnan(np.asarray(conv_lib.max_pool_2x2(x))).all()


def test_max_pool_derivatives_have_no_division():
  # jnp.max's derivative divides by the count of entries equal to the maximum, which XLA can make
  # zero by recomputing the input with different rounding (NaN HVPs of BatchNorm VGGs).
  x, t = normal(0, (2, 4, 4, 3)), normal(1, (2, 4, 4, 3))
  grad = jax.grad(lambda x: jnp.sum(jnp.sin(conv_lib.max_pool_2x2(x))))
  jaxpr = jax.make_jaxpr(lambda x, t: jax.jvp(grad, (x,), (t,)))(x, t)
  primitives = {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert not primitives & {"div", "reduce_max", "select_and_scatter_add"}, primitives


def test_ties_after_relu_do_not_change_parameter_gradients():
  # Half the pre-activations are negative, so many 2x2 windows are all zeros after the ReLU.
  x = normal(0, (4, 8, 8, 3))
  kernel, t = normal(1, (3, 3, 3, 6)), normal(2, (3, 3, 3, 6))
  cot = normal(3, (4, 4, 4, 6))

  @jax.jit
  def derivatives(x, kernel, t, cot):
    relu = lambda k: jax.nn.relu(conv_lib.conv_xla(x, k) - 1.0)
    out = {"relu": relu(kernel)}
    for name, pool in (("mine", conv_lib.max_pool_2x2),
                       ("truth", lambda x: nn.max_pool(x, (2, 2), (2, 2)))):
      grad = jax.grad(lambda k: jnp.sum(jnp.sin(pool(relu(k))) * cot))
      out[name] = {"grad": grad(kernel), "hvp": jax.jvp(grad, (kernel,), (t,))[1]}
    return out

  out = derivatives(x, kernel, t, cot)
  windows = np.asarray(out["relu"]).reshape(4, 4, 2, 4, 2, 6)
  assert np.sum(np.all(windows == 0, axis=(2, 4))) > 10  # tied windows are present
  assert_outputs_close(out["mine"], out["truth"], 1e-5)


# ----------------------------------------------------------------------------- the whole VGG


def pytorch_running_var(flax_new, old, n):
  """The running variance after PyTorch's update, from flax's (which uses the biased variance)."""
  return 0.9 * old + (flax_new - 0.9 * old) * n / (n - 1)


@pytest.mark.parametrize("batch_norm, dtype, width, batch, impls, seeds", [
    (False, np.float32, 1 / 16, 3, ("im2col", "xla"), 2),
    (True, np.float32, 1 / 8, 2, ("im2col",), 2),
    (True, np.float64, 1 / 16, 4, ("im2col",), None),
])
def test_vgg_matches_flax_reference(batch_norm, dtype, width, batch, impls, seeds):
  """Eval and train logits, batch statistics, gradient and HVP, under jit; with `seeds`, the model's
  outputs are computed by one program vmapped over a leading seed axis of the variables."""
  with jax.enable_x64(dtype == np.float64):
    truth_model = ReferenceVGG(width, batch_norm)
    x, y, _, _ = init_vgg(truth_model, batch, 0, dtype)
    per_seed = [init_vgg(truth_model, batch, s, dtype)[2:] for s in range(seeds or 1)]
    truth_fn = jax.jit(functools.partial(outputs, truth_model))
    truths = [truth_fn(variables, x, y, v) for variables, v in per_seed]
    if batch_norm:
      for truth, (variables, _) in zip(truths, per_seed):
        old, new = variables["batch_stats"], truth["state"]["batch_stats"]
        for i, size in enumerate((32, 16, 8, 8, 4, 4, 2, 2)):
          name = f"BatchNorm_{i}"
          new[name]["var"] = pytorch_running_var(new[name]["var"], old[name]["var"],
                                                 batch * size**2)
        pairs = zip(jax.tree.leaves(new), jax.tree.leaves(old))
        assert min(np.max(np.abs(a - b)) for a, b in pairs) > 0
    for impl in impls:
      model = models.VGG(width=width, batch_norm=batch_norm, conv=impl)
      assert jax.tree.map(jnp.shape, jax.eval_shape(model.init, jax.random.PRNGKey(0), x)) == \
          jax.tree.map(jnp.shape, per_seed[0][0])
      fn = functools.partial(outputs, model)
      if seeds:
        stacked = jax.tree.map(lambda *a: np.stack(a), *per_seed)
        out = jax.jit(jax.vmap(fn, in_axes=(0, None, None, 0)))(stacked[0], x, y, stacked[1])
        mine = [jax.tree.map(lambda a: a[s], out) for s in range(seeds)]
      else:
        mine = [jax.jit(fn)(per_seed[0][0], x, y, per_seed[0][1])]
      for m, truth in zip(mine, truths):
        assert m["eval"].dtype == dtype
        assert_outputs_close(m, truth, TOL[dtype])


def test_batchnorm_follows_pytorch_conventions():
  """First block by hand: batch statistics, running update (momentum 0.1, unbiased), eps 1e-5."""
  model = models.get_model("vgg11_bn", width=1 / 16)
  x, _, variables, _ = init_vgg(model, 4, 0, np.float32)
  p, stats = variables["params"], variables["batch_stats"]["BatchNorm_0"]
  z = np.asarray(jax.jit(conv_lib.conv_xla)(x, p["Conv_0"]["kernel"]), np.float64)
  z = z + p["Conv_0"]["bias"]
  mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
  scale, bias = (np.asarray(p["BatchNorm_0"][k], np.float64) for k in ("scale", "bias"))
  apply = functools.partial(model.apply, mutable=["batch_stats", "intermediates"],
                            capture_intermediates=True)
  train, evaluate = jax.jit(lambda *a: (apply(*a, train=True), apply(*a, train=False)))(
      variables, x)
  new = train[1]["batch_stats"]["BatchNorm_0"]
  assert_close(new["mean"], (0.9 * np.asarray(stats["mean"]) + 0.1 * mean).astype(np.float32), 1e-5)
  unbiased = z.var(axis=(0, 1, 2), ddof=1)
  assert_close(new["var"], (0.9 * np.asarray(stats["var"]) + 0.1 * unbiased).astype(np.float32),
               1e-5)
  for out, (m, v) in ((train, (mean, var)), (evaluate, (stats["mean"], stats["var"]))):
    bn_out = out[1]["intermediates"]["BatchNorm_0"]["__call__"][0]
    m, v = np.asarray(m, np.float64), np.asarray(v, np.float64)
    expected = (z - m) / np.sqrt(v + 1e-5) * scale + bias
    assert_close(bn_out, expected.astype(np.float32), 1e-5)


# ----------------------------------------------------------------------------- MLP and dropout


def test_dropout_only_in_train_mode_with_the_dropout_rng():
  model = models.get_model("mlp", dropout=0.5, hidden=32)
  x = normal(0, (8, 28, 28, 1))
  variables = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, x)
  eval_out = jax.jit(model.apply)(variables, x)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(functools.partial(model.apply, train=True), variables, x)
  train = jax.jit(lambda k: model.apply(variables, x, train=True,
                                        rngs={"dropout": jax.random.PRNGKey(k)}))
  a, b, c = train(1), train(1), train(2)
  np.testing.assert_array_equal(a, b)
  assert np.max(np.abs(a - c)) > 0 and np.max(np.abs(a - eval_out)) > 0
  no_dropout = models.get_model("mlp", dropout=0.0, hidden=32)
  no_dropout_train = jax.jit(functools.partial(no_dropout.apply, train=True))
  assert_close(no_dropout_train(variables, x), eval_out, 1e-6)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.7])
def test_dropout_zeroes_a_fraction_p_and_rescales_the_rest(rate):
  class Drop(nn.Module):
    rate: float

    @nn.compact
    def __call__(self, x):
      return models.dropout(self, x, self.rate, train=True)

  out = np.asarray(jax.jit(functools.partial(Drop(rate).apply, {}))(
      jnp.ones(100_000), rngs={"dropout": jax.random.PRNGKey(0)}))
  dropped = np.mean(out == 0)
  assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / out.size)
  np.testing.assert_allclose(out[out != 0], 1 / (1 - rate), rtol=1e-6)


def test_dropout_rate_can_be_traced_and_vmapped():
  x = normal(0, (4, 28, 28, 1))
  variables = jax.jit(models.get_model("mlp", hidden=16).init)({"params": jax.random.PRNGKey(0)}, x)
  key = jax.random.PRNGKey(3)

  def apply(rate):
    model = models.MLP(hidden=16, dropout=rate)
    return model.apply(variables, x, train=True, rngs={"dropout": key})

  traced = jax.jit(jax.vmap(apply))(np.array([0.0, 0.3, 0.6], np.float32))
  for i, rate in enumerate([0.0, 0.3, 0.6]):  # a Python float in the module: not traced
    assert_close(traced[i], jax.jit(lambda: apply(rate))(), 1e-6)


def test_float64_parameters_give_a_float64_network():
  with jax.enable_x64(True):
    vgg = models.get_model("vgg11_bn", width=1 / 16, param_dtype=jnp.float64)
    mlp = models.get_model("mlp", hidden=8, param_dtype=jnp.float64)
    for model, shape in ((vgg, (2, 32, 32, 3)), (mlp, (2, 28, 28, 1))):
      x = normal(0, shape, jnp.float64)
      variables = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)}, x)
      assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float64)}
      for train in (False, True):
        out = jax.eval_shape(functools.partial(model.apply, train=train, mutable=["batch_stats"]),
                             variables, x)
        assert {a.dtype for a in jax.tree.leaves(out)} == {jnp.dtype(jnp.float64)}
