"""VGG11 on the CPU: flatjax (im2col and XLA convolutions) against PyTorch, side by side in one run.

For each width it times, on the same weights and data (float32): the loss (forward), the gradient,
a Hessian-vector product (flatjax forward-over-reverse, PyTorch double backprop), all on one batch,
and one epoch of plain SGD over 1000 examples in batches of 100 (flatjax: one jitted lax.scan;
PyTorch: a loop of optimizer steps). Calls are interleaved round-robin across the implementations;
each time is the median (and the minimum) of repeated calls after a first, compiling one. With
--profile it also prints where flatjax's gradient and HVP spend their time, by XLA operation
(jax.profiler).

  python benchmarks/conv_speed.py [--widths=1,0.25] [--impls=im2col,xla] [--profile]
"""

import argparse
import collections
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

from flatjax.models import get_model
from torch_reference import layer_arrays, torch_network

CIFAR = "/work/shared/data/cifar10/cifar10.npz"
TASKS = ("forward", "gradient", "hvp", "epoch")
POOL_AFTER = (0, 1, 3, 5, 7)  # VGG11's convolutions followed by a 2x2 max-pool


def load_data(n, path=CIFAR):
  """n CIFAR-10 training examples (every 50th), standardized per feature; else random data."""
  if os.path.exists(path):
    with np.load(path) as d:
      x, y, source = d["x_train"][::50][:n] / np.float32(255), d["y_train"][::50][:n], "CIFAR-10"
  else:
    rng = np.random.default_rng(0)
    x, y, source = rng.random((n, 32, 32, 3), np.float32), rng.integers(0, 10, n), "random"
  x = (x - x.mean(0)) / (x.std(0) + 1e-8)
  return x.astype(np.float32), y.astype(np.int64), source


def jax_tasks(impl, width, params, x, y, v, batch, lr):
  """name -> zero-argument function for each task, flatjax with convolution `impl`."""
  model = get_model("vgg11", width=width, conv=impl)

  def loss(p, xb, yb):
    logits = model.apply({"params": p}, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def epoch(p, xs, ys):
    def step(p, b):
      g = jax.grad(loss)(p, *b)
      return jax.tree.map(lambda w, d: w - lr * d, p, g), None
    return jax.lax.scan(step, p, (xs, ys))[0]

  xb, yb = jnp.asarray(x[:batch]), jnp.asarray(y[:batch])
  xs, ys = jnp.asarray(x).reshape(-1, 100, *x.shape[1:]), jnp.asarray(y).reshape(-1, 100)
  fwd, grad, epoch = jax.jit(loss), jax.jit(jax.grad(loss)), jax.jit(epoch)
  hvp = jax.jit(lambda p, t: jax.jvp(lambda q: jax.grad(loss)(q, xb, yb), (p,), (t,))[1])
  return {"forward": lambda: fwd(params, xb, yb), "gradient": lambda: grad(params, xb, yb),
          "hvp": lambda: hvp(params, v), "epoch": lambda: epoch(params, xs, ys)}


def torch_tasks(net, x, y, v, batch, lr):
  """name -> zero-argument function for each task, PyTorch."""
  ps = list(net.parameters())
  xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)
  xb, yb = xt[:batch], yt[:batch]
  vt = [torch.from_numpy(a) for a in v]
  lossf = torch.nn.functional.cross_entropy
  start = [p.detach().clone() for p in ps]

  def forward():
    with torch.no_grad():
      return lossf(net(xb), yb)

  def gradient():
    return torch.autograd.grad(lossf(net(xb), yb), ps)

  def hvp():
    g = torch.autograd.grad(lossf(net(xb), yb), ps, create_graph=True)
    return torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, vt)), ps)

  def epoch():
    opt = torch.optim.SGD(ps, lr=lr)
    for i in range(0, len(xt), 100):
      opt.zero_grad()
      lossf(net(xt[i:i + 100]), yt[i:i + 100]).backward()
      opt.step()
    with torch.no_grad():
      for p, s in zip(ps, start):
        p.copy_(s)

  return {"forward": forward, "gradient": gradient, "hvp": hvp, "epoch": epoch}


def time_round_robin(fns, repeats, budget_s):
  """name -> seconds of each timed call of fns[name](), interleaved, after one untimed call each;
  an implementation stops repeating once its timed calls exceed budget_s."""
  for f in fns.values():
    jax.block_until_ready(f())
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      if times[k] and sum(times[k]) > budget_s:
        continue
      start = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - start)
  return times


def op_profile(fn, calls=2, top=6):
  """The `top` XLA operation kinds by share of the summed op time of `calls` calls of fn."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        jax.block_until_ready(fn())
    path = next(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
                if f.endswith(".xplane.pb"))
    data = jax.profiler.ProfileData.from_file(path)
  ns = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if line.name != "python" and "Executor" not in event.name and "Await" not in event.name:
          ns[event.name.rsplit(".", 1)[0]] += event.duration_ns
  total = sum(ns.values())
  return ", ".join(f"{k} {100 * t / total:.0f}%" for k, t in ns.most_common(top))


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--widths", default="1,0.25")
  ap.add_argument("--impls", default="im2col,xla")
  ap.add_argument("--tasks", default=",".join(TASKS))
  ap.add_argument("--batch", type=int, default=128, help="examples for forward, gradient and HVP")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--budget_s", type=float, default=30.0,
                  help="stop repeating an implementation's task after this many timed seconds")
  ap.add_argument("--skip", default="xla@1:epoch",
                  help="IMPL@WIDTH:TASK,... not to run (default: the XLA convolution's full-width "
                       "epoch, where lax.scan makes it take many minutes)")
  ap.add_argument("--profile", action="store_true")
  args = ap.parse_args()

  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  x, y, source = load_data(1000)
  impls, tasks, skip = args.impls.split(","), args.tasks.split(","), set(args.skip.split(","))
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} with "
        f"{threads} threads, {source} data, float32; forward/gradient/HVP on {args.batch} "
        "examples, epoch = 1000 examples in batches of 100, plain SGD", flush=True)
  header = ["width", "task", "PyTorch s"] + [f"flatjax {i} s" for i in impls] + [
      f"{i} / PyTorch (medians)" for i in impls]
  rows, profiles = [], []
  for width in map(float, args.widths.split(",")):
    model = get_model("vgg11", width=width)
    params = jax.jit(model.init)({"params": jax.random.PRNGKey(0)}, jnp.asarray(x[:2]))["params"]
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.PRNGKey(1), a.shape), params)
    fns = {i: jax_tasks(i, width, params, x, y, v, args.batch, 0.01) for i in impls}
    fns["torch"] = torch_tasks(torch_network(params), x, y, layer_arrays(v), args.batch, 0.01)
    gap = abs(float(fns[impls[0]]["forward"]()) - float(fns["torch"]["forward"]()))
    print(f"width {width:g}: |loss flatjax - loss PyTorch| = {gap:.1e} on the same weights",
          flush=True)
    for task in tasks:
      run = [k for k in ["torch", *impls] if f"{k}@{width:g}:{task}" not in skip]
      res = time_round_robin({k: fns[k][task] for k in run}, args.repeats, args.budget_s)
      med = {k: np.median(t) for k, t in res.items()}
      cell = lambda k: f"{med[k]:.3f} ({min(res[k]):.3f})" if k in res else "skipped"
      ratio = lambda k: f"{med[k] / med['torch']:.2f}" if k in res else "-"
      rows.append([f"{width:g}", task, cell("torch")] + [cell(i) for i in impls]
                  + [ratio(i) for i in impls])
      print("  " + " | ".join(rows[-1]) + "   calls: " + str({k: len(t) for k, t in res.items()}),
            flush=True)
    if args.profile:
      for impl in impls:
        for task in ("gradient", "hvp"):
          profiles.append(f"width {width:g}, {impl}, {task}: {op_profile(fns[impl][task])}")
          print("  " + profiles[-1], flush=True)
  print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(row) + " |")
  for line in profiles:
    print(f"- {line}")


if __name__ == "__main__":
  main()
