"""lambda_max tracked during training: HVPs and wall time per measurement, cold against warm start,
and the overhead of training with tracking.

The measure is the paper's lambda_max (a 1000-example strided subset of the training set, chunks
of the batch size, Lanczos to the solver's default tolerance), as `--track_every` runs it.
1. Per measurement: one member trains with the tracker measuring at the end of every epoch, for
   `--points` epochs. At each epoch's weights lambda_max is then solved again outside training,
   from the random start (cold) and from the eigenvector of the previous epoch's warm solve
   (warm: what the tracker does), each timed as the median of `--repeats` compiled calls; the
   tracker's own HVP counts are shown beside them.
2. Training overhead: seconds per epoch of the compiled epoch program without tracking and with
   tracking every K steps for each K of `--every`, from the same state (after one epoch, so the
   tracker starts warm), medians of `--repeats` calls.

On a busy CPU, set OPENBLAS_NUM_THREADS=1: LAPACK's eigh (scipy's OpenBLAS, which jaxlib calls)
goes multithreaded above 64 x 64, and its threads then wait on XLA's (the Lanczos matrix of a
100-iteration cap is 100 x 100, solved every iteration when vmapped: about 85 ms each against
0.6 ms single-threaded on this 2-core machine).

  python benchmarks/tracking_overhead.py [--setup=mlp|vgg11] [--points=6] [--every=K1,K2]
      [--data_dir=DIR] [--train_subset=N] [--repeats=3]
"""

import argparse
import functools
import os
import time

import jax
import numpy as np

from flatjax import data as data_lib
from flatjax import hessian
from flatjax import train as train_lib
from flatjax.models import get_model

SETUPS = {  # name -> (model, get_model kwargs, dataset, training examples, batch size, SGD lr)
    "mlp": ("mlp", {}, "fashion_mnist", 5000, 100, 0.1),
    "vgg11": ("vgg11", {"width": 0.25}, "cifar10", 1000, 100, 0.05),
}
SUBSET, ITERS = 1000, 100  # the sweep's lambda_max subset and Lanczos cap (lambda_iters)


def median_time(fn, repeats):
  """(fn(), median wall seconds of `repeats` calls after an untimed one)."""
  out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return out, float(np.median(times))


def cold_and_warm(model, states, x, y, batch_size, tracked, repeats):
  """Markdown rows: cold and warm lambda_max at every recorded epoch's weights."""
  rows, previous = [], None
  for epoch, params in sorted(states.items()):
    def solve(init, params=params):
      return hessian.lambda_max(model, {"params": params}, x, y, batch_size=batch_size,
                                subset_size=None, num_iters=ITERS, init=init)
    cold, cold_s = median_time(functools.partial(solve, None), repeats)
    warm, warm_s = (cold, cold_s) if previous is None else median_time(
        functools.partial(solve, previous), repeats)
    previous = warm.eigenvector
    rows.append(f"| {epoch} | {float(cold.eigenvalue):.5g} | {float(warm.eigenvalue):.5g} "
                f"| {int(cold.num_hvps)} | {int(warm.num_hvps)} | {int(tracked[epoch - 1])} "
                f"| {cold_s:.3f} | {warm_s:.3f} | {warm_s / cold_s:.2f} |")
  return rows


def epoch_overhead(model, data, batch_size, lr, everies, repeats):
  """Markdown rows: seconds per epoch without tracking and with tracking every K steps."""
  x, y = jax.numpy.asarray(data.x_train), jax.numpy.asarray(data.y_train)
  subset = tuple(map(jax.numpy.asarray, data_lib.strided_subset(data.x_train, data.y_train,
                                                                SUBSET)))
  seeds, hparams = np.zeros(1, np.int32), train_lib.member_hparams([lr], None, 1)
  per_epoch = train_lib.steps_per_epoch(len(x), train_lib.TrainConfig(batch_size, 2))
  rows, base = [], None
  for every in [None, *everies]:
    tracking = every and train_lib.Tracking(every, subset_size=SUBSET, num_iters=ITERS)
    config = train_lib.TrainConfig(batch_size, 2, target_acc=1.0, tracking=tracking)
    programs = train_lib.compile_programs(model, train_lib.SGD, config)
    data_in = subset if every else None
    first, _ = programs.epoch(programs.init(seeds, hparams, x, y), x, y, 0, data_in)
    (state, _), seconds = median_time(
        functools.partial(programs.epoch, first, x, y, 1, data_in), repeats)
    if every is None:
      base = seconds
      rows.append(f"| off | 0 | 0 | {seconds:.3f} | 1.00 | - | - |")
      continue
    start, stop = per_epoch // every, 2 * per_epoch // every  # the second epoch's entries
    taken = stop - start
    hvps = int(np.asarray(state.tracker.num_hvps)[0, start:stop].sum())
    rows.append(f"| {every} | {taken} | {hvps} | {seconds:.3f} | {seconds / base:.2f} "
                f"| {(seconds - base) / taken:.3f} | {hvps / taken:.1f} |")
  return per_epoch, rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--setup", choices=SETUPS, default="mlp")
  parser.add_argument("--points", type=int, default=6, help="epochs measured cold and warm")
  parser.add_argument("--every", default="",
                      help="K values (steps) to time training with (default: one and five "
                           "measurements per epoch)")
  parser.add_argument("--train_subset", type=int, help="training examples (default per setup)")
  parser.add_argument("--data_dir", default=os.environ.get("FLATJAX_DATA_DIR"))
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  model_name, kwargs, dataset, n, batch_size, lr = SETUPS[args.setup]
  n = args.train_subset or n
  model = get_model(model_name, **kwargs)
  data = data_lib.load(dataset, args.data_dir, train_subset=n)
  x, y = map(jax.numpy.asarray, data_lib.strided_subset(data.x_train, data.y_train, SUBSET))
  per_epoch = train_lib.steps_per_epoch(n, train_lib.TrainConfig(batch_size, 1))
  print(f"jax {jax.__version__} ({jax.default_backend()}, OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}); {model_name} {kwargs or ''} on {n} "
        f"{dataset} examples, batch {batch_size} ({per_epoch} steps per epoch), SGD lr {lr}; "
        f"lambda_max on {SUBSET} examples, Lanczos cap {ITERS}")

  states = {}
  result = train_lib.train(
      model, data, batch_size=batch_size, lrs=[lr], seeds=[0], max_epochs=args.points,
      target_acc=1.0, tracking=train_lib.Tracking(per_epoch, subset_size=SUBSET, num_iters=ITERS),
      callback=lambda s, _: states.update({int(s.epoch[0]): jax.tree.map(lambda a: a[0],
                                                                         s.params)}),
      progress=False)
  print(f"\n## Per measurement, at the end of each epoch (warm: from the previous epoch's "
        f"eigenvector, {per_epoch} steps earlier); seconds are medians of {args.repeats} calls\n")
  print("| epoch | lambda_max cold | lambda_max warm | HVPs cold | HVPs warm | HVPs tracker "
        "| s cold | s warm | warm / cold |")
  print("|---|---|---|---|---|---|---|---|---|")
  for row in cold_and_warm(model, states, x, y, batch_size, result.trajectory.num_hvps[0],
                           args.repeats):
    print(row)

  everies = [int(k) for k in args.every.split(",") if k] or [per_epoch, max(per_epoch // 5, 1)]
  per_epoch, rows = epoch_overhead(model, data, batch_size, lr, everies, args.repeats)
  print(f"\n## Training with tracking: the second epoch ({per_epoch} steps, then the eval pass), "
        f"medians of {args.repeats} calls\n")
  print("| track every K steps | measurements | HVPs | s per epoch | vs off | s per measurement "
        "| HVPs per measurement |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    print(row)


if __name__ == "__main__":
  main()
