"""A tiny sweep for the runner's tests: the MLP on synthetic data, seconds per run.

Run as a script it is the experiment command line, e.g.
`python tests/tiny_sweep.py --workdir=DIR --quiet`; with the environment variable
TINY_SWEEP_SAVE_DELAY=S it pauses S seconds after every checkpoint it saves (so a test can kill it
mid-run).
"""

import os
import sys
import time

import numpy as np

from flatjax import checkpoint, cli
from flatjax.data import Dataset, strided_subset
from flatjax.presets import Experiment

N_TRAIN, N_TEST, CLASSES = 96, 48, 4

TINY = dict(dataset="synthetic", model="mlp", hidden=16, optimizer="sgd", batch_sizes=(16, 32),
            lrs=(0.5, 1.0), seeds=2, max_epochs=8, target_acc=0.95, lambda_subset=64,
            lambda_iters=10, checkpoint_every=2)
EXPERIMENTS = {
    "tiny": Experiment(figure="batch_lr", base=TINY, presets={"smoke": {}, "cpu": {}}),
    "tiny_sam": Experiment(figure="batch_lr", base={**TINY, "optimizer": "sam", "rhos": (0.0,)},
                           presets={"smoke": {"batch_sizes": (16,), "lrs": (0.5,),
                                              "rhos": (0.0, 0.05)}, "cpu": {}}),
}


def synthetic(name, data_dir=None, *, train_subset=None) -> Dataset:
    """Gaussian 4x4x1 images labelled by a fixed random linear teacher (4 of 10 classes)."""
    del data_dir
    if name != "synthetic":
        raise ValueError(f"unknown dataset {name!r}")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_TRAIN + N_TEST, 4, 4, 1)).astype(np.float32)
    y = (x.reshape(len(x), -1) @ rng.normal(size=(16, CLASSES))).argmax(-1).astype(np.int32)
    x_train, y_train = x[:N_TRAIN], y[:N_TRAIN]
    if train_subset is not None:
        x_train, y_train = strided_subset(x_train, y_train, train_subset)
    return Dataset(x_train, y_train, x[N_TRAIN:], y[N_TRAIN:])


def run(argv, experiment="tiny") -> int:
    """The experiment command line for the tiny experiments."""
    return cli.main(experiment, ["--platform=cpu", "--preset=smoke", *argv],
                    experiments=EXPERIMENTS, load_data=synthetic)


def slow_down_saves(seconds: float) -> None:
    """Pause `seconds` after every checkpoint saved."""
    save = checkpoint.GroupCheckpoints.save

    def save_then_wait(self, *args, **kwargs):
        save(self, *args, **kwargs)
        time.sleep(seconds)

    checkpoint.GroupCheckpoints.save = save_then_wait


if __name__ == "__main__":
    if os.environ.get("TINY_SWEEP_SAVE_DELAY"):
        slow_down_saves(float(os.environ["TINY_SWEEP_SAVE_DELAY"]))
    sys.exit(run(sys.argv[1:]))
