"""lambda_max on the paper's networks: flatjax against scipy and the reference's PyTorch method.

On the 1000-example strided train subset of the real data, with weights after a short stretch of
SGD, it prints side by side in one run:
- the time of one HVP over the subset against one gradient over it (flatjax, compiled);
- HVPs, wall time (first call, compilation included, and a second, compiled call), lambda_max and
  its relative error for: flatjax Lanczos, flatjax power iteration, scipy `eigsh` fed by flatjax's
  jitted HVP, and the reference's method (PyTorch double-backprop HVPs + `eigsh(k=6, "LM")` run to
  convergence), on identical weights and data.
The accuracy reference is flatjax Lanczos in float64 with a tight tolerance.

  python benchmarks/hessian_speed.py [--models=mlp,vgg11] [--vgg_width=1] [--data_dir=DIR]
      [--methods=lanczos,power,scipy] [--no-second_call] [--truth=float64|reference]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg as sla
import torch
from jax.flatten_util import ravel_pytree

from flatjax import data as data_lib
from flatjax import hessian
from flatjax import train as train_lib
from flatjax.models import get_model
from torch_reference import reference_lambda_max, torch_network

SETUPS = {  # model -> (dataset, get_model kwargs, SGD learning rate for the warm-up epochs)
    "mlp": ("fashion_mnist", {}, 0.1),
    "vgg11": ("cifar10", {}, 0.05),
}


def median_time(fn, repeats):
  """Median wall time of fn() after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def warm_weights(model, x, y, lr, epochs):
  """Variables after a few epochs of SGD on the subset (a Hessian more like a trained network's)."""
  subset = data_lib.Dataset(x, y, x[:10], y[:10])
  result = train_lib.train(model, subset, batch_size=100, lrs=[lr], seeds=[0], max_epochs=epochs,
                           target_acc=1.0, progress=False)
  return result.member_variables(0)


def scipy_eigsh(hvp, params, tol):
  """ARPACK's largest algebraic eigenvalue fed by a jitted HVP: (value, HVPs, wall seconds)."""
  flat, unravel = ravel_pytree(params)
  count = [0]

  def matvec(v):
    count[0] += 1
    return np.asarray(ravel_pytree(hvp(params, unravel(jnp.asarray(v, flat.dtype))))[0])

  op = sla.LinearOperator((flat.size, flat.size), matvec=matvec, dtype=np.float32)
  start = time.perf_counter()
  value = sla.eigsh(op, k=1, which="LA", tol=tol, return_eigenvectors=False)[0]
  return float(value), count[0], time.perf_counter() - start


def benchmark(name, args):
  dataset, kwargs, lr = SETUPS[name]
  if name == "vgg11":
    kwargs = {**kwargs, "width": args.vgg_width}
  model = get_model(name, **kwargs)
  full = data_lib.load(dataset, args.data_dir)
  x, y = data_lib.strided_subset(full.x_train, full.y_train, 1000)
  x, y = jnp.asarray(x), jnp.asarray(y)
  variables = warm_weights(model, x, y, lr, args.warmup_epochs)
  params = variables["params"]
  chunk = args.chunk
  n_params = ravel_pytree(params)[0].size
  print(f"\n## {name} ({dataset}, {n_params:,} parameters, width {kwargs.get('width', 1)}), "
        f"1000-example strided subset, chunks of {chunk}")

  chunk_loss = hessian.model_loss(model, variables)
  grad = jax.jit(jax.grad(lambda p: hessian.dataset_loss(chunk_loss, p, x, y, chunk)))
  hvp = jax.jit(lambda p, v: hessian.dataset_hvp(chunk_loss, p, v, x, y, chunk))
  t_grad = median_time(lambda: grad(params), args.repeats)
  t_hvp = median_time(lambda: hvp(params, params), args.repeats)
  print(f"gradient {t_grad * 1e3:.1f} ms, HVP {t_hvp * 1e3:.1f} ms, HVP/gradient "
        f"{t_hvp / t_grad:.2f} (target <= 2.5)")

  methods = args.methods.split(",")
  second = (lambda solve: timed(solve)[1]) if args.second_call else (lambda solve: float("nan"))
  rows = []
  for method in ("lanczos", "power"):
    if method in methods:
      solve = lambda: hessian.lambda_max(model, variables, x, y, batch_size=chunk,
                                         subset_size=None, method=method, tol=args.tol)
      first, t_first = timed(solve)
      rows.append((f"flatjax {method}", int(first.num_hvps), t_first, second(solve),
                   float(first.eigenvalue)))

  if "scipy" in methods:
    fresh_hvp = jax.jit(lambda p, v: hessian.dataset_hvp(chunk_loss, p, v, x, y, chunk))
    value, hvps, t_first = scipy_eigsh(fresh_hvp, params, args.tol)
    rows.append(("scipy eigsh(k=1, LA) + flatjax HVP", hvps, t_first,
                 second(lambda: scipy_eigsh(fresh_hvp, params, args.tol)), value))

  torch.set_num_threads(args.threads)
  net = torch_network(params)
  ref_value, hvps, t_ref = reference_lambda_max(net, np.asarray(x), np.asarray(y), chunk)
  rows.append(("reference: torch + eigsh(k=6, LM)", hvps, t_ref, t_ref, ref_value))

  if args.truth == "float64":
    with jax.enable_x64(True):
      v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
      truth = float(hessian.lambda_max(model, v64, jnp.asarray(x, jnp.float64), y,
                                       batch_size=chunk, subset_size=None, tol=1e-9,
                                       num_iters=200).eigenvalue)
    print(f"lambda_max truth (flatjax Lanczos, float64, tol 1e-9): {truth:.6f}")
  else:
    truth = ref_value
    print(f"lambda_max truth (the reference's ARPACK run to convergence): {truth:.6f}")
  print("| method | HVPs | wall s (first call) | wall s (compiled) | lambda_max | rel. error "
        "| first / reference | compiled / reference |")
  print("|---|---|---|---|---|---|---|---|")
  for label, hvps, t1, t2, value in rows:
    print(f"| {label} | {hvps} | {t1:.2f} | {t2:.2f} | {value:.6f} | {abs(value - truth) / truth:.1e} "
          f"| {t1 / t_ref:.3f} | {t2 / t_ref:.3f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="mlp,vgg11")
  parser.add_argument("--vgg_width", type=float, default=1.0)
  parser.add_argument("--data_dir", default=os.environ.get("FLATJAX_DATA_DIR"))
  parser.add_argument("--chunk", type=int, default=1000, help="HVP chunk (training batch size)")
  parser.add_argument("--tol", type=float, default=1e-4,
                      help="relative residual tolerance of flatjax and of scipy fed by flatjax")
  parser.add_argument("--warmup_epochs", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--methods", default="lanczos,power,scipy",
                      help="flatjax methods to time against the reference")
  parser.add_argument("--second_call", action=argparse.BooleanOptionalAction, default=True,
                      help="also time a second, compiled call of each flatjax method")
  parser.add_argument("--truth", choices=("float64", "reference"), default="float64",
                      help="accuracy reference: flatjax Lanczos in float64, or the reference's value")
  args = parser.parse_args()
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({args.threads} threads)")
  for name in args.models.split(","):
    benchmark(name, args)


if __name__ == "__main__":
  main()
