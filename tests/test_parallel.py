"""flatjax.parallel: meshes, member padding, and 1-device against 8-device runs."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_sweep as tiny

from flatjax import parallel

TESTS = Path(__file__).parent
EIGHT_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                 "JAX_PLATFORMS": "cpu"}


def test_mesh_shape_and_bad_data_parallel():
    mesh = parallel.make_mesh(1)
    assert dict(mesh.shape) == {parallel.SEED: jax.device_count(), parallel.DATA: 1}
    with pytest.raises(ValueError, match="positive divisor of the device count 1, got 3"):
        parallel.make_mesh(3)
    with pytest.raises(ValueError, match="got 0"):
        parallel.make_mesh(0)
    assert parallel.default_mesh(1) is None  # one device: plain programs


def test_padding_copies_the_last_member_and_first_members_drops_it():
    tree = {"a": np.arange(3.0), "b": np.arange(6).reshape(3, 2)}
    padded = parallel.pad_members(tree, 4)
    np.testing.assert_array_equal(padded["a"], [0.0, 1.0, 2.0, 2.0])
    np.testing.assert_array_equal(padded["b"][3], [4, 5])
    back = parallel.first_members(padded, 3)
    np.testing.assert_array_equal(back["b"], tree["b"])


def test_split_examples_is_the_identity_without_a_data_axis():
    x = np.ones((4, 2))
    assert parallel.split_examples(x, None) is x
    assert parallel.split_examples(x, parallel.make_mesh(1)) is x


def test_bad_data_parallel_is_refused(tmp_path, capsys):
    assert tiny.run([f"--workdir={tmp_path / 'w'}", "--data_parallel=3"]) == 2
    assert "--data_parallel: data_parallel must be a positive divisor" in capsys.readouterr().err
    assert tiny.run([f"--workdir={tmp_path / 'w'}", "--data_parallel=0"]) == 2
    assert "--data_parallel must be >= 1, got 0" in capsys.readouterr().err


def test_training_and_lambda_max_on_8_devices_equal_one_device():
    """Seeds over 8 devices, 2 x 4 and data over 8, with BatchNorm, 3 members (padded)."""
    done = subprocess.run([sys.executable, str(TESTS / "multidevice_checks.py"),
                           "train_and_lambda_max"], env=EIGHT_DEVICES, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    assert done.stdout.count("agrees") == 3


def read(path: Path) -> dict:
    with open(path) as f:
        return {(r["batch_size"], r["lr"], r["seed"]): r for r in csv.DictReader(f)}


def test_a_sweep_on_8_devices_equals_one_on_one_device(tmp_path):
    """The tiny sweep, 3 seeds per group: 6 members on a 4 x 2 mesh (padded to 8), batches
    split over the data axis of 2."""
    argv = ["--seeds=3", "--quiet", "--checkpoint_every=0"]
    assert tiny.run([f"--workdir={tmp_path / 'one'}", *argv]) == 0
    done = subprocess.run(
        [sys.executable, str(TESTS / "tiny_sweep.py"), f"--workdir={tmp_path / 'eight'}", *argv,
         "--data_parallel=2"],
        env=EIGHT_DEVICES, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    one, eight = read(tmp_path / "one" / "results.csv"), read(tmp_path / "eight" / "results.csv")
    assert one.keys() == eight.keys() and len(one) == 12
    for key, row in one.items():
        assert (row["status"], row["epochs"]) == (eight[key]["status"], eight[key]["epochs"])
        for column, rtol in (("train_loss", 1e-4), ("test_acc", 1e-6), ("lambda_max", 1e-3)):
            np.testing.assert_allclose(float(eight[key][column]), float(row[column]),
                                       rtol=rtol, err_msg=f"{key} {column}")
