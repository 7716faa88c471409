"""The training loss and exact means over a dataset evaluated in fixed-size chunks."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Mean softmax cross-entropy with integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def chunked_mean(fn: Callable[[Array, Array, Array], object], x: Array, y: Array,
                 chunk_size: int):
  """Example-weighted mean of ``fn(x_chunk, y_chunk, chunk_index)`` over fixed-size chunks.

  ``fn`` returns a pytree of means over its chunk; full chunks run in a ``lax.scan`` and a last
  partial chunk of ``N % chunk_size`` examples is weighted by its size, so the result is the mean
  over all N examples.
  """
  n = x.shape[0]
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  chunk_size = min(chunk_size, n)
  num_full, rest = divmod(n, chunk_size)
  split = num_full * chunk_size
  xs = x[:split].reshape(num_full, chunk_size, *x.shape[1:])
  ys = y[:split].reshape(num_full, chunk_size, *y.shape[1:])

  def body(total, chunk):
    i, xc, yc = chunk
    return jax.tree.map(jnp.add, total, fn(xc, yc, i)), None

  index = jnp.arange(num_full)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       jax.eval_shape(fn, xs[0], ys[0], index[0]))
  total, _ = jax.lax.scan(body, zeros, (index, xs, ys))
  total = jax.tree.map(lambda t: t * chunk_size, total)
  if rest:
    last = fn(x[split:], y[split:], jnp.asarray(num_full))
    total = jax.tree.map(lambda t, l: t + rest * l, total, last)
  return jax.tree.map(lambda t: t / n, total)
