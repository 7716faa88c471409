"""Stride-1 'SAME' convolutions and 2x2 max-pooling, with a fast form for the CPU.

XLA's own convolution is fast on GPUs and TPUs but slow on the CPU, for gradients, more so for
forward-over-reverse Hessian-vector products and most inside `lax.scan`. On the CPU the models use
im2col instead: the k*k shifted views of the zero-padded input are concatenated along the channels
and contracted with the kernel in one matrix multiplication. Both compute the same function
(benchmarks/README.md has the measurements).
"""

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "im2col")


def resolve_impl(impl: str) -> str:
  """The convolution form to use: `impl`, or for "auto" "im2col" on the CPU and "xla" elsewhere."""
  if impl not in IMPLS:
    raise ValueError(f"unknown convolution {impl!r}; known: {', '.join(IMPLS)}")
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return impl


def _same_padding(kernel: jax.Array) -> tuple[int, int]:
  kh, kw = kernel.shape[:2]
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"'SAME' stride-1 convolution needs an odd kernel size, got {kh}x{kw}")
  return kh // 2, kw // 2


def conv_xla(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """NHWC input, HWIO kernel, stride 1, zero 'SAME' padding: XLA's convolution."""
  ph, pw = _same_padding(kernel)
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((ph, ph), (pw, pw)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """The same function as `conv_xla`, as one matmul of the concatenated shifted views."""
  ph, pw = _same_padding(kernel)
  kh, kw, c_in, c_out = kernel.shape
  h, w = x.shape[-3:-1]
  pad = [(0, 0)] * (x.ndim - 3) + [(ph, ph), (pw, pw), (0, 0)]
  xp = jnp.pad(x, pad)
  cols = jnp.concatenate(
      [xp[..., i:i + h, j:j + w, :] for i in range(kh) for j in range(kw)], axis=-1)
  return cols @ kernel.reshape(kh * kw * c_in, c_out)


def conv(x: jax.Array, kernel: jax.Array, impl: str = "auto") -> jax.Array:
  """Stride-1 'SAME' convolution of NHWC `x` with HWIO `kernel` in the form `impl` (see IMPLS)."""
  return {"xla": conv_xla, "im2col": conv_im2col}[resolve_impl(impl)](x, kernel)


def _larger(a: jax.Array, b: jax.Array) -> jax.Array:
  """Elementwise max as a select (a on ties, NaN from either side), so derivatives follow it."""
  return jnp.where((a >= b) | jnp.isnan(a), a, b)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 of NHWC `x` ('VALID': an odd last row or column is dropped).

  The same values as `flax.linen.max_pool(x, (2, 2), (2, 2))`, written as two elementwise selects
  so that the derivatives are selects too (no select_and_scatter). Each window's gradient goes to
  its first maximal entry in row-major order, as in XLA's and PyTorch's pooling.

  A `jnp.max` over the window would not do: its derivative divides by the number of entries equal
  to the maximum, and when XLA recomputes the input inside a fusion with different rounding that
  number can be zero, which made jitted HVPs of BatchNorm networks NaN.
  """
  h, w, c = x.shape[-3:]
  x = x[..., :h - h % 2, :w - w % 2, :]
  x = x.reshape(*x.shape[:-3], h // 2, 2, w // 2, 2, c)
  row_max = _larger(x[..., 0, :], x[..., 1, :])  # within each row of a window
  return _larger(row_max[..., 0, :, :], row_max[..., 1, :, :])
