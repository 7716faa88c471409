"""lambda_max of a trained group: final weights, between iterates (BatchNorm), diverged members."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tiny_sweep as tiny

from flatjax import hessian, sharpness, spectrum
from flatjax import train as train_lib

BATCH = 16
LRS = (0.05, 0.5)


class DenseBN(nn.Module):
    """Flatten -> Dense -> BatchNorm -> ReLU -> Dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(8)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(10)(nn.relu(x))


def settings(**overrides):
    return types.SimpleNamespace(**{
        "lambda_subset": 64, "lambda_batch_norm": "train", "lambda_iters": 30, "lambda_tol": None,
        "between_iterates_below_lr": 0.1, "between_iterates_points": 4, "adaptive_rho": None,
        "adaptive_steps": 3, **overrides})


def explicit_next_step(model, member, data, lr):
    """One SGD step written out: the first minibatch of the member's next epoch."""
    _, perm_key, dropout_key = train_lib.split_epoch_key(member.key)
    idx = jax.random.permutation(perm_key, len(data.x_train))[:BATCH]
    x, y = jnp.asarray(data.x_train)[idx], jnp.asarray(data.y_train)[idx]

    def loss(params):
        logits, mutated = model.apply({"params": params, "batch_stats": member.batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), mutated

    grads, mutated = jax.grad(loss, has_aux=True)(member.params)
    params = jax.tree.map(lambda p, g: p - lr * g, member.params, grads)
    return {"params": params, "batch_stats": mutated["batch_stats"]}


def test_between_iterates_and_final_measures_match_explicit_computations():
    model, data = DenseBN(), tiny.synthetic("synthetic")
    result = train_lib.train(model, data, batch_size=BATCH, lrs=list(LRS), seeds=[0, 0],
                             max_epochs=2, progress=False)
    measured = sharpness.group_sharpness(model, train_lib.SGD, settings(), BATCH, True, LRS, 0,
                                         result.state, result.status, data)
    assert measured.method == ["between_iterates", "final"]

    x, y = (jnp.asarray(a) for a in (data.x_train[:64], data.y_train[:64]))  # stride 1 of 96
    kwargs = dict(batch_size=BATCH, subset_size=None, num_iters=30)

    def lam(variables):
        return float(hessian.lambda_max(model, variables, x, y, **kwargs).eigenvalue)

    start = jax.tree.map(lambda a: a[0], result.variables)
    end = explicit_next_step(model, jax.tree.map(lambda a: a[0], result.state), data, LRS[0])
    def mix(t):
        return jax.tree.map(lambda a, b: (1 - t) * a + t * b, start, end)

    points = [lam(mix(t)) for t in np.linspace(0, 1, 4)]
    np.testing.assert_allclose(measured.eigenvalue[0], max(points), rtol=1e-4)
    assert len(set(np.round(points, 4))) > 1  # the points differ: the step moved the weights
    np.testing.assert_allclose(measured.eigenvalue[1],
                               lam(jax.tree.map(lambda a: a[1], result.variables)), rtol=1e-4)
    assert np.all(measured.residual < 1e-2 * measured.eigenvalue) and np.all(measured.converged)
    assert np.isnan(measured.adaptive).all()  # adaptive_rho None: not measured


def test_adaptive_sharpness_matches_an_explicit_computation_at_the_final_weights():
    model, data = DenseBN(), tiny.synthetic("synthetic")
    result = train_lib.train(model, data, batch_size=BATCH, lrs=list(LRS), seeds=[0, 0],
                             max_epochs=2, progress=False)
    measured = sharpness.group_sharpness(
        model, train_lib.SGD, settings(adaptive_rho=0.2), BATCH, True, LRS, 0, result.state,
        ["diverged", result.status[1]], data)
    assert np.isnan(measured.adaptive[0])  # diverged: not measured

    x, y = (jnp.asarray(a) for a in (data.x_train[:64], data.y_train[:64]))
    variables = jax.tree.map(lambda a: a[1], result.variables)

    def loss(params):  # train-mode BatchNorm in ghost batches of BATCH, as lambda_max
        logits = [model.apply({**variables, "params": params}, x[i:i + BATCH], train=True,
                              mutable=["batch_stats"])[0] for i in range(0, 64, BATCH)]
        return optax.softmax_cross_entropy_with_integer_labels(jnp.concatenate(logits), y).mean()

    truth = spectrum.adaptive_sharpness(loss, variables["params"], rho=0.2, num_steps=3)
    assert truth.sharpness > 0
    np.testing.assert_allclose(measured.adaptive[1], truth.sharpness, rtol=1e-3)


def test_diverged_members_are_not_measured():
    model, data = DenseBN(), tiny.synthetic("synthetic")
    result = train_lib.train(model, data, batch_size=BATCH, lrs=list(LRS), seeds=[0, 0],
                             max_epochs=2, progress=False)
    measured = sharpness.group_sharpness(
        model, train_lib.SGD, settings(between_iterates_below_lr=None), BATCH, True, LRS, 1,
        result.state, ["diverged", result.status[1]], data)
    assert measured.method == ["", "final"]
    assert np.isnan(measured.eigenvalue[0]) and np.isnan(measured.num_hvps[0])
    assert measured.eigenvalue[1] > 0
