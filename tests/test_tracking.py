"""lambda_max tracked during training: warm starts, vmap, the conditional, resume, sweep outputs."""

import json
import struct
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_sweep as tiny

from flatjax import checkpoint, grid, hessian, results, sweep
from flatjax import train as T
from flatjax.config import CONFIG_FILE, split_settings
from flatjax.presets import resolve

SEEDS = [0, 1]
BATCH, EPOCHS = 16, 5  # 64 examples: 4 steps per epoch
TRACKING = T.Tracking(every=4, subset_size=None, num_iters=40)  # one measurement per epoch end


class MLP(nn.Module):
    """Flatten -> Dense(16) -> ReLU -> Dense(3)."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(3)(nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1))))


class Data(NamedTuple):
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def make_data(n_train=64, n_test=32, classes=3) -> Data:
    """Gaussian inputs (N, 2, 2, 2) labelled by a random linear teacher."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_train + n_test, 2, 2, 2)).astype(np.float32)
    y = (x.reshape(len(x), -1) @ rng.normal(size=(8, classes))).argmax(-1).astype(np.int32)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


DATA = make_data()


def train(seeds=SEEDS, **kwargs):
    args = {"batch_size": BATCH, "lrs": [0.3] * len(seeds), "seeds": seeds,
            "max_epochs": EPOCHS, "target_acc": 1.0, "tracking": TRACKING, "progress": False}
    return T.train(MLP(), DATA, **{**args, **kwargs})


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def tracked():
    """Both seeds trained together with tracking, every epoch's state recorded."""
    states = {}

    def record(state, _):
        states[int(np.max(state.epoch))] = host(state)

    return train(callback=record), states


def cold(params):
    """The paper's lambda_max at `params`, from the random start."""
    return hessian.lambda_max(MLP(), {"params": params}, DATA.x_train, DATA.y_train,
                              batch_size=BATCH, subset_size=None, num_iters=TRACKING.num_iters)


def test_warm_started_tracker_matches_cold_solves_in_fewer_hvps(tracked):
    result, states = tracked
    traj = result.trajectory
    assert result.status == ["not_converged"] * 2
    np.testing.assert_array_equal(traj.step, [4, 8, 12, 16, 20])
    np.testing.assert_array_equal(traj.epoch, [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(traj.count, [EPOCHS, EPOCHS])
    assert traj.converged.all()
    for i in range(len(SEEDS)):
        for j, epoch in enumerate(traj.epoch):
            solve = cold(jax.tree.map(lambda a, i=i: a[i], states[epoch].params))
            np.testing.assert_allclose(traj.eigenvalue[i, j], solve.eigenvalue, rtol=1e-4)
            if j == 0:  # the first measurement is a cold start
                assert traj.num_hvps[i, j] == solve.num_hvps
            else:
                assert traj.num_hvps[i, j] < solve.num_hvps, (i, j)
    # The last measurement is at the final weights; the tracker keeps its eigenvector.
    final = cold(result.member_variables(1)["params"])
    v = jax.tree.map(lambda a: a[1], result.state.tracker.eigenvector)
    overlap = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v),
                                                  jax.tree.leaves(final.eigenvector)))
    assert abs(float(overlap)) == pytest.approx(1.0, abs=1e-3)


def test_vmapped_members_equal_each_member_tracked_alone(tracked):
    result, _ = tracked
    for i, seed in enumerate(SEEDS):
        alone = train(seeds=[seed]).trajectory
        np.testing.assert_allclose(alone.eigenvalue[0], result.trajectory.eigenvalue[i],
                                   rtol=1e-5)
        np.testing.assert_allclose(alone.num_hvps[0], result.trajectory.num_hvps[i], atol=1)


def test_tracking_leaves_training_unchanged_and_off_adds_nothing(tracked):
    result, _ = tracked
    untracked = train(tracking=None)
    assert untracked.trajectory is None and untracked.state.tracker is None
    assert_trees_equal(host(untracked.variables), host(result.variables))
    assert_trees_equal(host(untracked.history), host(result.history))
    never = train(tracking=T.Tracking(every=10**6, subset_size=None))  # past the last step
    assert never.trajectory.step.size == 0 and not never.trajectory.count.any()
    assert_trees_equal(host(never.variables), host(result.variables))


def sub_jaxprs(eqn):
    """The jaxprs in an equation's parameters (scan and while bodies, cond branches, ...)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            item = getattr(item, "jaxpr", item)
            if hasattr(item, "eqns"):
                yield item


def eqns_named(jaxpr, name):
    """Every equation of primitive `name` in `jaxpr`, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            yield eqn
        for sub in sub_jaxprs(eqn):
            yield from eqns_named(sub, name)


def measuring_conds(tracking):
    """The conds inside the vmapped epoch's scan that hold a while loop (a solver)."""
    config = T.TrainConfig(BATCH, EPOCHS, tracking=tracking)
    programs = T.compile_programs(MLP(), T.SGD, config)
    hparams = T.member_hparams([0.3, 0.3], None, 2)
    state = programs.init(np.asarray(SEEDS, np.int32), hparams, DATA.x_train, DATA.y_train)
    subset = None if tracking is None else (DATA.x_train, DATA.y_train)
    jaxpr = jax.make_jaxpr(programs.epoch)(state, DATA.x_train, DATA.y_train, 0, subset).jaxpr
    return [cond for scan in eqns_named(jaxpr, "scan")
            for body in sub_jaxprs(scan) for cond in eqns_named(body, "cond")
            if any(True for branch in sub_jaxprs(cond) for _ in eqns_named(branch, "while"))]


def test_measurements_are_a_real_conditional_with_one_entry_each(tracked):
    # Under vmap a cond with a batched predicate becomes a select that runs both branches; the
    # measurement stays a cond because its predicate (the global step) is shared.
    assert len(measuring_conds(TRACKING)) == 1
    assert not measuring_conds(None)
    # One history entry per measured step, NaN/0/False after the member stopped.
    result = train(tracking=T.Tracking(every=3, subset_size=32, num_iters=40), drop_last=False,
                   batch_size=24, lrs=[0.3, 50.0], max_epochs=4)  # 3 steps per epoch
    traj = result.trajectory
    np.testing.assert_array_equal(traj.step, [3, 6, 9, 12])
    np.testing.assert_array_equal(traj.epoch, [1, 2, 3, 4])
    assert result.status[1] == "diverged"
    np.testing.assert_array_equal(traj.count, result.epochs)
    assert np.all(np.isfinite(traj.eigenvalue[0])) and np.all(traj.num_hvps[0] > 0)
    last = result.epochs[1]
    assert np.all(np.isnan(traj.eigenvalue[1, last:])) and not traj.converged[1, last:].any()
    np.testing.assert_array_equal(traj.num_hvps[1, last:], 0)


def test_non_finite_weights_end_a_solve_at_once():
    params, curvature = {"w": jnp.ones(8)}, jnp.array([1.0] * 7 + [10.0])
    for method in ("lanczos", "power"):
        r = jax.vmap(lambda scale, method=method: hessian.top_eigenvalue(
            lambda p: scale * jnp.sum(curvature * p["w"] ** 2), params, method=method,
            num_iters=50))(jnp.array([1.0, jnp.nan]))
        assert np.isnan(r.eigenvalue[1]) and not r.converged[1] and int(r.num_hvps[1]) == 2
        assert r.converged[0] and float(r.eigenvalue[0]) == pytest.approx(20.0, rel=1e-4)


def test_resumed_run_tracks_like_an_uninterrupted_one(tracked):
    result, states = tracked
    resumed = train(state=jax.tree.map(jnp.asarray, states[2]))
    assert_trees_equal(host(resumed.state.tracker), host(result.state.tracker))
    with pytest.raises(ValueError, match="tracking on"):
        train(tracking=None, state=states[2])
    with pytest.raises(ValueError, match="tracking interval"):
        train(tracking=T.Tracking(every=2, subset_size=None), state=states[2])


OldState = NamedTuple("OldState", [(f, object) for f in T.TrainState._fields if f != "tracker"])


def test_checkpoints_restore_with_and_without_a_tracker(tracked, tmp_path):
    _, states = tracked
    on = states[3]
    off = on._replace(tracker=None)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    for name, saved, abstract in (("on", on, on), ("off", off, off),
                                  ("before_tracking", OldState(*off[:-1]), off)):
        ckpt = checkpoint.GroupCheckpoints(tmp_path / name, every=1)
        ckpt.save(saved, 3, 1.0)
        ckpt.close()
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                              abstract)
        restored = checkpoint.GroupCheckpoints(tmp_path / name, every=1).restore(shapes)
        assert restored is not None and type(restored.state) is T.TrainState, name
        assert_trees_equal(host(restored.state), abstract)


@pytest.fixture(scope="module")
def tracked_sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tracked")
    code = tiny.run([f"--workdir={workdir}", "--quiet", "--track_every=2", "--batch_sizes=16"])
    return workdir, code


def test_sweep_writes_trajectory_csv_and_figure(tracked_sweep, monkeypatch):
    workdir, code = tracked_sweep
    assert code == 0
    runs = {results.row_key(r): r for r in results.read_rows(workdir / results.FILENAME)}
    path = workdir / results.TRAJECTORY_FILENAME
    rows = results.read_rows(path, results.trajectory_key)
    assert path.read_text().splitlines()[0] == ",".join(results.TRAJECTORY_COLUMNS)
    assert len(path.read_text().splitlines()) == len(rows) + 1
    expected = 0
    for key, run in runs.items():
        steps_per_epoch = tiny.N_TRAIN // int(run["batch_size"])
        count = int(run["epochs"]) * steps_per_epoch // 2
        mine = sorted((r for r in rows if results.row_key(r) == key), key=lambda r: int(r["step"]))
        assert [int(r["step"]) for r in mine] == [2 * (j + 1) for j in range(count)]
        assert [int(r["epoch"]) for r in mine] == [
            -(-2 * (j + 1) // steps_per_epoch) for j in range(count)]
        for r in mine:
            assert float(r["lambda_max"]) > 0 and int(r["num_hvps"]) > 0
            assert r["converged"] in ("True", "False") and r["group_hash"] == run["group_hash"]
            assert (r["lr"], r["batch_size"]) == (run["lr"], run["batch_size"])
        expected += count
    assert len(rows) == expected and len(runs) == 4
    png = (workdir / "trajectory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24])[0] > 500
    # A rerun trains nothing and duplicates nothing.
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("trained again"))
    before = path.read_text()
    assert tiny.run([f"--workdir={workdir}", "--quiet", "--track_every=2",
                     "--batch_sizes=16"]) == 0
    assert path.read_text() == before


def test_tracking_does_not_change_run_hashes_and_old_configs_resume(tracked_sweep, tmp_path):
    workdir, _ = tracked_sweep
    settings = resolve("tiny", "smoke", {"workdir": tmp_path, "batch_sizes": (16,)},
                       tiny.EXPERIMENTS)
    untracked, _ = split_settings(settings)
    keys = {grid.run_key(untracked, g, m) for g in grid.plan_groups(untracked) for m in g.members}
    assert keys == {results.row_key(r) for r in results.read_rows(workdir / results.FILENAME)}
    # A workdir written before track_every existed is the same configuration as track_every=0.
    old = {k: v for k, v in untracked.to_json().items() if k != "track_every"}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(old))
    (tmp_path / results.FILENAME).write_text(results.to_csv([]))
    assert sweep.config_differences(tmp_path, untracked) == ""
    tracked_config, _ = split_settings({**settings, "track_every": 2})
    assert "track_every" in sweep.config_differences(tmp_path, tracked_config)


def test_negative_track_every_is_refused(tmp_path, capsys):
    assert tiny.run([f"--workdir={tmp_path / 'w'}", "--quiet", "--track_every=-1"]) == 2
    assert "--track_every must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
