"""Experiment 2 of the paper: VGG11 on CIFAR-10 with SGD + SAM, rho at a small and a large batch size.

Test accuracy and lambda_max against rho, one line per batch size. The grid of each preset is in
flatjax/presets.py; `--help` lists the flags.
"""

import sys

from flatjax import cli

if __name__ == "__main__":
    sys.exit(cli.main("sam_rho"))
