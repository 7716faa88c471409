"""Figures from results.csv: `python -m flatjax.plot WORKDIR`, and the data the panels show."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from flatjax import plot, results, summary
from flatjax.config import CONFIG_FILE

LRS = (0.01, 0.1, 1.0)
BATCH_SIZES = (100, 1000)
SEEDS = (0, 1, 2)


def status_of(batch_size, lr, seed):
    """A grid with every case the figure distinguishes."""
    if batch_size == 100 and lr == 1.0:
        return "diverged"
    if batch_size == 1000 and lr == 0.1 and seed == 1:
        return "failed"
    if batch_size == 1000 and lr == 0.01 and seed == 2:
        return "not_converged"
    return "converged"


def make_row(batch_size, lr, seed):
    status = status_of(batch_size, lr, seed)
    finite = status in ("converged", "not_converged")
    return {
        "experiment": "batch_lr", "seed": seed, "batch_size": batch_size, "lr": lr,
        "batch_norm": False, "dropout": 0.0, "rho": 0.0, "status": status,
        "test_acc": 0.5 + lr / 10 + seed / 100 - batch_size / 1e5 if finite else None,
        "lambda_max": (1.0 + seed) / lr if finite else float("nan"),
        "config_hash": f"{batch_size}-{lr}",
    }


@pytest.fixture
def workdir(tmp_path):
    rows = [make_row(b, lr, s) for b in BATCH_SIZES for lr in LRS for s in SEEDS]
    results.append_rows(tmp_path / results.FILENAME, rows)
    config = {"experiment": "batch_lr", "preset": "smoke", "figure": "batch_lr",
              "dataset": "cifar10", "model": "vgg11", "width": 0.0625, "hidden": None,
              "train_subset": 256, "seeds": 3}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    return tmp_path


def expected_means(batch_size, metric):
    """{lr: mean over the seeds that trained} from the generating formulas."""
    means = {}
    for lr in LRS:
        values = [make_row(batch_size, lr, s)[metric] for s in SEEDS
                  if status_of(batch_size, lr, s) in summary.TRAINED]
        if values:
            means[lr] = np.mean(values)
    return means


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24]), len(data)


def test_module_command_draws_the_png(workdir):
    done = subprocess.run([sys.executable, "-m", "flatjax.plot", str(workdir)],
                          capture_output=True, text=True, check=True)
    png = workdir / "batch_lr.png"
    assert done.stdout.strip() == str(png)
    (width, height), size = png_size(png)
    assert width >= 1000 and height >= 400 and size > 20_000


def test_panels_show_the_means_over_seeds(workdir):
    rows = results.read_rows(workdir / results.FILENAME)
    fig = plot.draw(rows, plot.FIGURES["batch_lr"])
    acc, lam = fig.axes
    assert acc.get_xscale() == "log" and lam.get_xscale() == "log" and lam.get_yscale() == "log"
    for ax, metric in ((acc, "test_acc"), (lam, "lambda_max")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for index, batch_size in enumerate(BATCH_SIZES):
            line = lines[f"batch size {batch_size}"]
            expected = expected_means(batch_size, metric)
            np.testing.assert_allclose(line.get_xdata(), list(expected))
            np.testing.assert_allclose(line.get_ydata(), list(expected.values()), rtol=1e-12)
            assert to_rgba(line.get_color()) == to_rgba(f"C{index}")
    for ax in (acc, lam):  # one labelled tick per grid LR, no minor-tick labels to overlap them
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"{lr:g}" for lr in sorted(LRS)]
        assert not ax.get_xticklabels(minor=True)
    eos = {line.get_label(): line for line in lam.get_lines()}["2 / LR"]
    np.testing.assert_allclose(eos.get_ydata(), 2 / eos.get_xdata())
    assert eos.get_xdata().min() == min(LRS) and eos.get_xdata().max() == max(LRS)


def test_markers_show_unconverged_and_diverged_points(workdir):
    rows = results.read_rows(workdir / results.FILENAME)
    fig = plot.draw(rows, plot.FIGURES["batch_lr"])
    acc = fig.axes[0]
    hollow = [line for line in acc.get_lines() if line.get_marker() == "o"
              and line.get_linestyle() == "None" and len(line.get_xdata())]
    assert [list(line.get_xdata()) for line in hollow] == [[0.01]]  # bs 1000, one seed unconverged
    assert hollow[0].get_markerfacecolor() == "white"
    crosses = [line for line in acc.get_lines() if line.get_marker() == "x"]
    assert [list(line.get_xdata()) for line in crosses] == [[1.0]]  # bs 100, all diverged
    assert "Excluded: 3 diverged, 1 failed runs." in fig._supxlabel.get_text()


def test_caption_counts_trained_runs_without_a_finite_lambda_max(workdir):
    rows = results.read_rows(workdir / results.FILENAME)
    spec = plot.FIGURES["batch_lr"]
    assert "lambda_max (left out" not in plot.draw(rows, spec)._supxlabel.get_text()
    broken = [dict(r) for r in rows]
    trained = [r for r in broken if r["status"] in ("converged", "not_converged")]
    trained[0]["lambda_max"], trained[1]["lambda_max"] = "inf", "nan"
    caption = plot.draw(broken, spec)._supxlabel.get_text()
    assert "2 trained runs have no finite lambda_max (left out of its panels)." in caption


def test_a_long_note_is_wrapped_under_the_figure(workdir):
    rows = results.read_rows(workdir / results.FILENAME)
    note = " ".join(["a long note"] * 60)
    caption = plot.draw(rows, plot.FIGURES["batch_lr"], note=note)._supxlabel.get_text()
    lines = caption.splitlines()
    assert len(lines) >= 4 and max(map(len, lines)) <= plot.CAPTION_WIDTH
    assert " ".join(lines[1:]) == note


def test_summary_table_lists_each_grid_point():
    rows = [{k: results.format_value(v) for k, v in make_row(b, lr, s).items()}
            for b in BATCH_SIZES for lr in LRS for s in SEEDS]
    lines = summary.table(rows).splitlines()
    assert lines[0].split()[:3] == ["batch_size", "lr", "runs"] and len(lines) == 7
    assert lines[3].split()[:2] == ["100", "1"] and lines[3].endswith("3 div")
    assert lines[5].split() == ["1000", "0.1", "3", "0.51", "(0.5-0.52)", "20", "(10-30)", "2",
                                "conv", "1", "FAILED"]


def test_plot_of_a_folder_without_results_is_an_error(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 1
    assert "is not a sweep workdir" in capsys.readouterr().err
    (tmp_path / CONFIG_FILE).write_text("{}")  # a sweep that has not finished a run
    assert plot.main([str(tmp_path)]) == 1
    assert f"the sweep in {tmp_path} has not finished a run yet" in capsys.readouterr().err
    assert plot.main([]) == 2


@pytest.mark.parametrize("text, message", [("{", "is not valid JSON"),
                                           ('{"figure": "batch_lr"}', "lacks experiment")])
def test_plot_names_a_broken_config(tmp_path, capsys, text, message):
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "results.csv").write_text("experiment\n")
    assert plot.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "config.json") in err and message in err
