"""Experiment 1 of the paper: VGG11 on CIFAR-10 with plain SGD, learning rate x batch size.

Test accuracy and lambda_max against the learning rate at a small and a large batch size. The grid
of each preset is in flatjax/presets.py; `--help` lists the flags.
"""

import sys

from flatjax import cli

if __name__ == "__main__":
    sys.exit(cli.main("batch_lr"))
