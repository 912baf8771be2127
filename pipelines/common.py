"""What the pipeline scripts share: MLproject-friendly number options, one-line errors, the stop after a Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import NoReturn


def whole_number(text: str) -> int:
    """argparse type for a count: '20' or '20.0' (MLproject has no int type: `float` parameters
    arrive as '20.0'); '1.5' or 'ten' are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number")
    if abs(value) > 2**53:  # past float's exact integers: '1e30' would read as 1000000000000000019884624838656
        raise argparse.ArgumentTypeError(f"{text!r}: too large")
    return int(value)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (`error: ...`, exit status 2), not a usage
    text; `mlproject` maps an option to the MLproject parameter that sets it, named in the error."""

    def __init__(self, *args, mlproject: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.mlproject = mlproject or {}

    def label(self, option: str) -> str:
        """`option` as errors name it: '--epochs (-P budget_epochs)' when an MLproject parameter sets it."""
        return f"{option} (-P {self.mlproject[option]})" if option in self.mlproject else option

    def error(self, message: str) -> NoReturn:
        for option, param in self.mlproject.items():
            if message.startswith(f"argument {option}:") or message.startswith(f"argument {option}/"):
                message += f" (-P {param} of the MLproject entry point)"
        if message.startswith("unrecognized arguments") and self.mlproject:  # e.g. `mlflow run -P budget=1`
            message += f" (under `mlflow run`, this entry point takes -P {', '.join(['data', *self.mlproject.values()])})"
        self.exit(2, f"error: {message}\n")


@contextlib.contextmanager
def one_line_errors():
    """A CellsegError or an MLflow error (e.g. a mistyped tracking URI) ends the script with one
    line on stderr and exit status 2, as `cellseg` and the scripts' own argument errors do, instead
    of a traceback."""
    from cellseg.errors import CellsegError, first_line, is_mlflow_error

    try:
        yield
    except CellsegError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except Exception as exc:
        if is_mlflow_error(exc):
            print(f"error: MLflow: {first_line(exc)}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        raise


def stop_after_interruption(run_id: str | None, status: str | None, cfg, then: str = "") -> NoReturn:
    """Training inside a pipeline was interrupted (Ctrl-C, SIGTERM): one line on stderr saying how its
    MLflow run ended, how to go on, and `then` (what the pipeline left undone); exit status 130."""
    from cellseg.train import interruption_note

    note = interruption_note(run_id, status, cfg) if run_id else "interrupted"
    print(f"{note}{then}", file=sys.stderr, flush=True)
    raise SystemExit(130)
