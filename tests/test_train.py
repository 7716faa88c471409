"""Tests of flatjax.train on tiny Flax models and synthetic data."""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flatjax import train as T

SEEDS = [0, 1, 2]
LR = 0.2
MAX_EPOCHS = 40


class MLP(nn.Module):
    """Flatten -> Dense -> ReLU -> Dropout -> Dense."""

    hidden: int = 16
    classes: int = 3
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.classes)(x)


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> global mean pool -> Dense."""

    classes: int = 3
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x)
        return nn.Dense(self.classes)(nn.relu(x).mean((1, 2)))


class Data(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def make_data(n_train=64, n_test=32, classes=3, seed=0) -> Data:
    """Gaussian inputs (N, 2, 2, 2) labelled by a random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_test, 2, 2, 2)).astype(np.float32)
    y = (x.reshape(len(x), -1) @ rng.normal(size=(8, classes))).argmax(-1).astype(np.int32)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


DATA = make_data()


def host(tree):
    return jax.tree.map(np.asarray, tree)


def member(tree, i):
    return jax.tree.map(lambda a: np.asarray(a)[i], tree)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def train_mlp(**kwargs):
    args = dict(batch_size=16, lrs=[LR] * len(kwargs.get("seeds", SEEDS)), seeds=SEEDS,
                max_epochs=MAX_EPOCHS, progress=False)
    return T.train(MLP(), DATA, **{**args, **kwargs})


@pytest.fixture(scope="module")
def together():
    """Seeds 0, 1, 2 trained together, with every epoch's state recorded."""
    states = {}

    def record(state, metrics):
        states[int(np.max(state.epoch))] = host(state)

    result = train_mlp(callback=record, progress=True)
    return result, states


def test_members_stop_at_different_epochs_and_reach_target(together):
    result, _ = together
    assert result.status == ["converged"] * 3
    assert len(set(result.epochs.tolist())) == 3
    assert np.all(result.train_acc >= 0.99)
    for i, epochs in enumerate(result.epochs):
        acc = result.history.train_acc[i]
        assert np.all(acc[: epochs - 1] < 0.99) and acc[epochs - 1] >= 0.99
        assert np.all(np.isnan(acc[epochs:]))
    assert np.all(np.isfinite(result.test_acc)) and np.all(result.train_loss > 0)


def test_vmapped_members_equal_each_member_alone(together):
    result, _ = together
    for i, seed in enumerate(SEEDS):
        alone = train_mlp(seeds=[seed])
        assert alone.status[0] == result.status[i]
        assert alone.epochs[0] == result.epochs[i]
        assert_trees_close(alone.member_variables(0), member(result.variables, i))
        np.testing.assert_allclose(alone.test_acc[0], result.test_acc[i])


def test_stopped_member_is_frozen_bitwise(together):
    result, states = together
    first = int(np.argmin(result.epochs))
    stop = int(result.epochs[first])
    assert stop < max(states)
    at_stop = member(states[stop], first)
    assert not at_stop.active
    for later in range(stop + 1, max(states) + 1):
        assert_trees_equal(member(states[later], first), at_stop)
    assert_trees_equal(member(result.state, first), at_stop)


def test_resume_from_mid_run_state_equals_uninterrupted(together):
    result, states = together
    resumed = train_mlp(state=jax.tree.map(jnp.asarray, states[10]))
    assert_trees_equal(host(resumed.state), host(result.state))
    np.testing.assert_array_equal(resumed.test_acc, result.test_acc)
    np.testing.assert_array_equal(resumed.test_loss, result.test_loss)
    assert resumed.status == result.status


def test_resume_rejects_other_members(together):
    _, states = together
    with pytest.raises(ValueError, match="seeds"):
        train_mlp(seeds=[3, 4, 5], state=states[10])
    with pytest.raises(ValueError, match="lr"):
        train_mlp(lrs=[0.1] * 3, state=states[10])


def test_diverging_lr_is_recorded_while_another_member_converges():
    result = train_mlp(lrs=[LR, 50.0, LR], seeds=[0, 0, 1])
    assert result.status == ["converged", "diverged", "converged"]
    assert result.epochs[1] < result.epochs[0]
    last_loss = result.history.train_loss[1, result.epochs[1] - 1]
    assert not last_loss <= 1e3 * np.asarray(result.state.init_loss)[1]


def reference_sgd(model, data, seed, lr, batch_size, epochs, drop_last, constant_dropout_key=False):
    """SGD as a Python loop over the documented RNG scheme -> (variables, step keys, orders)."""
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    root = jax.random.PRNGKey(seed)
    variables = model.init({"params": jax.random.fold_in(root, 0)}, x[:1], train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    key = jax.random.fold_in(root, 1)

    @jax.jit
    def sgd_step(params, stats, idx, dropout_key):
        def loss(p):
            logits, mutated = model.apply(
                {"params": p, "batch_stats": stats}, x[idx], train=True,
                rngs={"dropout": dropout_key}, mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean(), mutated

        (_, mutated), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads), mutated["batch_stats"]

    step_keys, orders = [], []
    for _ in range(epochs):
        key, perm_key, dropout_key = jax.random.split(key, 3)
        perm = np.asarray(jax.random.permutation(perm_key, len(x)))
        orders.append(perm)
        batches = [perm[i : i + batch_size] for i in range(0, len(x), batch_size)]
        if drop_last:
            batches = [b for b in batches if len(b) == batch_size]
        for i, idx in enumerate(batches):
            step_key = dropout_key if constant_dropout_key else jax.random.fold_in(dropout_key, i)
            step_keys.append(tuple(np.asarray(step_key).tolist()))
            params, stats = sgd_step(params, stats, idx, step_key)
    return {"params": params, "batch_stats": stats}, step_keys, orders


SCAN_BATCH, SCAN_EPOCHS, SCAN_SEEDS = 24, 2, (3, 4)  # 64 examples: 2 full batches, 16 left over


@functools.lru_cache(maxsize=None)
def two_epochs(model, drop_last, optimizer=T.SGD, scale=None):
    """Two epochs of seeds 3 and 4 at LR 0.1 (or LR 0.2 with hparams scale), shared by tests."""
    lrs, hparams = ([0.1] * 2, None) if scale is None else ([0.2] * 2, {"scale": [scale] * 2})
    return T.train(model, DATA, batch_size=SCAN_BATCH, lrs=lrs, seeds=list(SCAN_SEEDS),
                   max_epochs=SCAN_EPOCHS, drop_last=drop_last, optimizer=optimizer,
                   hparams=hparams, progress=False)


@pytest.mark.parametrize(
    "model, drop_last",
    [(MLP(dropout=0.5), True), (MLP(dropout=0.5), False), (ConvBN(), True)],
    ids=["mlp_dropout", "mlp_dropout_partial_batch", "conv_bn"],
)
def test_epoch_scan_matches_explicit_sgd_loop(model, drop_last):
    result = two_epochs(model, drop_last)
    expected, step_keys, orders = reference_sgd(
        model, DATA, SCAN_SEEDS[0], 0.1, SCAN_BATCH, SCAN_EPOCHS, drop_last
    )
    assert len(step_keys) == SCAN_EPOCHS * (2 if drop_last else 3)
    assert len(set(step_keys)) == len(step_keys)
    assert not np.array_equal(orders[0], orders[1])
    assert result.status == ["not_converged"] * 2 and list(result.epochs) == [SCAN_EPOCHS] * 2
    assert_trees_close(result.member_variables(0), expected)


def test_dropout_uses_a_new_key_every_step():
    model = MLP(dropout=0.5)
    result = two_epochs(model, True)
    same_key, _, _ = reference_sgd(model, DATA, SCAN_SEEDS[0], 0.1, SCAN_BATCH, SCAN_EPOCHS, True,
                                   constant_dropout_key=True)
    with pytest.raises(AssertionError):
        assert_trees_close(result.member_variables(0), same_key)


def test_batchnorm_statistics_are_updated_per_member():
    stats = jax.tree.leaves_with_path(two_epochs(ConvBN(), True).variables["batch_stats"])
    assert stats
    for path, leaf in stats:
        leaf = np.asarray(leaf)
        initial = 1.0 if "var" in jax.tree_util.keystr(path) else 0.0
        assert np.all(np.isfinite(leaf)) and np.all(leaf != initial)
        assert not np.array_equal(leaf[0], leaf[1])


class AuxState(NamedTuple):
    aux: dict


def two_pass_sgd(hparams):
    """SGD on the gradient it gets from grad_fn, with step hparams["lr"] * hparams["scale"]; like
    SAM it keeps the statistics of its own pass in its state."""

    def init(params):
        del params
        return AuxState(jax.tree.map(jnp.zeros_like, CONV_BN_STATS))

    def update(grads, state, params, *, grad_fn, batch):
        del grads, state
        grads, stats = grad_fn(params, batch)
        step = hparams["lr"] * hparams["scale"]
        return jax.tree.map(lambda g: -step * g, grads), AuxState(stats)

    return optax.GradientTransformationExtraArgs(init, update)


CONV_BN_STATS = ConvBN().init({"params": jax.random.PRNGKey(0)}, DATA.x_train[:1])["batch_stats"]
TWO_PASSES = T.Optimizer(
    make=two_pass_sgd,
    pass_stats=lambda before, clean: clean,
    kept_stats=lambda clean, opt_state: opt_state.aux,
)


def test_optimizer_seam_passes_grad_fn_batch_hparams_and_batchnorm_rules():
    sgd = two_epochs(ConvBN(), True)
    two = two_epochs(ConvBN(), True, optimizer=TWO_PASSES, scale=0.5)
    np.testing.assert_array_equal(two.hparams["scale"], [0.5, 0.5])
    assert_trees_close(two.variables["params"], sgd.variables["params"])
    # Two passes in sequence on the same batch and weights apply the running-average update twice:
    # one pass with momentum 0.9**2.
    twice = two_epochs(ConvBN(momentum=0.81), True)
    assert_trees_close(two.variables["batch_stats"], twice.variables["batch_stats"])
    with pytest.raises(AssertionError):
        assert_trees_close(two.variables["batch_stats"], sgd.variables["batch_stats"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lrs=[0.0]), "learning rates must be positive"),
        (dict(lrs=[-0.1]), "learning rates must be positive"),
        (dict(lrs=[float("nan")]), "lr must be finite"),
        (dict(batch_size=0), "batch_size must be positive"),
        (dict(batch_size=65), "exceeds the 64 training examples"),
        (dict(max_epochs=0), "max_epochs must be at least 1"),
        (dict(target_acc=1.5), "target_acc"),
        (dict(lrs=[0.1, 0.1]), "one value per member"),
        (dict(seeds=[]), "non-empty"),
        (dict(seeds=[-1]), r"\[0, 2\*\*31\)"),
        (dict(hparams={"rho": [0.1, 0.2]}), "rho needs one value per member"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    args = dict(batch_size=16, lrs=[0.1], seeds=[0], max_epochs=5, progress=False)
    with pytest.raises(ValueError, match=match):
        T.train(MLP(), DATA, **{**args, **kwargs})
