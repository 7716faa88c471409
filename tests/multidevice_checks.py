"""Checks that need several devices, run by tests/test_parallel.py in a subprocess.

`python tests/multidevice_checks.py CHECK` forces 8 host CPU devices, runs CHECK on one device
and on meshes of the 8, and exits non-zero (with the mismatch) if they disagree.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn  # noqa: E402  (after the flags above)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from flatjax import parallel, sharpness  # noqa: E402
from flatjax import train as train_lib  # noqa: E402
from flatjax.config import SweepConfig  # noqa: E402
from flatjax.data import Dataset  # noqa: E402

SEEDS, LRS = [0, 1, 2], [0.05, 0.1, 0.2]  # 3 members: not a multiple of the seed axes below
MESHES = {"seeds 8": 1, "seeds 2 x data 4": 4, "data 8": 8}  # name -> data_parallel


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> mean pool -> Dense: batch means the data axis must share."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(8, (3, 3))(x))
        return nn.Dense(10)(nn.relu(x).mean((1, 2)))


def dataset(n_train=64, n_test=32, seed=0) -> Dataset:
    """Gaussian 6x6x3 images with labels from a random linear teacher."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_test, 6, 6, 3)).astype(np.float32)
    y = (x.reshape(len(x), -1) @ rng.normal(size=(x[0].size, 10))).argmax(-1).astype(np.int32)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def train_and_measure(model, data, mesh):
    """Three epochs of the 3 members at batch 16, then their lambda_max (final and between)."""
    result = train_lib.train(model, data, batch_size=16, lrs=LRS, seeds=SEEDS, max_epochs=3,
                             progress=False, mesh=mesh)
    config = SweepConfig(experiment="check", preset="smoke", figure="batch_lr",
                         dataset="synthetic", model="vgg11", batch_sizes=(16,), lrs=tuple(LRS),
                         max_epochs=3, lambda_subset=32, lambda_iters=20, between_iterates_below_lr=0.1,
                         between_iterates_points=2)
    measured = sharpness.group_sharpness(
        model, train_lib.SGD, config, 16, True, LRS, 0, result.state, result.status, data, mesh)
    return result, measured


def epoch_hlo(model, data, mesh) -> str:
    """The compiled epoch program's HLO text for the 3 members on `mesh` (checks their sharding)."""
    programs = train_lib.compile_programs(model, train_lib.SGD, train_lib.TrainConfig(16, 3), mesh)
    x, y = parallel.place((data.x_train, data.y_train), mesh, members=False)
    hparams = train_lib.member_hparams(LRS, None, len(SEEDS))
    state = programs.init(*parallel.place_members((np.asarray(SEEDS, np.int32), hparams), 3, mesh),
                          x, y)
    kernel = state.params["Dense_0"]["kernel"]
    assert kernel.shape[0] == parallel.padded_size(3, mesh)
    assert kernel.sharding.mesh == mesh and kernel.sharding.spec[0] == parallel.SEED
    return programs.epoch.lower(state, x, y, 0, None).compile().as_text()


def check_train_and_lambda_max():
    """A BatchNorm conv net: training and lambda_max on meshes equal those on one device."""
    model, data = ConvBN(), dataset()
    want, want_lambda = train_and_measure(model, data, None)
    for name, data_parallel in MESHES.items():
        mesh = parallel.make_mesh(data_parallel)
        got, got_lambda = train_and_measure(model, data, mesh)
        assert ("all-reduce" in epoch_hlo(model, data, mesh)) == (data_parallel > 1), name
        assert got.status == want.status and np.array_equal(got.epochs, want.epochs), name
        np.testing.assert_allclose(got.test_acc, want.test_acc, atol=1 / 32 + 1e-6, err_msg=name)
        np.testing.assert_allclose(got.train_loss, want.train_loss, rtol=1e-4, err_msg=name)
        for a, b in zip(jax.tree.leaves(parallel.to_host(got.variables)),
                        jax.tree.leaves(parallel.to_host(want.variables)), strict=True):
            assert a.shape == b.shape, name
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=name)
        assert got_lambda.method == want_lambda.method, name
        np.testing.assert_allclose(got_lambda.eigenvalue, want_lambda.eigenvalue, rtol=1e-3,
                                   err_msg=name)
        print(f"{name}: agrees; lambda_max {np.round(got_lambda.eigenvalue, 4).tolist()}")
    assert want_lambda.method == ["between_iterates", "final", "final"]


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    globals()[f"check_{sys.argv[1]}"]()
