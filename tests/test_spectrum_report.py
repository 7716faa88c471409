"""experiments/spectrum.py end to end (smoke preset, synthetic Fashion-MNIST): files and math."""

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from flatjax import hessian, presets
from flatjax import spectrum_report as report_lib
from flatjax.data import strided_subset
from flatjax.losses import cross_entropy

SCRIPT = Path(__file__).parents[1] / "experiments" / "spectrum.py"
N_TRAIN, N_TEST = 1000, 200
RTOL = 1e-3  # float32 Lanczos and power iteration on the same Hessian
STDERRS = 4.0  # estimates of one trace agree within this many combined standard errors


def write_synthetic(root: Path) -> Path:
    """A Fashion-MNIST-shaped .npz under root/fashion_mnist: uint8 noise images, labels from a
    fixed random linear teacher."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(N_TRAIN + N_TEST, 28, 28), dtype=np.uint8)
    y = ((x.reshape(len(x), -1) / 255 - 0.5) @ rng.normal(size=(784, 10))).argmax(-1)
    (root / "fashion_mnist").mkdir()
    np.savez(root / "fashion_mnist" / "synthetic.npz", x_train=x[:N_TRAIN], y_train=y[:N_TRAIN],
             x_test=x[N_TRAIN:], y_test=y[N_TRAIN:])
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, data_dir):
    """The smoke preset through `main`: (exit code, printed text, Report, workdir, its JSON)."""
    workdir = tmp_path_factory.mktemp("spectrum")
    reports = []
    run = report_lib.run

    def keep(*args, **kwargs):
        reports.append(run(*args, **kwargs))
        return reports[-1]

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setattr(report_lib, "run", keep)
        code = report_lib.main(["--platform=cpu", "--preset=smoke", f"--data_dir={data_dir}",
                                f"--workdir={workdir}", "--quiet"])
    summary = json.loads((workdir / report_lib.JSON_FILE).read_text(),
                         parse_constant=lambda c: pytest.fail(f"{c} in spectrum.json"))
    return code, printed.getvalue(), reports[0], workdir, summary


def test_smoke_run_writes_every_output_atomically_and_prints_the_table(smoke):
    code, printed, _, workdir, summary = smoke
    assert code == 0
    names = {p.name for p in workdir.iterdir()}
    assert names == {"spectrum.json", "density.csv", "layers.csv", "spectrum.png"}  # no temp files
    assert "lambda_max" in printed and "trace, Hutch++" in printed and "layer Dense_0" in printed
    assert summary["settings"] == {**report_lib.PRESETS["smoke"], "preset": "smoke"}
    assert summary["loss"] == {"examples": 200, "chunk": 100, "batch_norm": "none",
                               "dropout": "off", "num_params": 784 * 32 + 32 + 33 * 32 + 33 * 10}
    assert 0 <= summary["training"]["train_acc"] <= 1 and 0 <= summary["training"]["test_acc"] <= 1
    assert summary["edge_of_stability"] == 2 / 0.1
    for key in ("lambda_max", "trace_hutchinson", "trace_hutchpp", "density", "layers",
                "adaptive_sharpness"):
        assert summary[key]["wall_s"] > 0


def read_columns(path: Path) -> dict[str, np.ndarray]:
    header, *rows = [line.split(",") for line in path.read_text().splitlines()]
    return {name: np.array([row[i] for row in rows]) for i, name in enumerate(header)}


def test_density_integrates_to_one_over_its_grid(smoke):
    *_, workdir, summary = smoke
    columns = read_columns(workdir / report_lib.DENSITY_FILE)
    grid, density = columns["eigenvalue"].astype(float), columns["density"].astype(float)
    assert len(grid) == summary["density"]["grid_points"] and np.all(np.diff(grid) > 0)
    assert np.all(density >= 0)
    # The grid reaches 6 sigma past the extreme nodes (2e-9 of the mass beyond) with about 9
    # points per sigma: the trapezoid rule is exact to float32 rounding.
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    assert grid[0] < summary["density"]["smallest_node"] < summary["density"]["largest_node"]
    assert summary["density"]["largest_node"] < grid[-1]


def test_lambda_max_matches_power_iteration_on_a_loss_built_here(smoke):
    """The same Hessian from an unchunked loss over the strided subset, by another method."""
    _, _, report, _, summary = smoke
    x, y = strided_subset(report.dataset.x_train, report.dataset.y_train, 200)

    def loss(params):
        return cross_entropy(report.model.apply({"params": params}, x), y)

    direct = hessian.top_eigenvalue(loss, report.variables["params"], method="power",
                                    num_iters=3000)
    assert bool(direct.converged)
    assert summary["lambda_max"]["converged"]
    assert summary["lambda_max"]["value"] == pytest.approx(float(direct.eigenvalue), rel=RTOL)


def test_slq_nodes_and_layer_blocks_lie_below_lambda_max(smoke):
    """Ritz values lie in [lambda_min, lambda_max]; a diagonal block's top eigenvalue is a
    Rayleigh quotient of the whole Hessian (Cauchy interlacing), so at most lambda_max, whether
    or not the Hessian is definite."""
    *_, workdir, summary = smoke
    bound = summary["lambda_max"]["value"] * (1 + RTOL)
    assert summary["density"]["largest_node"] <= bound
    layers = read_columns(workdir / report_lib.LAYERS_FILE)
    assert list(layers["layer"]) == ["Dense_0", "Dense_1", "Dense_2"]
    assert np.all(layers["top_eigenvalue"].astype(float) <= bound)
    assert np.all(layers["converged"] == "True")
    assert layers["block_size"].astype(int).sum() == summary["loss"]["num_params"]
    assert layers["num_hvps"].astype(int).sum() == summary["layers"]["num_hvps"]


def test_trace_estimates_agree_within_their_standard_errors(smoke):
    *_, summary = smoke
    hutchinson, hutchpp = summary["trace_hutchinson"], summary["trace_hutchpp"]
    slq = {"value": summary["density"]["trace"], "stderr": summary["density"]["trace_stderr"]}
    for other in (hutchinson, slq):
        spread = STDERRS * np.hypot(other["stderr"], hutchpp["stderr"])
        assert abs(other["value"] - hutchpp["value"]) <= spread
    assert hutchinson["num_hvps"] == hutchpp["num_hvps"] == 30


def test_adaptive_sharpness_is_a_loss_rise(smoke):
    *_, summary = smoke
    adaptive = summary["adaptive_sharpness"]
    assert adaptive["value"] >= 0
    assert adaptive["value"] == pytest.approx(adaptive["perturbed_loss"] - adaptive["loss"])
    assert adaptive["num_gradients"] == 6


def test_figure_decodes_to_a_drawn_image(smoke):
    *_, workdir, _ = smoke
    pixels = image.imread(workdir / report_lib.FIGURE_FILE)[..., :3]
    assert pixels.shape[0] >= 500 and pixels.shape[1] >= 1200
    colors = np.unique((pixels * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 50
    lambda_max_red, bar_blue = (214, 39, 40), (31, 119, 180)  # matplotlib's C3 and C0
    for color in (lambda_max_red, bar_blue):
        assert np.any(np.all(colors == color, axis=1))


def test_a_failing_output_leaves_the_previous_outputs_whole(smoke, tmp_path, monkeypatch):
    _, _, report, workdir, _ = smoke
    before = {p.name: p.read_bytes() for p in workdir.iterdir()}
    for name, content in before.items():
        (tmp_path / name).write_bytes(content)

    def broken(report):
        raise ValueError("Axis limits cannot be NaN or Inf")

    monkeypatch.setattr(report_lib, "draw", broken)
    with pytest.raises(ValueError, match="Axis limits"):
        report_lib.write_outputs(report, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_cpu_preset_is_the_batch_lr_cpu_setup_at_lr_0_1():
    config, options = report_lib.resolve({})
    batch_lr = {**presets.BATCH_LR.base, **presets.BATCH_LR.presets["cpu"]}
    for name in ("dataset", "model", "width", "train_subset", "max_epochs", "target_acc",
                 "lambda_iters"):
        assert getattr(config, name) == batch_lr[name]
    # The measures take many HVPs each, so they may use fewer examples than the batch_lr loss.
    assert 0 < config.lambda_subset <= batch_lr["lambda_subset"]
    assert config.batch_size in batch_lr["batch_sizes"] and config.lr in batch_lr["lrs"]
    assert options == {"workdir": report_lib.DEFAULT_WORKDIR, "data_dir": None, "quiet": False}
    assert report_lib.resolve({"model": "mlp"})[0].width is None  # the preset's VGG width


def error_of(capsys, argv) -> str:
    assert report_lib.main(["--platform=cpu", "--preset=smoke", *argv]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--dataset=mnist"], "--dataset must be one of cifar10, fashion_mnist, got 'mnist'"),
    (["--model=resnet"], "--model must be one of vgg11, mlp, got 'resnet'"),
    (["--probes=0"], "--probes must be an integer >= 1, got 0"),
    (["--slq_iters=-2"], "--slq_iters must be an integer >= 1, got -2"),
    (["--trace_hvps=2"], "--trace_hvps must be an integer >= 3, got 2"),
    (["--lr=0"], "--lr must be > 0, got 0.0"),
    (["--sigma_fraction=-1"], "--sigma_fraction must be > 0, got -1.0"),
    (["--sigma_fraction=1e-4"], "--sigma_fraction must be >= 0.002 (a narrower Gaussian falls "
                                "between the 1000 points of the density's grid), got 0.0001"),
    (["--width=0.5"], "--width does not apply to --model=mlp (it takes --hidden); drop --width"),
    (["--batch_norm"], "--batch_norm does not apply to --model=mlp"),
    (["--preset=huge"], "unknown preset 'huge'; known: cpu, smoke"),
    (["--lambda_subset=600"], "--lambda_subset=600 exceeds the 500 training examples of "
                              "fashion_mnist; lower it"),
    (["--batch_size=501"], "--batch_size=501 exceeds the 500 training examples"),
    (["--platform=tpu"], "--platform=tpu was asked for, but JAX has no tpu backend here"),
])
def test_bad_flags_are_refused_naming_the_flag(tmp_path, capsys, data_dir, argv, message):
    err = error_of(capsys, [f"--data_dir={data_dir}", f"--workdir={tmp_path / 'w'}", *argv])
    assert f"error: {message}" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr=inf"], "expected a finite number, got 'inf'"),
    (["--sigma_fraction=nan"], "expected a finite number, got 'nan'"),
    (["--train_subset=all"], "invalid int value: 'all'"),
])
def test_malformed_flags_stop_with_usage(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        report_lib.main(["--platform=cpu", "--preset=smoke", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_is_refused(tmp_path, capsys):
    err = error_of(capsys, [f"--data_dir={tmp_path / 'none'}", f"--workdir={tmp_path / 'w'}"])
    assert "error: could not load dataset 'fashion_mnist'" in err and "is not a folder" in err


def test_diverged_training_exits_1_with_its_reason(tmp_path, capsys, data_dir):
    code = report_lib.main(["--platform=cpu", "--preset=smoke", f"--data_dir={data_dir}",
                            f"--workdir={tmp_path}", "--lr=1e6", "--quiet"])
    assert code == 1
    assert "training diverged at --lr=1e+06" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_script_refuses_a_bad_flag_with_exit_code_2():
    done = subprocess.run([sys.executable, str(SCRIPT), "--platform=cpu", "--probes=0"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "error: --probes must be an integer >= 1, got 0" in done.stderr


def test_the_loss_chunk_is_at_most_the_measured_subset(smoke):
    report = smoke[2]
    assert report_lib.loss_examples(report) == (200, 100)
    small = report._replace(config=dataclasses.replace(report.config, lambda_subset=50))
    assert report_lib.loss_examples(small) == (50, 50)
    assert "50 strided train examples in chunks of 50," in report_lib.caption_of(small)
