"""Experiment 4 of the paper: the MLP with dropout on Fashion-MNIST, dropout probability p.

Test accuracy and lambda_max (eval mode, dropout off) against p. The grid of each preset is in
flatjax/presets.py; `--help` lists the flags.
"""

import sys

from flatjax import cli

if __name__ == "__main__":
    sys.exit(cli.main("dropout"))
