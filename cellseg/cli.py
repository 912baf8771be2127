"""The `cellseg` command: parse, build the config, call the library. Errors become one line, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cellseg.errors import CellsegError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compact U-Net segmentation of cells and nuclei: train, register, export, infer, evaluate.",
)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthetic data generation.")
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="output folder (images/ and masks/ are written inside)")],
    n: Annotated[int, typer.Option("--n", min=1, help="number of images")] = 32,
    size: Annotated[tuple[int, int], typer.Option("--size", help="image height and width, px")] = (256, 256),
    seed: Annotated[int, typer.Option("--seed", help="random seed (same seed, same files)")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing dataset")] = False,
) -> None:
    """Write a synthetic fluorescence-nuclei dataset (the embedded default data)."""
    from cellseg.data.synth import write_dataset

    if min(size) < 32:
        raise CellsegError(f"--size {size[0]} {size[1]}: images must be at least 32x32")
    write_dataset(out, n=n, size=tuple(size), seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {n} images and masks to {out}")


@app.command("train")
def train_cmd(
    data_dir: Annotated[Optional[Path], typer.Argument(help="dataset with images/ and masks/; omitted = synthetic")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML config file")] = None,
    curriculum: Annotated[Optional[bool], typer.Option("--curriculum/--no-curriculum", help="elastic deformation once val IoU reaches the threshold")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="maximum epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="images per step (1, 4, 8 in the original)")] = None,
    tiles: Annotated[Optional[int], typer.Option("--tiles", help="1, or 4 to train on 2x2 regions")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option("--lr-schedule", help="'EPOCH:LR,...' e.g. '20:1e-3,100:5e-4'")] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", help="early stopping patience, epochs")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option("--steps-per-epoch", help="training steps per epoch (default: a full pass)")] = None,
    val_steps: Annotated[Optional[int], typer.Option("--val-steps", help="validation images per epoch (default: all)")] = None,
    crop_size: Annotated[Optional[int], typer.Option("--crop-size", help="training crop side, px")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="DataLoader workers (-1 automatic)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    experiment: Annotated[Optional[str], typer.Option("--experiment", help="MLflow experiment")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="MLflow run name")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="continue this MLflow run from its last checkpoint")] = None,
    register: Annotated[Optional[bool], typer.Option("--register/--no-register", help="register the model when done")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Train the U-Net; every run is tracked in MLflow."""
    from cellseg.config import ScheduleConfig, apply_overrides, load_config
    from cellseg.train import train

    cfg = load_config(config)
    overrides = {
        "curriculum.enabled": curriculum,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "train.tiles": tiles,
        "early_stopping.patience": patience,
        "train.steps_per_epoch": steps_per_epoch,
        "train.val_steps": val_steps,
        "data.crop_size": crop_size,
        "train.device": device,
        "train.workers": workers,
        "train.seed": seed,
        "tracking.experiment": experiment,
        "tracking.run_name": run_name,
        "tracking.uri": tracking_uri,
        "tracking.register_model": register,
        "data.path": str(data_dir) if data_dir else None,
    }
    if lr_schedule:
        sched = ScheduleConfig.parse(lr_schedule)
        overrides.update({"schedule.until": sched.until, "schedule.lrs": sched.lrs})
    cfg = apply_overrides(cfg, overrides)
    if resume and tracking_uri:
        cfg = apply_overrides(cfg, {"tracking.uri": tracking_uri})
    result = train(cfg, resume=resume, quiet=quiet)
    if result.run_id:
        typer.echo(
            f"run {result.run_id} {result.status}: best {cfg.early_stopping.metric} "
            f"{result.best_score:.4f} at epoch {result.best_epoch} (last epoch {result.last_epoch})"
        )
    if result.status == "KILLED":
        raise typer.Exit(130)


def main() -> None:
    """Entry point: run the app, turning CellsegError into one line on stderr and exit code 2."""
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        rc = app(standalone_mode=False)
    except CellsegError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
