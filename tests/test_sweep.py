"""The sweep runner: rows, resume after SIGKILL, divergence, failures, damaged checkpoints."""

import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import tiny_sweep as tiny

from flatjax import assemble, checkpoint, grid, presets, results, summary, sweep
from flatjax import train as train_lib
from flatjax.config import CONFIG_FILE, ConfigError, split_settings

VOLATILE = ("wall_s", "finished_at")
HELPER = Path(__file__).with_name("tiny_sweep.py")


def run(workdir, experiment="tiny", **overrides):
    """The tiny sweep in-process, quiet; its SweepOutcome."""
    flags = {"workdir": workdir, "quiet": True, **overrides}
    settings = presets.resolve(experiment, "smoke", flags, tiny.EXPERIMENTS)
    config, options = split_settings(settings)
    return sweep.run_sweep(config, options, load_data=tiny.synthetic)


def stable(rows):
    """Rows without the cells that legitimately differ between equal runs, keyed and sorted."""
    return sorted(({k: v for k, v in r.items() if k not in VOLATILE} for r in rows),
                  key=results.row_key)


def csv_rows(workdir):
    return results.read_rows(Path(workdir) / results.FILENAME)


def assert_no_duplicates(workdir):
    text = (Path(workdir) / results.FILENAME).read_text().splitlines()
    keys = [results.row_key(r) for r in csv_rows(workdir)]
    assert len(text) == len(keys) + 1 and len(set(keys)) == len(keys)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The default tiny sweep, run to the end once."""
    workdir = tmp_path_factory.mktemp("finished")
    return workdir, run(workdir)


def test_sweep_writes_one_row_per_run_with_every_column(finished):
    workdir, outcome = finished
    assert outcome.exit_code == 0
    rows = csv_rows(workdir)
    assert len(rows) == 8 and stable(rows) == stable(outcome.rows)
    assert list(rows[0]) == list(results.COLUMNS)
    assert {(r["batch_size"], r["lr"], r["seed"]) for r in rows} == {
        (b, lr, s) for b in ("16", "32") for lr in ("0.5", "1.0") for s in ("0", "1")}
    for row in rows:
        assert row["status"] in ("converged", "not_converged")
        assert row["experiment"] == "tiny" and row["model"] == "mlp" and row["error"] == ""
        assert 0 <= float(row["test_acc"]) <= 1 and float(row["lambda_max"]) > 0
        assert float(row["lambda_max_residual"]) < 1e-2 * float(row["lambda_max"])
        assert int(row["lambda_max_hvps"]) > 0 and row["lambda_method"] == "final"
        assert row["jax_version"] and row["device_kind"] and row["device_count"] == "1"
    assert {r["status"] for r in rows} == {"converged", "not_converged"}
    assert (workdir / CONFIG_FILE).exists() and outcome.figure == workdir / "tiny.png"
    assert not (workdir / sweep.CHECKPOINTS).exists()
    assert_no_duplicates(workdir)


def test_rerun_skips_finished_runs(finished, monkeypatch):
    workdir, outcome = finished
    monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("trained again"))
    again = run(workdir)
    assert again.exit_code == 0 and stable(again.rows) == stable(outcome.rows)


def test_diverging_lr_is_recorded_and_the_others_finish(tmp_path, finished):
    outcome = run(tmp_path, batch_sizes=(16,), lrs=(0.5, 1000.0))
    by_lr = {}
    for row in outcome.rows:
        by_lr.setdefault(row["lr"], []).append(row)
    assert {r["status"] for r in by_lr["1000.0"]} == {"diverged"}
    for row in by_lr["1000.0"]:
        assert math.isnan(float(row["lambda_max"])) and row["lambda_method"] == ""
    assert {r["status"] for r in by_lr["0.5"]} <= {"converged", "not_converged"}
    # The other runs match those of the sweep without the diverging LR.
    reference = {results.row_key(r): r for r in finished[1].rows}
    for row in by_lr["0.5"]:
        for column in ("test_acc", "lambda_max"):
            assert float(row[column]) == pytest.approx(
                float(reference[results.row_key(row)][column]), rel=1e-5)
    assert outcome.exit_code == 0


def test_a_raising_group_is_failed_and_the_sweep_goes_on(tmp_path, monkeypatch, finished):
    real_train = train_lib.train

    def train_or_raise(*args, **kwargs):
        if kwargs["batch_size"] == 32:
            raise RuntimeError("out of memory (injected)")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train_lib, "train", train_or_raise)
    outcome = run(tmp_path)
    assert outcome.exit_code == 1
    failed = [r for r in outcome.rows if r["status"] == "failed"]
    assert {r["batch_size"] for r in failed} == {"32"} and len(failed) == 4
    assert all(r["error"] == "RuntimeError: out of memory (injected)" for r in failed)
    assert all(r["status"] != "failed" for r in outcome.rows if r["batch_size"] == "16")

    monkeypatch.setattr(train_lib, "train", real_train)
    retried = run(tmp_path)
    assert retried.exit_code == 0
    assert stable(retried.rows) == stable(finished[1].rows)
    assert_no_duplicates(tmp_path)


def damage(step_dir: Path, how: str) -> None:
    """Overwrite every file of a checkpoint step with garbage, or truncate each to half."""
    for path in step_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            path.write_bytes(os.urandom(max(len(data), 16)) if how == "garbage"
                             else data[: len(data) // 2])


def test_damaged_checkpoints_are_reported_and_training_restarts(tmp_path, finished, caplog):
    run(tmp_path, keep_checkpoints=True)
    (tmp_path / results.FILENAME).unlink()
    groups = sorted((tmp_path / sweep.CHECKPOINTS).iterdir())
    assert len(groups) == 2
    first_steps = sorted((p for p in groups[0].iterdir() if p.name.isdigit()),
                         key=lambda p: int(p.name))
    damage(first_steps[-1], "garbage")  # the newest: falls back to the one before
    for step in groups[1].iterdir():  # every step: trains from scratch
        if step.name.isdigit():
            damage(step, "truncate")
    with caplog.at_level(logging.INFO, logger="flatjax"):
        outcome = run(tmp_path)
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) >= 3 and all("falling back" in m for m in damaged)
    assert any(f"resuming from the checkpoint at epoch {first_steps[-2].name}" in r.getMessage()
               for r in caplog.records)
    assert any("training from scratch" in r.getMessage() for r in caplog.records)
    assert outcome.exit_code == 0
    assert stable(outcome.rows) == stable(finished[1].rows)


def test_checkpoints_restore_the_newest_good_step(tmp_path):
    state = {"w": np.arange(6.0, dtype=np.float32), "step": np.int32(3)}
    ckpt = checkpoint.GroupCheckpoints(tmp_path / "g", every=1)
    ckpt.save(state, 1, 1.5)
    ckpt.save({**state, "w": state["w"] + 1}, 2, 2.5)
    ckpt.save({**state, "w": state["w"] + 2}, 2, 9.9)  # an existing step is kept as it is
    ckpt.close()
    abstract = {"w": jax.ShapeDtypeStruct((6,), np.float32),
                "step": jax.ShapeDtypeStruct((), np.int32)}
    restored = checkpoint.GroupCheckpoints(tmp_path / "g", every=1).restore(abstract)
    assert restored.epoch == 2 and restored.elapsed_s == 2.5
    np.testing.assert_array_equal(restored.state["w"], state["w"] + 1)
    damage(tmp_path / "g" / "2", "garbage")
    restored = checkpoint.GroupCheckpoints(tmp_path / "g", every=1).restore(abstract)
    assert restored.epoch == 1 and not (tmp_path / "g" / "2").exists()
    np.testing.assert_array_equal(restored.state["w"], state["w"])


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_sweep(tmp_path, tmp_path_factory):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    command = [sys.executable, str(HELPER), "--quiet", "--checkpoint_every=1", "--batch_sizes=16"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run([*command, f"--workdir={reference}"], env=env, check=True, capture_output=True)

    slow = {**env, "TINY_SWEEP_SAVE_DELAY": "0.5"}
    log = tmp_path / "interrupted.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([*command, f"--workdir={interrupted}"], env=slow,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 300
    while not any(p.name.isdigit() and int(p.name) >= 2
                  for p in (interrupted / sweep.CHECKPOINTS).glob("*/*")):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no checkpoint at epoch 2 after 300 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not csv_rows(interrupted)  # killed in the middle of the only group

    resumed = subprocess.run([*command, f"--workdir={interrupted}"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from the checkpoint at epoch" in resumed.stderr
    assert stable(csv_rows(interrupted)) == stable(csv_rows(reference))
    assert_no_duplicates(interrupted)


def test_sam_with_rho_zero_matches_sgd(tmp_path, finished):
    outcome = run(tmp_path, experiment="tiny_sam")
    assert outcome.exit_code == 0 and len(outcome.rows) == 4
    assert {r["rho"] for r in outcome.rows} == {"0.0", "0.05"}
    sgd = {(r["seed"]): r for r in finished[1].rows if r["batch_size"] == "16" and r["lr"] == "0.5"}
    for row in outcome.rows:
        assert row["optimizer"] == "sam" and row["sam_policy"] == "both"
        if row["rho"] == "0.0":
            for column in ("test_acc", "train_loss", "lambda_max"):
                assert float(row[column]) == pytest.approx(float(sgd[row["seed"]][column]),
                                                           rel=1e-4)


def test_group_models_take_their_batch_norm_and_dropout():
    settings = presets.resolve("tiny", "smoke", {"workdir": "w"}, tiny.EXPERIMENTS)
    config, _ = split_settings(settings)
    assert assemble.build_model(config, False, 0.5).dropout == 0.5
    assert assemble.build_model(config, False, 0.0).hidden == 16
    with pytest.raises(ConfigError, match="batch_norm"):
        assemble.build_model(config, True, 0.0)  # the MLP has no BatchNorm
    vgg, _ = split_settings({**settings, "model": "vgg11", "width": 0.25, "hidden": None})
    assert assemble.build_model(vgg, True, 0.0).batch_norm
    with pytest.raises(ConfigError, match="dropout"):
        assemble.build_model(vgg, False, 0.5)  # VGG11 has no dropout


def test_groups_share_everything_but_seed_lr_and_rho():
    settings = presets.resolve("tiny", "smoke", {"workdir": "w", "rhos": (0.0, 0.1),
                                                 "dropouts": (0.0, 0.2), "seeds": 3},
                               tiny.EXPERIMENTS)
    config, _ = split_settings({**settings, "optimizer": "sam"})
    groups = grid.plan_groups(config)
    assert [(g.batch_size, g.dropout) for g in groups] == [(16, 0.0), (16, 0.2), (32, 0.0),
                                                          (32, 0.2)]
    assert all(len(g.members) == 2 * 2 * 3 for g in groups)
    chunks = grid.plan_groups(config, max_members=5)
    assert [len(g.members) for g in chunks[:3]] == [5, 5, 2] and len(chunks) == 12
    keys = [grid.run_key(config, g, m) for g in groups for m in g.members]
    assert len(set(keys)) == len(keys) == 48
    assert len({grid.group_hash(config, g) for g in chunks}) == 12


def test_adaptive_sharpness_fills_its_column_and_changes_the_run_keys(tmp_path, finished):
    outcome = run(tmp_path, batch_sizes=(16,), adaptive_rho=0.1, adaptive_steps=2)
    assert outcome.exit_code == 0
    rows = csv_rows(tmp_path)
    default = {(r["batch_size"], r["lr"], r["seed"]): r for r in finished[1].rows}
    for row in rows:
        assert float(row["adaptive_sharpness"]) > 0
        assert row["adaptive_rho"] == "0.1" and row["adaptive_steps"] == "2"
        before = default[(row["batch_size"], row["lr"], row["seed"])]
        assert math.isnan(float(before["adaptive_sharpness"])) and before["adaptive_rho"] == ""
        assert row["config_hash"] != before["config_hash"]
        assert float(row["lambda_max"]) == pytest.approx(float(before["lambda_max"]), rel=1e-5)
    assert "adaptive_sharpness mean" in summary.table(rows)
    assert "adaptive_sharpness" not in summary.table(finished[1].rows)


def test_run_keys_leave_out_adaptive_settings_when_it_is_off():
    settings = presets.resolve("tiny", "smoke", {"workdir": "w"}, tiny.EXPERIMENTS)
    config, _ = split_settings(settings)
    group = grid.plan_groups(config)[0]
    assert not {"adaptive_rho", "adaptive_steps"} & set(
        grid.run_settings(config, group, group.members[0]))
