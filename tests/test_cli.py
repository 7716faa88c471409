"""The shared command line: flags, presets, and a clear error for each bad input."""

import json
from pathlib import Path

import pytest
import tiny_sweep as tiny

from flatjax import cli, plot, presets, sweep
from flatjax.config import CONFIG_FILE, ConfigError, split_settings


def error_of(capsys, argv, experiment="tiny") -> str:
    """The message of a command line that must be refused as bad input (exit code 2)."""
    assert tiny.run(argv, experiment) == 2
    err = capsys.readouterr().err
    assert "error: " in err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--lrs=0,0.1"], "learning rates must be positive and finite, got [0.0, 0.1]"),
    (["--lrs=-0.1"], "learning rates must be positive"),
    (["--batch_sizes=0,16"], "batch sizes must be positive integers"),
    (["--batch_sizes=1000"], "batch size 1000 exceeds the 96 training examples of synthetic"),
    (["--dropouts=1.0"], "dropout probabilities must be in [0, 1), got [1.0]"),
    (["--dropouts=-0.2"], "dropout probabilities must be in [0, 1)"),
    (["--rhos=0.1"], "rho is a SAM setting"),
    (["--lambda_subset=500"], "--lambda_subset=500 exceeds the 96 training examples"),
    (["--lambda_batch_norm=ghost"], "--lambda_batch_norm must be one of train, eval"),
    (["--lambda_tol=-1"], "--lambda_tol must be >= 0, got -1.0"),
    (["--adaptive_rho=-0.1"], "--adaptive_rho must be > 0 and finite (0: not measured), got -0.1"),
    (["--adaptive_rho=0.1", "--adaptive_steps=-1"], "--adaptive_steps must be >= 0, got -1"),
    (["--preset=huge"], "unknown preset 'huge' for experiment 'tiny'; known: smoke, cpu"),
    (["--platform=tpu"], "--platform=tpu was asked for, but JAX has no tpu backend here"),
])
def test_bad_input_is_refused_with_its_reason(tmp_path, capsys, argv, message):
    err = error_of(capsys, [f"--workdir={tmp_path / 'w'}", *argv])
    assert message in err
    assert not (tmp_path / "w").exists()  # a refused sweep leaves no workdir behind


def test_negative_rho_is_refused(tmp_path, capsys):
    err = error_of(capsys, [f"--workdir={tmp_path}", "--rhos=0,-0.1"], "tiny_sam")
    assert "rho must be >= 0, got [0.0, -0.1]" in err


def test_unknown_experiment_is_refused(capsys):
    assert cli.main("nope", ["--platform=cpu"], experiments=tiny.EXPERIMENTS) == 2
    assert "unknown experiment 'nope'; known: tiny, tiny_sam" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--platform=quantum"], "invalid choice: 'quantum'"),
    (["--lrs=0.1,fast"], "expected a comma-separated list of finite numbers, got '0.1,fast'"),
    (["--quiet=perhaps"], "expected true or false, got 'perhaps'"),
    (["--seeds=two"], "invalid int value: 'two'"),
    (["--train_subset=many"], "invalid int value: 'many'"),
    (["--lrs=0.1,inf"], "expected a comma-separated list of finite numbers, got '0.1,inf'"),
    (["--adaptive_rho=inf"], "expected a finite number, got 'inf'"),
    (["--width=nan"], "expected a finite number, got 'nan'"),
    (["--target_acc=high"], "expected a number, got 'high'"),
])
def test_malformed_flags_stop_with_usage(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        tiny.run(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_unwritable_workdir_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = error_of(capsys, [f"--workdir={blocker / 'w'}"])
    assert f"workdir {blocker / 'w'} is not writable" in err and "--workdir" in err


def test_a_workdir_in_use_is_refused(tmp_path, capsys):
    with sweep.workdir_lock(tmp_path):
        err = error_of(capsys, [f"--workdir={tmp_path}"])
    assert f"another sweep is running in {tmp_path}" in err


def tiny_config(workdir, **overrides):
    settings = presets.resolve("tiny", "smoke", {"workdir": workdir, **overrides},
                               tiny.EXPERIMENTS)
    return split_settings(settings)


def test_workdir_of_another_configuration_is_refused_unless_fresh(tmp_path, capsys):
    config, _ = tiny_config(tmp_path)
    sweep.claim_workdir(tmp_path, config, fresh=False)
    other, _ = tiny_config(tmp_path, lrs=(0.1,))
    sweep.check_configuration(tmp_path, other, fresh=False)  # no results yet: nothing to refuse
    (tmp_path / "results.csv").write_text("old results\n")
    err = error_of(capsys, [f"--workdir={tmp_path}", "--lrs=0.1", "--max_epochs=3"])
    assert "holds results of a different configuration" in err
    assert "lrs: [0.5, 1.0] -> [0.1]" in err and "max_epochs: 8 -> 3" in err
    assert "--fresh" in err

    sweep.check_configuration(tmp_path, other, fresh=True)
    sweep.claim_workdir(tmp_path, other, fresh=True)
    (archive,) = tmp_path.glob("replaced-*")
    assert (archive / "results.csv").read_text() == "old results\n"
    assert json.loads((archive / CONFIG_FILE).read_text())["lrs"] == [0.5, 1.0]
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["lrs"] == [0.1]
    assert not (tmp_path / "results.csv").exists()


def test_adaptive_steps_do_not_matter_while_adaptive_sharpness_is_off(tmp_path, capsys):
    config, _ = tiny_config(tmp_path, adaptive_rho=None, adaptive_steps=10)
    sweep.claim_workdir(tmp_path, config, fresh=False)
    (tmp_path / "results.csv").write_text("old results\n")
    other_steps, _ = tiny_config(tmp_path, adaptive_rho=None, adaptive_steps=3)
    sweep.check_configuration(tmp_path, other_steps, fresh=False)  # not refused
    measured, _ = tiny_config(tmp_path, adaptive_rho=0.1, adaptive_steps=3)
    with pytest.raises(ConfigError) as refused:
        sweep.check_configuration(tmp_path, measured, fresh=False)
    assert "adaptive_rho: None -> 0.1, adaptive_steps: None -> 3" in str(refused.value)
    assert "--adaptive_rho=0 keeps adaptive sharpness unmeasured" in str(refused.value)


def test_flags_override_the_preset_and_defaults_follow_the_platform():
    flags = {"lrs": (0.1, 0.2), "quiet": True, "platform": "cpu"}
    settings = cli.settings_from_flags("batch_lr", flags, "cpu", presets.EXPERIMENTS)
    config, options = split_settings(settings)
    assert config.preset == "cpu" and config.lrs == (0.1, 0.2) and options.quiet
    assert options.workdir == Path("runs/batch_lr_cpu")
    paper = cli.settings_from_flags("batch_lr", {}, "gpu", presets.EXPERIMENTS)
    assert paper["preset"] == "paper" and paper["train_subset"] is None


@pytest.mark.parametrize("name", list(presets.EXPERIMENTS))
def test_every_preset_is_a_valid_configuration(name):
    for preset in presets.EXPERIMENTS[name].presets:
        config, _ = split_settings(presets.resolve(name, preset, {"workdir": "w"}))
        assert config.experiment == name and config.figure in plot.FIGURES


def test_config_error_for_an_unknown_setting():
    with pytest.raises(ConfigError, match="unknown settings colour"):
        split_settings({"colour": "red"})


def test_ctrl_c_ends_with_a_resume_hint(tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    argv = ["--platform=cpu", "--preset=smoke", f"--workdir={tmp_path}"]
    assert cli.main("tiny", argv, experiments=tiny.EXPERIMENTS, load_data=interrupted) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "rerun the same command" in err and "Traceback" not in err
