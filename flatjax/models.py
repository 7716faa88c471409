"""The paper's networks as Flax linen modules: VGG11 (config A, CIFAR form) and the dropout MLP.

Both take NHWC inputs and return logits, with `train` as a call argument:

  variables = model.init({"params": key}, x, train=False)
  logits = model.apply(variables, x, train=False)                        # eval mode
  logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                rngs={"dropout": key})                   # train mode

Initializations follow PyTorch's reference: Dense kernels and biases uniform in +-1/sqrt(fan_in);
VGG convolution kernels normal with std sqrt(2 / (k*k*C_out)) and zero biases. Parameters are
float32 by default (`param_dtype`); the computation follows the dtype of the parameters and inputs,
so casting the variables to float64 (with jax x64 enabled) gives a float64 network.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flatjax import conv as conv_lib

VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def torch_uniform(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default Linear initializer: uniform in +-1/sqrt(fan_in), for kernels and biases."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_dense(features: int, fan_in: int, param_dtype: Any) -> nn.Dense:
  """nn.Dense with PyTorch's default initialization for a layer with `fan_in` inputs."""
  return nn.Dense(features, kernel_init=torch_uniform(fan_in), bias_init=torch_uniform(fan_in),
                  param_dtype=param_dtype)


def dropout(module: nn.Module, x: jax.Array, rate, train: bool) -> jax.Array:
  """Inverted dropout of `x` at `rate` (a float or a traced scalar) in train mode, else identity.

  Draws from `module`'s 'dropout' rng only when train is True and the rate is not a concrete 0.
  """
  if not train or (not isinstance(rate, jax.core.Tracer) and rate == 0):
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Conv(nn.Module):
  """Stride-1 'SAME' convolution with bias, with the parameters of nn.Conv(..., padding='SAME').

  `impl` picks the form of the convolution (see flatjax.conv.IMPLS), resolved when traced.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  impl: str = "auto"
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      2.0, "fan_out", "normal")
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
    return conv_lib.conv(x, kernel, self.impl) + bias


class BatchNorm(nn.Module):
  """Batch normalization over all axes but the last, with PyTorch's BatchNorm2d conventions.

  Train mode normalizes with the batch's mean and biased variance and moves the running statistics
  by `momentum` towards the batch's mean and unbiased variance; eval mode uses the running ones.
  Variables: params `scale`, `bias`; batch_stats `mean`, `var` (all of `param_dtype` when created).
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    features = (x.shape[-1],)
    scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, self.param_dtype)
    running_var = self.variable("batch_stats", "var", jnp.ones, features, self.param_dtype)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      if not self.is_initializing():
        n = x.size // x.shape[-1]
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
    else:
      mean, var = running_mean.value, running_var.value
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias


def scaled_width(n: int, width: float) -> int:
  """round(n * width), at least 1."""
  return max(1, round(n * width))


def _check_width(width):
  if not width > 0:
    raise ValueError(f"width must be > 0, got {width}")


class VGG(nn.Module):
  """VGG11 (config A, CIFAR form): eight 3x3 conv-ReLU blocks and 2x2 max-pools, Dense 512-512-10.

  Attributes:
    num_classes: number of logits.
    width: multiplier of every convolution's channels and of the classifier's hidden width
      (each rounded, at least 1); 1.0 is the paper's network, e.g. 0.25 gives convolutions
      16-32-64-64-128-128-128-128 and a 128-128 classifier.
    batch_norm: Conv -> BatchNorm -> ReLU in every conv block (none in the classifier); batch
      statistics in train mode, running ones in eval mode (PyTorch's momentum 0.1, eps 1e-5 and
      unbiased running variance; see `BatchNorm`).
    conv: form of the convolutions, "auto" (im2col on the CPU, XLA's elsewhere), "xla" or "im2col".
    param_dtype: dtype of the parameters and batch statistics.
  """
  num_classes: int = 10
  width: float = 1.0
  batch_norm: bool = False
  conv: str = "auto"
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_width(self.width)
    conv_lib.resolve_impl(self.conv)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for layer in VGG11_LAYERS:
      if layer == "M":
        x = conv_lib.max_pool_2x2(x)
        continue
      x = Conv(scaled_width(layer, self.width), impl=self.conv, param_dtype=self.param_dtype)(x)
      if self.batch_norm:
        x = BatchNorm(param_dtype=self.param_dtype)(x, train)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    hidden = scaled_width(512, self.width)
    for features in (hidden, hidden):
      x = nn.relu(torch_dense(features, x.shape[-1], self.param_dtype)(x))
    return torch_dense(self.num_classes, x.shape[-1], self.param_dtype)(x)


class MLP(nn.Module):
  """Flatten, Dense(hidden), ReLU, Dropout, Dense(hidden), ReLU, Dropout, Dense(num_classes).

  Attributes:
    num_classes: number of logits.
    hidden: width of the two hidden layers (256 in the paper).
    dropout: dropout probability in [0, 1), active in train mode only; may be a traced scalar.
    param_dtype: dtype of the parameters.
  """
  num_classes: int = 10
  hidden: int = 256
  dropout: Any = 0.0
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if not isinstance(self.dropout, jax.core.Tracer) and not 0 <= self.dropout < 1:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    if self.hidden < 1:
      raise ValueError(f"hidden must be >= 1, got {self.hidden}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for _ in range(2):
      x = nn.relu(torch_dense(self.hidden, x.shape[-1], self.param_dtype)(x))
      x = dropout(self, x, self.dropout, train)
    return torch_dense(self.num_classes, x.shape[-1], self.param_dtype)(x)


MODELS = {"mlp": (MLP, {}), "vgg11": (VGG, {}), "vgg11_bn": (VGG, {"batch_norm": True})}


def get_model(name: str, **kwargs) -> nn.Module:
  """The model `name` ("mlp", "vgg11", or "vgg11_bn" for VGG11 with BatchNorm) built with `kwargs`.

  Raises ValueError for an unknown name, an unknown or fixed keyword, or an invalid value.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
  cls, fixed = MODELS[name]
  allowed = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"} - set(fixed)
  unknown = set(kwargs) - allowed
  if unknown:
    raise ValueError(f"model {name!r} takes no argument {', '.join(sorted(unknown))}; "
                     f"it takes {', '.join(sorted(allowed))}")
  return cls(**fixed, **kwargs)
