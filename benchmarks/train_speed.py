"""Training throughput on the CPU: flatjax's epoch program against a PyTorch loop, side by side.

For each setup (model, width, dataset subset, batch size) it times one training epoch of plain SGD
followed by the eval-mode pass over the training set that decides the stop rule, in examples
(trained members x training examples) per second:
- flatjax: the compiled, member-vmapped epoch program that `flatjax.train.train` runs, for one
  member, and for S members in one call;
- PyTorch: the same network and weights (a copy), a loop of optimizer steps over a shuffled
  permutation, then a no-grad eval pass; S members are S such runs one after the other.
Calls are interleaved round-robin after one untimed (compiling) call each; times are medians.

  python benchmarks/train_speed.py [--setups=mlp,vgg11@0.25,vgg11@1] [--members=4]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from flatjax import data as data_lib
from flatjax import train as train_lib
from flatjax.models import get_model
from torch_reference import nchw, torch_network

SETUPS = {  # name -> (model, dataset, width, training examples, batch size, SGD lr)
    "mlp": ("mlp", "fashion_mnist", None, 10000, 100, 0.1),
    "vgg11@0.25": ("vgg11", "cifar10", 0.25, 1000, 100, 0.05),
    "vgg11@1": ("vgg11", "cifar10", 1.0, 1000, 100, 0.05),
}


def flatjax_epoch(model, x, y, batch_size, lr, members):
  """(zero-argument function running one epoch and its eval of `members` vmapped members, their
  initial params with a leading member axis)."""
  config = train_lib.TrainConfig(batch_size=batch_size, max_epochs=10, target_acc=1.0)
  programs = train_lib.compile_programs(model, train_lib.SGD, config)
  seeds = np.arange(members, dtype=np.int32)
  hparams = {"lr": np.full(members, lr, np.float32)}
  state = programs.init(seeds, hparams, x, y)
  return (lambda: programs.epoch(state, x, y, 0, None)), state.params


def torch_epoch(net, x, y, batch_size, lr):
  """A zero-argument function running one SGD epoch and an eval pass of `net`, from fixed weights."""
  xt, yt = nchw(x), torch.from_numpy(np.asarray(y, np.int64))
  params = list(net.parameters())
  start = [p.detach().clone() for p in params]
  generator = torch.Generator().manual_seed(0)

  def run():
    with torch.no_grad():
      for p, s in zip(params, start):
        p.copy_(s)
    opt = torch.optim.SGD(params, lr=lr)
    perm = torch.randperm(len(xt), generator=generator)
    for i in range(0, len(xt) - batch_size + 1, batch_size):
      idx = perm[i:i + batch_size]
      opt.zero_grad()
      torch.nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
      opt.step()
    with torch.no_grad():
      return sum((net(xt[i:i + 1000]).argmax(1) == yt[i:i + 1000]).sum()
                 for i in range(0, len(xt), 1000))

  return run


def median_times(fns, repeats):
  """name -> median seconds of fns[name](), called round-robin after one untimed call each."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def benchmark(name, args):
  model_name, dataset, width, n, batch_size, lr = SETUPS[name]
  model = get_model(model_name, **({} if width is None else {"width": width}))
  full = data_lib.load(dataset, args.data_dir)
  x, y = data_lib.strided_subset(full.x_train, full.y_train, n)
  xj, yj = jnp.asarray(x), jnp.asarray(y)
  s = args.members
  one, params = flatjax_epoch(model, xj, yj, batch_size, lr, 1)
  many, _ = flatjax_epoch(model, xj, yj, batch_size, lr, s)
  params = jax.tree.map(lambda a: a[0], params)
  times = median_times({"flatjax 1": one, f"flatjax {s} vmapped": many,
                        "pytorch 1": torch_epoch(torch_network(params), x, y, batch_size, lr)},
                       args.repeats)
  rows = [("flatjax, 1 member", 1, times["flatjax 1"]),
          (f"flatjax, {s} members vmapped in one program", s, times[f"flatjax {s} vmapped"]),
          (f"flatjax, {s} members one after another", s, s * times["flatjax 1"]),
          ("PyTorch, 1 run", 1, times["pytorch 1"]),
          (f"PyTorch, {s} runs one after another", s, s * times["pytorch 1"])]
  print(f"\n## {name}: {dataset} ({n} examples), batch {batch_size}, plain SGD lr {lr}")
  print("| implementation | members | s per epoch | examples/s | vs PyTorch (same members) |")
  print("|---|---|---|---|---|")
  for label, members, seconds in rows:
    torch_seconds = members * times["pytorch 1"]
    print(f"| {label} | {members} | {seconds:.3f} | {members * n / seconds:,.0f} "
          f"| {torch_seconds / seconds:.2f}x |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--setups", default=",".join(SETUPS))
  parser.add_argument("--members", type=int, default=4, help="S, members trained at once")
  parser.add_argument("--data_dir", default=os.environ.get("FLATJAX_DATA_DIR"))
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({args.threads} threads); one epoch = SGD steps over the examples + an eval-mode pass")
  for name in args.setups.split(","):
    benchmark(name, args)


if __name__ == "__main__":
  main()
