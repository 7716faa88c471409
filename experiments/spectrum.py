"""The Hessian's spectrum of one trained network: lambda_max, Hutchinson and Hutch++ traces, the
SLQ eigenvalue density, per-layer top eigenvalues and adaptive sharpness, with a figure.

The default trains the batch_lr cpu setup (VGG11 at quarter width on a 1000-example CIFAR-10
subset, batch 100, LR 0.1); `--preset=smoke` is a check in seconds; `--help` lists the flags.
Outputs (flatjax/spectrum_report.py): spectrum.json, density.csv, layers.csv, spectrum.png.
"""

import sys

from flatjax import spectrum_report

if __name__ == "__main__":
    sys.exit(spectrum_report.main())
