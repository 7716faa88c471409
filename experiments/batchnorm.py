"""Experiment 3 of the paper: VGG11 with and without BatchNorm on CIFAR-10 across learning rates.

Test accuracy and lambda_max against the learning rate, BN and no-BN side by side, per batch size.
The grid of each preset is in flatjax/presets.py; `--help` lists the flags.
"""

import sys

from flatjax import cli

if __name__ == "__main__":
    sys.exit(cli.main("batchnorm"))
