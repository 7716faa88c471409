"""The experiments and their presets, as plain data (flat settings keyed by flag name).

Each preset is merged over its experiment's `base`, and command-line flags over both
(`resolve`). Tune a preset by editing its dict here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from flatjax.config import ConfigError

# Radius of the adaptive sharpness measured next to lambda_max (flatjax.sharpness): with 10 ascent
# steps it is converged to 1% on the batchnorm cpu preset's VGG11, and the rise is ~0.03 there.
ADAPTIVE_RHO = 0.1


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A grid and a figure: settings shared by all presets, the presets, and a note to print."""

    figure: str
    base: Mapping
    presets: Mapping[str, Mapping]
    note: str = ""


BATCH_LR = Experiment(
    figure="batch_lr",
    note="The learning-rate and batch-size grids are our choice: the paper does not publish "
         "them.",
    base=dict(dataset="cifar10", model="vgg11", optimizer="sgd", target_acc=0.99,
              adaptive_rho=ADAPTIVE_RHO),
    presets={
        # The smallest sweep through every step, a check rather than a result: about 2.5 minutes
        # on 2 busy CPU cores, most of it XLA compilation (two programs per batch size).
        "smoke": dict(train_subset=256, width=0.0625, batch_sizes=(32, 128), lrs=(0.05, 0.2),
                      seeds=2, max_epochs=2, lambda_subset=128, lambda_iters=20,
                      adaptive_steps=2, checkpoint_every=1),
        # A 1000-example strided CIFAR-10 subset, a quarter-width VGG11 (im2col convolutions),
        # one seed. This VGG11 without BatchNorm trains only for LRs up to about 0.1 (at 0.2 it
        # stays at chance); batch 100 stands for the large batch because a larger one needs
        # more epochs than a CPU budget allows to leave the initial plateau.
        "cpu": dict(train_subset=1000, width=0.25, batch_sizes=(25, 100),
                    lrs=(0.025, 0.05, 0.1), seeds=1, max_epochs=100, lambda_subset=1000,
                    lambda_iters=50, checkpoint_every=10),
        # Full CIFAR-10, full-width VGG11; LRs doubling up to where training diverges.
        "paper": dict(train_subset=None, width=1.0, batch_sizes=(100, 1000),
                      lrs=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64), seeds=3,
                      max_epochs=200, lambda_subset=1000, checkpoint_every=5, lambda_members=4),
    },
)

SAM_RHO = Experiment(
    figure="sam_rho",
    note="The rho, batch-size and learning-rate grids are our choice: the paper does not "
         "publish them.",
    base=dict(dataset="cifar10", model="vgg11", optimizer="sam", target_acc=0.99,
              adaptive_rho=ADAPTIVE_RHO,
              rhos=(0.0, 0.01, 0.02, 0.05, 0.1, 0.2)),
    presets={
        "smoke": dict(train_subset=256, width=0.0625, batch_sizes=(32, 128), lrs=(0.1,),
                      rhos=(0.0, 0.1), seeds=1, max_epochs=2, lambda_subset=128, lambda_iters=20,
                      adaptive_steps=2, checkpoint_every=1),
        # The batch_lr cpu setup (see there) at its largest trainable LR.
        "cpu": dict(train_subset=1000, width=0.25, batch_sizes=(25, 100), lrs=(0.1,),
                    rhos=(0.0, 0.05, 0.2), seeds=1, max_epochs=100, lambda_subset=1000,
                    lambda_iters=50, checkpoint_every=10),
        "paper": dict(train_subset=None, width=1.0, batch_sizes=(100, 1000), lrs=(0.05,),
                      seeds=3, max_epochs=200, lambda_subset=1000, checkpoint_every=5,
                      lambda_members=4),
    },
)

BATCHNORM = Experiment(
    figure="batchnorm",
    note="The learning-rate and batch-size grids are our choice: the paper does not publish "
         "them. lambda_max of BatchNorm networks: train mode, ghost batches of the "
         "training batch size; below the between-iterates LR, the largest over interpolations "
         "between the final weights and one more SGD step.",
    base=dict(dataset="cifar10", model="vgg11", optimizer="sgd", target_acc=0.99,
              batch_norms=(False, True), adaptive_rho=ADAPTIVE_RHO),
    presets={
        "smoke": dict(train_subset=256, width=0.0625, batch_sizes=(64,), lrs=(0.02, 0.2),
                      seeds=1, max_epochs=2, lambda_subset=128, lambda_iters=20,
                      adaptive_steps=2, between_iterates_below_lr=0.05,
                      between_iterates_points=3, checkpoint_every=1),
        # The batch_lr cpu setup (see there); LR 0.4 is past where the network without
        # BatchNorm trains, and the smallest LR takes the between-iterates measure with BN.
        "cpu": dict(train_subset=1000, width=0.25, batch_sizes=(25, 100),
                    lrs=(0.025, 0.1, 0.4), seeds=1, max_epochs=100, lambda_subset=1000,
                    lambda_iters=50, between_iterates_below_lr=0.05, between_iterates_points=4,
                    checkpoint_every=10),
        "paper": dict(train_subset=None, width=1.0, batch_sizes=(100, 1000),
                      lrs=tuple(0.005 * 2**k for k in range(8)), seeds=3, max_epochs=200,
                      lambda_subset=1000, between_iterates_below_lr=0.02, checkpoint_every=5,
                      lambda_members=4),
    },
)

DROPOUT = Experiment(
    figure="dropout",
    note="The dropout rates are the reference code's; the batch size and learning rate are our "
         "choice. lambda_max is taken in eval mode (dropout off).",
    base=dict(dataset="fashion_mnist", model="mlp", optimizer="sgd", target_acc=0.99,
              dropouts=(0.0, 0.1, 0.2, 0.5, 0.6, 0.7), adaptive_rho=ADAPTIVE_RHO),
    presets={
        "smoke": dict(train_subset=1000, batch_sizes=(100,), lrs=(0.1,), dropouts=(0.0, 0.5),
                      seeds=1, max_epochs=2, lambda_subset=200, lambda_iters=20,
                      adaptive_steps=2, checkpoint_every=1),
        "cpu": dict(train_subset=None, batch_sizes=(100,), lrs=(0.1,), seeds=3, max_epochs=30,
                    lambda_subset=1000, lambda_iters=50, checkpoint_every=5),
        "paper": dict(train_subset=None, batch_sizes=(100,), lrs=(0.1,), seeds=5,
                      max_epochs=500, lambda_subset=1000, checkpoint_every=10),
    },
)

EXPERIMENTS: dict[str, Experiment] = {
    "batch_lr": BATCH_LR, "sam_rho": SAM_RHO, "batchnorm": BATCHNORM, "dropout": DROPOUT}


def get_experiment(name: str, experiments: Mapping[str, Experiment] = EXPERIMENTS) -> Experiment:
    """The experiment `name`; ConfigError naming the known ones otherwise."""
    if name not in experiments:
        raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(experiments)}")
    return experiments[name]


def resolve(name: str, preset: str, overrides: Mapping,
            experiments: Mapping[str, Experiment] = EXPERIMENTS) -> dict:
    """Flat settings of experiment `name` at `preset`, with `overrides` (flag values) on top."""
    experiment = get_experiment(name, experiments)
    if preset not in experiment.presets:
        raise ConfigError(f"unknown preset {preset!r} for experiment {name!r}; "
                          f"known: {', '.join(experiment.presets)}")
    return {**experiment.base, **experiment.presets[preset], **overrides,
            "experiment": name, "preset": preset, "figure": experiment.figure}
