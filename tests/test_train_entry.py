"""The MLproject train / train_ddp entry points: parameters to `cellseg train` options."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pipelines import train_entry
from pipelines.train_entry import ParameterError, train_args

ROOT = Path(__file__).resolve().parents[1]


def test_unset_parameters_are_not_passed():
    assert train_args({"data": "", "config": "", "epochs": "", "curriculum": ""}) == ["--quiet"]


def test_set_parameters_become_options():
    args = train_args({"data": "-odd dir", "config": "c.yaml", "epochs": "50", "batch_size": "8", "seed": "3",
                       "device": "cpu", "curriculum": "True", "register": "no"})
    assert args == ["--config=c.yaml", "--epochs=50", "--batch-size=8", "--seed=3", "--device=cpu",
                    "--curriculum", "--no-register", "--quiet", "--", "-odd dir"]


@pytest.mark.parametrize("value", ["ture", "y", "2", "maybe"])
def test_a_misspelt_flag_is_refused(value):
    with pytest.raises(ParameterError, match=f"-P curriculum={value}: expected true or false"):
        train_args({"curriculum": value})


@pytest.mark.parametrize(
    "argv, message",
    [(["--entry", "train", "--register=maybe"], "-P register=maybe: expected true or false"),
     (["--entry", "train", "--experiment", "x"], "mlflow run --experiment-name x"),
     (["--entry", "train_ddp", "--nproc=0"], "-P nproc=0: expected a number of processes"),
     (["--entry", "train_ddp", "--nproc="], "-P nproc=: expected a number of processes"),
     (["--entry", "train", "--data=", "--nproc", "4"], "-P nproc: not a parameter of -e train (-e train_ddp takes nproc)"),
     (["--entry", "train", "--data=", "--epoch", "5"], "-P epoch: not a parameter of -e train (expected one of: data, config, epochs,"),
     (["--entry", "train", "--epochs=abc"], "-P epochs=abc: expected a whole number"),
     (["--entry", "train_ddp", "--nproc=2", "--batch-size=2.5"], "-P batch_size=2.5: expected a whole number")],
)
def test_bad_parameters_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_entry.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def _launched(monkeypatch, entry: str, params: dict) -> list[str]:
    """The command MLproject's entry point runs for these -P values, as far as the exec."""
    from mlflow.projects._project_spec import load_project

    cmd = load_project(str(ROOT)).get_entry_point(entry).compute_command(params, str(ROOT))
    argv = shlex.split(cmd)
    assert argv[:3] == ["python", "-m", "pipelines.train_entry"]
    launched = {}
    monkeypatch.setattr(train_entry.os, "execv", lambda exe, args: launched.update(args=args))
    monkeypatch.setattr(train_entry.os, "execve", lambda exe, args, env: launched.update(args=args, env=env))
    train_entry.main(argv[3:])
    return launched


def test_mlproject_train_passes_values_with_spaces_dashes_and_negatives(monkeypatch):
    launched = _launched(monkeypatch, "train", {"data": "/my data/-x", "config": "-c.yaml", "seed": "-1", "curriculum": "true",
                                                "channel": "1.0"})
    assert launched["args"][1:] == ["-m", "cellseg", "train", "--config=-c.yaml", "--seed=-1", "--channel=1", "--curriculum",
                                    "--quiet", "--", "/my data/-x"]


@pytest.mark.parametrize(
    "argv, message",
    [(["--entry", "train", "--data=", "--entry", "train_ddp", "--nproc", "4"], "-P entry: not a parameter"),
     (["--entry", "train", "--data=", "--nproc", "--x"], "argument --nproc: expected one argument")],
)
def test_parameters_that_would_change_the_entry_or_confuse_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_entry.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("entry", ["main", "experiments"])
def test_pipeline_entries_pass_a_data_path_starting_with_a_dash(entry):
    from mlflow.projects._project_spec import load_project

    cmd = load_project(str(ROOT)).get_entry_point(entry).compute_command({"data": "-odd/dir"}, str(ROOT))
    assert '--data="$d"' in cmd and "d=-odd/dir;" in cmd


def test_pipeline_options_fail_in_one_line_naming_the_mlproject_parameter(capsys):
    from pipelines import experiments, main

    for module, argv, param in ((main, ["--epochs", "abc"], "-P epochs"), (experiments, ["--epochs", "1.5"], "-P budget_epochs"),
                                (experiments, ["--steps-per-epoch", "x"], "-P budget_steps")):
        with pytest.raises(SystemExit) as exc:
            module.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: argument ") and err.count("\n") == 1, err
        assert f"expected a whole number ({param} of the MLproject entry point)" in err
    assert train_args({"epochs": "20.0", "seed": "-1"}) == ["--epochs=20", "--seed=-1", "--quiet"]  # MLproject floats


def test_whole_number_takes_mlproject_floats():
    import argparse

    from pipelines.common import whole_number

    assert whole_number("20") == 20 and whole_number("20.0") == 20  # MLproject float parameters arrive as '20.0'
    for bad in ("1.5", "ten", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a whole number"):
            whole_number(bad)
    assert whole_number("1e3") == 1000
    with pytest.raises(argparse.ArgumentTypeError, match="'1e30': too large"):  # not 1000000000000000019884624838656
        whole_number("1e30")


@pytest.mark.parametrize("module", ["main", "experiments"])
def test_pipelines_name_a_mistyped_tracking_uri_in_one_line(module, tmp_path, monkeypatch, capsys):
    import importlib

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    pipeline = importlib.import_module(f"pipelines.{module}")
    args = ["--epochs", "1.0", "--tracking-uri", "sqllite:///x.db"]
    with pytest.raises(SystemExit) as exc:
        pipeline.main(args + (["--output", str(tmp_path / "m.onnx")] if module == "main" else []))
    message = capsys.readouterr().err
    assert exc.value.code == 2 and message.startswith("error: ") and "sqllite:///x.db" in message and message.count("\n") == 1, message
    assert not (tmp_path / "m.onnx").exists()


def test_pipeline_main_checks_its_output_before_training(tmp_path, monkeypatch, capsys):
    from pipelines import main as pipeline

    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "notes.onnx"
    foreign.write_text("not a model")
    with pytest.raises(SystemExit) as exc:
        pipeline.main(["--output", str(foreign), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"error: {foreign}: exists and is not a cellseg model; refusing to overwrite it (choose another --output)\n"
    assert foreign.read_text() == "not a model" and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("module, params", [("main", "data, epochs"), ("experiments", "data, budget_epochs, budget_steps")])
def test_an_undeclared_mlproject_parameter_names_the_declared_ones(module, params, capsys):
    """`mlflow run -e experiments -P budget=1` appends `--budget 1`: the error lists what -P takes."""
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(f"pipelines.{module}").main(["--budget", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err == f"error: unrecognized arguments: --budget 1 (under `mlflow run`, this entry point takes -P {params})\n"
