"""The MLproject train / train_ddp entry points: parameters to `cellseg train` options."""

from __future__ import annotations

import pytest

from pipelines import train_entry
from pipelines.train_entry import ParameterError, train_args


def test_unset_parameters_are_not_passed():
    assert train_args({"data": "", "config": "", "epochs": "", "curriculum": ""}) == ["--quiet"]


def test_set_parameters_become_options():
    args = train_args({"data": "d", "config": "c.yaml", "epochs": "50", "batch_size": "8", "seed": "3",
                       "device": "cpu", "curriculum": "True", "register": "no"})
    assert args == ["d", "--config", "c.yaml", "--epochs", "50", "--batch-size", "8", "--seed", "3",
                    "--device", "cpu", "--curriculum", "--no-register", "--quiet"]


@pytest.mark.parametrize("value", ["ture", "y", "2", "maybe"])
def test_a_misspelt_flag_is_refused(value):
    with pytest.raises(ParameterError, match=f"-P curriculum={value}: expected true or false"):
        train_args({"curriculum": value})


@pytest.mark.parametrize(
    "argv, message",
    [(["--register", "maybe"], "-P register=maybe: expected true or false"),
     (["--experiment", "x"], "mlflow run --experiment-name x"),
     (["--nproc", "0"], "-P nproc=0: expected a number of processes")],
)
def test_bad_parameters_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train_entry.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_unknown_parameter_is_named(capsys):
    with pytest.raises(SystemExit) as exc:
        train_entry.main(["--data", "", "--epoch", "5"])  # -P epoch=5 (epochs misspelt): no prefix match
    assert exc.value.code == 2
    assert "error: -P epoch: not a parameter of this entry point (expected one of: data, config, epochs," in capsys.readouterr().err
