"""The MLproject `train` and `train_ddp` entry points: MLflow parameters to `cellseg train` options.

MLproject parameters always have a value, so "" means "not set": the config file (or the
built-in defaults) decides. Flags take true/false (also yes/no, 1/0, any case); anything else
is refused, as is a parameter the entry point does not declare. `train_ddp` runs the training
under `torchrun` (DDP) with --nproc processes (`torchrun_train`).

    python -m pipelines.train_entry --entry train|train_ddp [--nproc=N] --data=D --config=C --curriculum=true ...
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from pipelines.common import whole_number

# MLflow parameter -> `cellseg train` option, in the order they are passed
VALUES = {"config": "--config", "epochs": "--epochs", "batch_size": "--batch-size", "tiles": "--tiles",
          "steps_per_epoch": "--steps-per-epoch", "val_steps": "--val-steps", "seed": "--seed", "device": "--device",
          "channel": "--channel"}
WHOLE = {"epochs", "batch_size", "tiles", "steps_per_epoch", "val_steps", "seed", "channel"}  # counts: '20' or '20.0'
FLAGS = {"curriculum": "curriculum", "register": "register"}
TRUE, FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


class ParameterError(ValueError):
    """A parameter value that cannot be passed on."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line ParameterErrors (not a usage text and exit)."""

    def error(self, message):
        raise ParameterError(message)


def _flag(name: str, value: str) -> list[str]:
    v = value.strip().lower()
    if not v:
        return []
    if v in TRUE:
        return [f"--{FLAGS[name]}"]
    if v in FALSE:
        return [f"--no-{FLAGS[name]}"]
    raise ParameterError(f"-P {name}={value}: expected true or false")


def _whole(name: str, value: str) -> str:
    """A count as `cellseg train` takes it ('20.0' -> '20'); ParameterError for anything else."""
    try:
        return str(whole_number(value))
    except argparse.ArgumentTypeError:
        raise ParameterError(f"-P {name}={value}: expected a whole number") from None


def train_args(params: dict[str, str]) -> list[str]:
    """`cellseg train` arguments for these parameters ('' = not set); DATA last, after `--`, so
    no value is ever taken for an option (a path may start with '-')."""
    args = []
    for name, option in VALUES.items():
        value = params.get(name, "").strip()
        if value and name in WHOLE:
            value = _whole(name, value)
        if value:
            args.append(f"{option}={value}")
    for name in FLAGS:
        args += _flag(name, params.get(name, ""))
    args.append("--quiet")
    return args + (["--", params["data"]] if params.get("data") else [])


def main(argv: list[str] | None = None) -> None:
    ap = _Parser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--entry", choices=("train", "train_ddp"), required=True, help="the MLproject entry point")
    ap.add_argument("--nproc", default=None, help="train_ddp: processes for torchrun")
    ap.add_argument("--data", default="")
    for name in [*VALUES, *FLAGS]:
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, default="")
    ap.add_argument("--experiment", default="", help=argparse.SUPPRESS)  # what MLflow appends for -P experiment=...
    argv = sys.argv[1:] if argv is None else argv
    try:
        # MLflow appends an undeclared -P entry=X as a second --entry: never let it win
        if sum(a == "--entry" or a.startswith("--entry=") for a in argv) > 1:
            raise ParameterError("-P entry: not a parameter of this entry point")
        ns, unknown = ap.parse_known_args(argv)
        params = vars(ns)
        ddp = params["entry"] == "train_ddp"
        if not ddp and params["nproc"] is not None:  # MLflow appended `--nproc N` for an undeclared -P nproc
            unknown = ["--nproc", *unknown]
        if unknown:  # MLflow appends `--KEY VALUE` for a -P that the entry point does not declare
            key = unknown[0].lstrip("-").split("=", 1)[0]
            declared = ["data", *VALUES, *FLAGS] + (["nproc"] if ddp else [])
            hint = " (-e train_ddp takes nproc)" if key == "nproc" else ""
            raise ParameterError(f"-P {key}: not a parameter of -e {params['entry']}{hint} (expected one of: {', '.join(declared)})")
        if params["experiment"]:
            raise ParameterError(
                f"-P experiment={params['experiment']}: `mlflow run` makes the run before training starts; "
                f"choose its experiment with `mlflow run --experiment-name {params['experiment']}`"
            )
        args = train_args(params)
        nproc = (params["nproc"] or "").strip()
        if ddp and not (nproc.isdigit() and int(nproc) >= 1):
            raise ParameterError(f"-P nproc={nproc}: expected a number of processes (1 or more)")
    except ParameterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if not ddp:
        os.execv(sys.executable, [sys.executable, "-m", "cellseg", "train", *args])
        return  # (execv does not return; this keeps a mocked one from falling through)
    raise SystemExit(torchrun_train(int(nproc), args))


def torchrun_train(nproc: int, args: list[str]) -> int:
    """`cellseg train ARGS` under torchrun (standalone, `nproc` processes) in this process; its exit status.

    Rank 0 speaks on the console. The other ranks' output goes to log files and is shown only for a
    rank that failed by itself: the ranks refuse a bad config or dataset alike, so one error line,
    not one per rank. No torchrun traceback: a failed rank other than 0 gets a one-line summary.
    """
    import logging
    import shutil
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # one thread per process unless told otherwise (torchrun's own choice, set so it does not warn)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torchrun's own warnings and errors (its loggers each have a level set at import): what failed is said below
    elastic = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed.elastic")]
    levels = [logger.level for logger in elastic]
    for logger in elastic:
        logger.setLevel(logging.CRITICAL)
    logs = tempfile.mkdtemp(prefix="cellseg-ddp-")
    launcher = ["--standalone", "--nproc-per-node", str(nproc), "--log-dir", logs]
    if nproc > 1:
        launcher += ["--redirects", ",".join(f"{rank}:3" for rank in range(1, nproc))]
    try:
        run(get_args_parser().parse_args([*launcher, "-m", "cellseg", "train", *args]))
        return 0
    except SignalException as exc:  # Ctrl-C / SIGTERM: passed on to the ranks; rank 0 said how the run ended
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        # a rank that ended by itself (not stopped by torchrun's SIGTERM once another had failed) shows
        # its hidden output; an error every rank meets alike ends rank 0 first (the others wait: cli.main)
        own = {rank: f for rank, f in sorted(exc.failures.items()) if f.local_rank != 0 and f.exitcode != -signal.SIGTERM}
        for rank, failure in own.items():
            sys.stderr.write(_tail(Path(logs), failure.local_rank))
            how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else f"signal {failure.signal_name()}"
            print(f"error: cellseg train under torchrun: rank {rank} of {nproc} failed ({how})", file=sys.stderr)
        zero = next((f for f in exc.failures.values() if f.local_rank == 0), None)
        codes = [f.exitcode for f in ([zero] if zero is not None else []) + list(own.values()) if f.exitcode > 0]
        return codes[0] if codes else 1
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        for logger, level in zip(elastic, levels):
            logger.setLevel(level)


def _tail(logs: Path, local_rank: int, lines: int = 20) -> str:
    """The last lines of a redirected rank's stderr under torchrun's log folder ('' when none)."""
    found = sorted(logs.glob(f"*/attempt_*/{local_rank}/stderr.log"), key=lambda p: p.stat().st_mtime)
    if not found:
        return ""
    text = found[-1].read_text(errors="replace").splitlines()[-lines:]
    return "".join(line + "\n" for line in text)


if __name__ == "__main__":
    main()
