"""flatjax: lambda_max, SAM and the sharpness-vs-generalization experiments in JAX."""

__version__ = "0.1.0"
