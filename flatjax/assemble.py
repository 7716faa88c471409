"""The model, the optimizer and the lambda_max tracking of a group, from the sweep's settings."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from flatjax import models
from flatjax import sam as sam_lib
from flatjax import train as train_lib
from flatjax.config import ConfigError, SweepConfig


def model_kwargs(config: SweepConfig, batch_norm: bool, dropout: float) -> dict:
    """Keyword arguments of `models.get_model` for one group (only the settings in use)."""
    kwargs = {"width": config.width, "hidden": config.hidden}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if batch_norm:
        kwargs["batch_norm"] = True
    if dropout:
        kwargs["dropout"] = dropout
    return kwargs


def build_model(config: SweepConfig, batch_norm: bool, dropout: float):
    """The group's Flax model; ConfigError when the model does not take these settings."""
    try:
        return models.get_model(config.model, **model_kwargs(config, batch_norm, dropout))
    except ValueError as error:
        raise ConfigError(f"{error} (check --width/--hidden/--dropouts and the BatchNorm "
                          f"setting for model {config.model!r})") from error


def sgd_with_sam(hparams, batch_stats_like):
    """SAM (rho = hparams["rho"]) around SGD (lr = hparams["lr"])."""
    return sam_lib.sam(optax.sgd(hparams["lr"]), rho=hparams["rho"],
                       aux_like=batch_stats_like or None)


@functools.lru_cache(maxsize=32)
def sam_optimizer(model, input_shape: tuple[int, ...], policy: str) -> train_lib.Optimizer:
    """A train.Optimizer running SAM with BatchNorm policy `policy` (see flatjax.sam)."""
    variables = jax.eval_shape(
        lambda: model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, *input_shape)),
                           train=False))
    batch_stats_like = variables.get("batch_stats", {})
    make = functools.partial(sgd_with_sam, batch_stats_like=batch_stats_like)
    if not batch_stats_like:
        return train_lib.Optimizer(make=make)
    return train_lib.Optimizer(
        make=make,
        pass_stats=functools.partial(sam_lib.perturbed_pass_stats, policy),
        kept_stats=functools.partial(sam_lib.sam_batch_stats, policy))


def build_optimizer(config: SweepConfig, model, input_shape: tuple[int, ...]):
    """The group's train.Optimizer: plain SGD, or SAM with the configured BatchNorm policy."""
    if config.optimizer == "sgd":
        return train_lib.SGD
    return sam_optimizer(model, tuple(input_shape), config.sam_policy)


def member_hparams(config: SweepConfig, rhos) -> dict | None:
    """Extra per-member hyperparameters for `train` beyond the LR: rho for SAM, none for SGD."""
    return {"rho": list(rhos)} if config.optimizer == "sam" else None


def tracking(config: SweepConfig) -> train_lib.Tracking | None:
    """lambda_max tracking during training with the sweep's lambda_* settings; None when off."""
    if not config.track_every:
        return None
    return train_lib.Tracking(every=config.track_every, subset_size=config.lambda_subset,
                              num_iters=config.lambda_iters, tol=config.lambda_tol,
                              batch_norm=config.lambda_batch_norm)
