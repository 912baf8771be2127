"""The `cellseg` command: parse, build the config, call the library. Errors become one line, exit 2."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from cellseg.defaults import DEFAULT_BATCH, DEFAULT_TILE
from cellseg.errors import CellsegError, first_line, is_mlflow_error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Compact U-Net segmentation of cells and nuclei: train, register, export, infer, evaluate.",
)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthetic data generation.")
app.add_typer(data_app, name="data")


def _path(value: str) -> Path:
    """Path parser of every file and folder parameter: an empty one (an unset $VAR) is refused, not read as '.'."""
    if not str(value).strip():
        raise typer.BadParameter("empty path (an unset shell variable?); give a file or folder")
    return Path(value)


MAX_SYNTH_SIDE = 8192  # a synthetic image is a few float arrays of its size


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(metavar="OUT", parser=_path, help="output folder (images/ and masks/ are written inside)")],
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="number of images")] = 32,
    size: Annotated[tuple[int, int], typer.Option("--size", help="image height and width, px")] = (256, 256),
    seed: Annotated[int, typer.Option("--seed", min=0, help="random seed (same seed, same files)")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing dataset")] = False,
) -> None:
    """Write a synthetic fluorescence-nuclei dataset (the embedded default data)."""
    from cellseg.data.synth import write_dataset

    if min(size) < 32 or max(size) > MAX_SYNTH_SIDE:
        raise CellsegError(f"--size {size[0]} {size[1]}: images must be between 32 and {MAX_SYNTH_SIDE} px on a side")
    write_dataset(out, n=n, size=tuple(size), seed=seed, overwrite=overwrite)
    typer.echo(f"wrote {n} images and masks to {out}")


@app.command("train")
def train_cmd(
    data_dir: Annotated[Optional[Path], typer.Argument(metavar="DATA_DIR", parser=_path, help="dataset with images/ and masks/; omitted = synthetic")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", parser=_path, help="YAML config file")] = None,
    curriculum: Annotated[Optional[bool], typer.Option("--curriculum/--no-curriculum", help="add elastic deformation once val IoU reaches the threshold (curriculum.enabled, default off)")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="maximum epochs (train.epochs, default 400; early stopping may end sooner)")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="images per step, 1, 4, 8 in the original (train.batch_size, default 4)")] = None,
    tiles: Annotated[Optional[int], typer.Option("--tiles", help="1, or 4 to train on 2x2 regions (train.tiles, default 1)")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option("--lr-schedule", help="'EPOCH:LR,...': LR until EPOCH, e.g. '20:1e-3,100:5e-4' (schedule, default 1e-3 then lower)")] = None,
    patience: Annotated[Optional[int], typer.Option("--patience", help="early stopping: epochs without improvement (early_stopping.patience, default 10)")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option("--steps-per-epoch", help="training steps per epoch (train.steps_per_epoch, default: a full pass)")] = None,
    val_steps: Annotated[Optional[int], typer.Option("--val-steps", help="validation images per epoch (train.val_steps, default: all)")] = None,
    crop_size: Annotated[Optional[int], typer.Option("--crop-size", help="training crop side, px (data.crop_size, default 256)")] = None,
    channel: Annotated[Optional[int], typer.Option("--channel", "-c", min=0, help="of multi-channel images (stain channels, RGB), train on this one, counted from 0: the nuclear stain; the model then reads it by default (data.channel; default: RGB made grey (colour_to_grey), stain channels must be chosen)")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N (train.device, default auto)")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="DataLoader workers (train.workers, default -1: automatic)")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="random seed of weights, crops and augmentation (train.seed, default 0)")] = None,
    experiment: Annotated[Optional[str], typer.Option("--experiment", help="MLflow experiment (tracking.experiment, default cellseg)")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name", help="MLflow run name")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI")] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="continue this MLflow run from its last checkpoint")] = None,
    register: Annotated[Optional[bool], typer.Option("--register/--no-register", help="register the model when done")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Train the U-Net; every run is tracked in MLflow."""
    from cellseg.config import ScheduleConfig, apply_overrides, load_config
    from cellseg.tracking import check_launched_experiment
    from cellseg.train import interruption_note, train

    given = {  # option: (config key it overrides, value); None = not given
        "DATA_DIR": ("data.path", str(data_dir) if data_dir else None),
        "--config": (None, config),
        "--curriculum": ("curriculum.enabled", curriculum),
        "--epochs": ("train.epochs", epochs),
        "--batch-size": ("train.batch_size", batch_size),
        "--tiles": ("train.tiles", tiles),
        "--lr-schedule": (None, lr_schedule),
        "--patience": ("early_stopping.patience", patience),
        "--steps-per-epoch": ("train.steps_per_epoch", steps_per_epoch),
        "--val-steps": ("train.val_steps", val_steps),
        "--crop-size": ("data.crop_size", crop_size),
        "--channel": ("data.channel", channel),
        "--device": ("train.device", device),
        "--workers": ("train.workers", workers),
        "--seed": ("train.seed", seed),
        "--experiment": ("tracking.experiment", experiment),
        "--run-name": ("tracking.run_name", run_name),
        "--tracking-uri": ("tracking.uri", tracking_uri),
        "--register": ("tracking.register_model", register),
    }
    if resume:  # the run goes on with the config and data saved in its checkpoint (DATA_DIR: only that same folder)
        ignored = [o for o, (_, v) in given.items() if v is not None and o not in ("DATA_DIR", "--device", "--tracking-uri")]
        if ignored:
            raise CellsegError(
                f"--resume {resume} continues the run with the config and data of its checkpoint; "
                f"{', '.join(ignored)} cannot change (start a new run instead; --device and --tracking-uri may)"
            )
    cfg = load_config(config)
    overrides = {key: value for key, value in given.values() if key}
    if lr_schedule is not None:  # '' too (an unset $VAR) is refused, not ignored
        sched = ScheduleConfig.parse(lr_schedule)
        overrides.update({"schedule.until": sched.until, "schedule.lrs": sched.lrs})
    cfg = apply_overrides(cfg, overrides, {key: option for option, (key, _) in given.items() if key})
    check_launched_experiment(experiment, cfg.tracking.uri)
    try:
        result = train(cfg, resume=resume, quiet=quiet, data_dir=str(data_dir) if resume and data_dir else None)
    except KeyboardInterrupt as exc:  # a second Ctrl-C, or a signal outside the epoch loop
        run_id = getattr(exc, "run_id", None)
        note = (interruption_note(run_id, getattr(exc, "run_status", None), getattr(exc, "run_config", cfg), getattr(exc, "run_checkpoint", None))
                if run_id else "interrupted")
        if run_id or not _other_rank():  # under torchrun rank 0 says how the run ended
            typer.echo(f"\n{note}", err=True)
        raise _interrupt_told() from None
    if result.run_id:
        typer.echo(
            f"run {result.run_id} {result.status}: best {result.metric} "
            f"{result.best_score:.4f} at epoch {result.best_epoch} (last epoch {result.last_epoch})"
        )
    if result.status == "KILLED":
        if result.run_id:
            typer.echo(interruption_note(result.run_id, "KILLED", cfg), err=True)
        raise _interrupt_told()


_MODEL_SPECS = ("onnx (registered champion, else the shipped model), torch, PATH.onnx, PATH.pt, models:/NAME@ALIAS, "
                "models:/NAME/VERSION, runs:/RUN_ID or a run id")
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help=f"default (shipped model), {_MODEL_SPECS}")]
EvalModelOpt = Annotated[
    Optional[str], typer.Option("--model", "-m", help=f"default (shipped model), classic (Otsu + watershed baseline), {_MODEL_SPECS}")
]
TileOpt = Annotated[int, typer.Option("--tile", min=16, help="largest tile side, px (tiles shrink to fit each image)")]
ScaledTileOpt = Annotated[int, typer.Option("--tile", min=16, help="largest tile side, px of the model's input (tiles shrink to fit each image; with --scale, image tiles are TILE/scale px)")]


def _between(low: float, high: float):
    """Option callback: a finite number in [low, high] (click's own range check lets nan through
    to a message that names only the bound)."""
    def check(value: Optional[float]) -> Optional[float]:
        if value is not None and not low <= value <= high:  # False for nan
            raise typer.BadParameter(f"{value:g}: expected a number from {low:g} to {high:g}")
        return value
    return check


OverlapOpt = Annotated[float, typer.Option("--overlap", callback=_between(0.0, 0.9), help="fraction of a tile shared with neighbours (0 to 0.9)")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="tiles per model call (across images)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N")]
ThreadsOpt = Annotated[int, typer.Option("--threads", min=0, help="CPU threads for onnxruntime (0 = one per physical core)")]
TrackingOpt = Annotated[Optional[str], typer.Option("--tracking-uri", help="MLflow tracking URI")]
InteriorOpt = Annotated[Optional[float], typer.Option("--interior-threshold", callback=_between(0.0, 1.0), help="seed threshold on p(interior), 0 to 1 (default: the model's tuned value, else 0.5)")]
ForegroundOpt = Annotated[Optional[float], typer.Option("--foreground-threshold", callback=_between(0.0, 1.0), help="threshold on p(interior)+p(boundary), 0 to 1 (default: the model's tuned value, else 0.5)")]
TtaOpt = Annotated[bool, typer.Option("--tta", help="average the model over flipped tiles (4x the compute)")]
ScaleOpt = Annotated[float, typer.Option("--scale", help="zoom images by this factor for the model: 0.5 when objects are twice the size of its training nuclei (shipped model: DSB, ~10-60 px across), 2 when half; outputs keep the image's size (0.1 to 10)")]
ChannelOpt = Annotated[Optional[int], typer.Option("--channel", "-c", min=0, help="of multi-channel images (stain channels, RGB), segment this one, counted from 0: the nuclear stain (default: the channel the model was trained on, if any; else RGB made grey (mean, or darkest colour on a bright background) and stain channels must be chosen)")]
MinSizeOpt = Annotated[Optional[int], typer.Option("--min-size", min=0, help="smallest object kept, px (default: the model's tuned value, else 10)")]
MinScoreOpt = Annotated[Optional[float], typer.Option("--min-score", callback=_between(0.0, 1.0), help="drop objects whose mean p(interior)+p(boundary) is below this, 0 to 1 (default: the model's tuned value, else 0: keep all)")]


def _val_fraction(given: float | None, net=None) -> float:
    """--val-fraction, else the one `net` was trained with (its recorded config), else 0.2, so the
    validation split matches the training run's held-out images."""
    if given is None:
        import json

        try:
            given = float(json.loads(net.metadata["cellseg.config"])["data"]["val_fraction"])
        except (AttributeError, KeyError, TypeError, ValueError):
            given = 0.2
    _check_val_fraction(given)
    return given


def _check_val_fraction(val_fraction: float | None) -> None:
    """Refuse a --val-fraction outside (0, 1) (training's own range) before any work."""
    if val_fraction is not None and not 0.0 < val_fraction < 1.0:
        raise CellsegError(f"--val-fraction {val_fraction:g}: expected a fraction between 0 and 1 (the training run's value, default 0.2)")


def _load_model(spec: str | None, **kw):
    """`resolve.load_model`, saying on stderr when it fell back to another model than asked for."""
    from cellseg.resolve import load_model

    net = load_model(spec, **kw)
    if getattr(net, "fallback", None):
        typer.echo(f"note: {net.fallback}", err=True)
    return net


@app.command("infer")
def infer_cmd(
    input: Annotated[Path, typer.Argument(metavar="INPUT", parser=_path, help="an image file or a folder of PNG/TIFF/JPEG images")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", parser=_path, help="output folder (default: INPUT_cellseg/ beside the input)")] = None,
    model: ModelOpt = None,
    tile: ScaledTileOpt = DEFAULT_TILE,
    overlap: OverlapOpt = 0.125,
    batch_size: BatchOpt = DEFAULT_BATCH,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="descend into sub-folders")] = False,
    probs: Annotated[bool, typer.Option("--probs", help="also write the 3-class probabilities")] = False,
    overlay: Annotated[bool, typer.Option("--overlay/--no-overlay", help="write contour overlays")] = True,
    csv: Annotated[bool, typer.Option("--csv/--no-csv", help="write per-object CSV tables")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace existing outputs")] = False,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="only segment images without outputs")] = False,
    engine: Annotated[str, typer.Option("--engine", help="local, or ray (Ray Data actors; pip install 'cellseg-unet\\[ray]')")] = "local",
    address: Annotated[Optional[str], typer.Option("--address", help="--engine ray: 'auto' or ray://HOST:PORT (default: a local Ray)")] = None,
    actors: Annotated[Optional[int], typer.Option("--actors", min=1, help="--engine ray: number of actors (default: one per CPU, or per GPU)")] = None,
    cpus_per_actor: Annotated[Optional[float], typer.Option("--cpus-per-actor", help="--engine ray: CPUs reserved per actor")] = None,
    interior_threshold: InteriorOpt = None,
    foreground_threshold: ForegroundOpt = None,
    min_size: MinSizeOpt = None,
    min_score: MinScoreOpt = None,
    tta: TtaOpt = False,
    scale: ScaleOpt = 1.0,
    channel: ChannelOpt = None,
    tracking_uri: TrackingOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Segment images: label TIFFs, overlays, object tables and a summary.json.

    INPUT is a file or a folder; with --engine ray also a quoted glob or a text file listing paths.
    """
    from cellseg.batch import InferOptions
    from cellseg.inference import check_scale, image_tile

    if overwrite and skip_existing:
        raise CellsegError("--overwrite and --skip-existing exclude each other; choose one")
    if engine not in ("local", "ray"):
        raise CellsegError(f"--engine {engine}: expected local or ray")
    if engine == "local" and (address or actors or cpus_per_actor):
        raise CellsegError("--address/--actors/--cpus-per-actor need --engine ray")
    check_scale(scale)  # before any model or image is read
    if engine == "local" and not input.exists():  # ray also takes quoted globs
        from cellseg.batch import missing_input

        raise CellsegError(missing_input(input))
    net = _load_model(model, device="cpu" if engine == "ray" else device, threads=threads, tracking_uri=tracking_uri)
    opts = InferOptions(tile=image_tile(tile, scale), overlap=overlap, batch_size=batch_size, recursive=recursive, save_probs=probs,
                        overlay=overlay, csv=csv, overwrite=overwrite, skip_existing=skip_existing,
                        interior_threshold=interior_threshold, foreground_threshold=foreground_threshold, min_size=min_size,
                        min_score=min_score, channel=channel)
    name = getattr(net, "describe", str(model))
    settings = (" (flip TTA)" if tta else "") + (f" (scale {scale:g})" if scale != 1 else "")
    try:
        summary = _run_infer(engine, net, name + settings, input, output, opts, address, actors, cpus_per_actor, quiet, device, tta, scale)
    except KeyboardInterrupt:
        how = "--skip-existing instead of --overwrite" if overwrite else "--skip-existing"
        typer.echo(f"\ninterrupted: the images finished so far keep their outputs; rerun the same command with "
                   f"{how} to segment the rest", err=True)
        raise _interrupt_told() from None
    typer.echo(
        f"{summary.processed} segmented, {summary.skipped} skipped, {len(summary.failed)} failed: "
        f"{summary.objects} objects in {summary.seconds:.1f}s ({summary.images_per_s:.2f} images/s, "
        f"{summary.provider}) -> {summary.output}"
    )
    if skip_existing and summary.skipped:
        from cellseg.batch import missing_outputs

        missing = missing_outputs(summary, opts)
        if missing:
            typer.echo(f"note: some skipped images have no {', '.join(missing)} (--skip-existing keeps earlier results as "
                       "they are); --overwrite writes every output", err=True)
    for path, reason in summary.failed:
        typer.echo(f"failed: {path}: {reason}", err=True)
    if summary.failed:
        raise typer.Exit(1)


def _run_infer(engine, net, name, input, output, opts, address, actors, cpus_per_actor, quiet, device, tta, scale):
    """The summary of `infer` run by the chosen engine."""
    from cellseg.batch import segment_folder

    if engine == "ray":
        from cellseg.inference import OnnxModel
        from cellseg.ray_engine import segment_with_ray

        if not isinstance(net, OnnxModel):
            raise CellsegError(f"--engine ray runs ONNX models; {name} is a PyTorch checkpoint: export it (cellseg export) or pass a .onnx")
        if device not in ("auto", "cpu", "cuda"):
            raise CellsegError(f"--device {device}: with --engine ray use auto, cpu or cuda (one GPU per actor)")
        return segment_with_ray(net.path, input, output, opts, address=address, num_actors=actors,
                                cpus_per_actor=cpus_per_actor, progress=not quiet, device=device, model_name=name,
                                tta=tta, scale=scale)
    from cellseg.inference import with_settings

    return segment_folder(with_settings(net, tta, scale), input, output, opts, progress=not quiet, model_name=name)


def _is_training_data(net, data_dir: Path) -> bool:
    """True when `data_dir` hashes to the training data recorded in the model (models exported
    from checkpoints of this version on; False when not recorded or not a dataset folder)."""
    from cellseg.data.dataset import dataset_hash
    from cellseg.export import DATASET_KEY

    recorded = (getattr(net, "metadata", None) or {}).get(DATASET_KEY)
    if not recorded:
        return False
    try:
        return dataset_hash(data_dir) == recorded
    except CellsegError:  # not a dataset: evaluate names the problem itself
        return False


def _given_name(spec: str | None, net) -> str | None:
    """The name a registry or run model is reported by (models:/NAME@ALIAS, a run id), None for a
    model file (the shipped model included, also when `--model onnx` fell back to it): its path is
    reported then. A registry download's cache path would say nothing, or collide with a local file."""
    from cellseg import registry

    if spec in (None, "default", "classic") or getattr(net, "fallback", None):
        return None
    if spec == "onnx":
        return f"models:/{registry.MODEL_NAME}@{registry.ALIAS}"
    if spec == "torch":
        return f"models:/{registry.MODEL_NAME}@{registry.ALIAS} (PyTorch)"
    return None if Path(spec).suffix.lower() in (".onnx", ".pt") else spec


def _report_name(data_dir: Path, split: str, net, spec: str | None, tta: bool, scale: float) -> str:
    """DATA_SPLIT_MODEL[_tta][_scaleS]: reports of different models or settings get their own
    folder. MODEL: the model's given name (`display_name`: models:/NAME@ALIAS, a run id) cleaned,
    else its file's name, else the --model spec cleaned."""
    import re

    from cellseg.classic import ClassicModel

    clean = lambda text: re.sub(r"[^\w.@-]+", "_", text).strip("_") or "model"  # noqa: E731
    if isinstance(net, ClassicModel):
        model = "classic"
    elif isinstance(getattr(net, "display_name", None), str):
        model = clean(net.display_name)
    elif getattr(net, "path", None):
        model = Path(str(net.path)).stem
    else:
        model = clean(spec or "default")
    return f"{data_dir.resolve().name}_{split}_{model}" + ("_tta" if tta else "") + (f"_scale{scale:g}" if scale != 1 else "")


def _same_model(earlier: object, now: str) -> bool:
    """Whether a report's recorded model name is this model: the same name, or paths to one file."""
    if earlier == now:
        return True
    try:
        return isinstance(earlier, str) and Path(earlier).is_file() and Path(earlier).resolve() == Path(now).resolve()
    except OSError:
        return False


def _recorded_scale(params: dict) -> float | None:
    """A report's recorded --scale (1 in reports from before it was recorded), None if unreadable."""
    scale = params.get("scale", 1.0)
    return float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None


def _settings_text(params: dict) -> str:
    """', --tta, --scale S' for the settings of a recorded report that differ from the defaults."""
    scale = _recorded_scale(params)
    return (", --tta" if params.get("tta") else "") + (f", --scale {scale:g}" if scale not in (None, 1) else "")


def _check_report_folder(out: Path, model: str | None = None, data: Path | None = None, split: str | None = None,
                         overwrite: bool = False, tta: bool = False, scale: float = 1.0) -> None:
    """Refuse a report folder that is a file, cannot be written, holds another command's summary.json,
    or holds files named like a report's (per_image.csv, worst.png, classic/) with no report there.
    Unless `overwrite`, also one holding the report of another `model`, on other `data`/`split`, or
    made with other `tta`/`scale` (a rerun of the same evaluation replaces its own report)."""
    import json

    from cellseg.batch import check_output_folder
    from cellseg.evaluate import REPORT_FILES, is_report_table

    summary = out / "summary.json"
    if not summary.is_file() and not is_report_table(out / "per_image.csv"):  # (an interrupted report: its table)
        others = [n for n in (*REPORT_FILES, "classic") if n != "summary.json"]
        clash = next((out / n for n in others if os.path.lexists(out / n)), None)
        if clash is not None:
            raise CellsegError(f"{clash}: exists and is not part of a cellseg evaluate report; choose another --output")
    if summary.is_file():
        try:
            earlier = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and isinstance(earlier.get("params"), dict) and "split" in earlier["params"]):
            raise CellsegError(f"{summary}: not a cellseg evaluate report (an infer output folder?); choose another --output")
        was = earlier["params"]
        if model is not None and not overwrite and (
            not _same_model(was.get("model"), model)
            or (data is not None and was.get("data") not in (None, str(data.resolve())))
            or (split is not None and was.get("split") != split)
            or bool(was.get("tta", False)) != tta or _recorded_scale(was) != scale
        ):
            raise CellsegError(f"{out}: holds the report of {was.get('model')} on {was.get('data')} (split {was.get('split')}"
                               f"{_settings_text(was)}); choose another --output, or --overwrite to replace it")
    check_output_folder(out, create=False)  # created only when the report is written: a failed evaluation leaves nothing


@app.command("evaluate")
def evaluate_cmd(
    data_dir: Annotated[Path, typer.Argument(metavar="DATA_DIR", parser=_path, help="dataset with images/ and masks/")],
    model: EvalModelOpt = None,
    split: Annotated[str, typer.Option("--split", help="all, val or train (deterministic stem-hash split)")] = "all",
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="as in training (default: the model's recorded value, else 0.2)")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", parser=_path, help="report folder (default ./cellseg-eval/DATA_SPLIT_MODEL)")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="also score the classic baseline")] = True,
    semantic_masks: Annotated[bool, typer.Option("--semantic-masks", help="masks are 3-class (0 bg, 1 cell, 2 edge)")] = False,
    log: Annotated[bool, typer.Option("--log", help="log the evaluation as an MLflow run")] = False,
    experiment: Annotated[str, typer.Option("--experiment", help="MLflow experiment for --log")] = "cellseg-eval",
    tile: ScaledTileOpt = DEFAULT_TILE,
    overlap: OverlapOpt = 0.125,
    batch_size: BatchOpt = DEFAULT_BATCH,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = 0,
    interior_threshold: InteriorOpt = None,
    foreground_threshold: ForegroundOpt = None,
    min_size: MinSizeOpt = None,
    min_score: MinScoreOpt = None,
    tta: TtaOpt = False,
    scale: ScaleOpt = 1.0,
    channel: ChannelOpt = None,
    tracking_uri: TrackingOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a report of another model, dataset, split, --tta or --scale in --output")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Score a model on a labelled dataset: IoU, SEG, AP@0.5, mAP@0.5:0.95, precision, recall, F1."""
    from rich.console import Console

    from cellseg.classic import ClassicModel
    from cellseg.evaluate import evaluate_dataset, format_table, log_report, remove_report, write_report
    from cellseg.inference import check_scale, image_tile, read_channel

    if split not in ("all", "val", "train"):
        raise CellsegError(f"--split {split}: expected all, val or train")
    check_scale(scale)  # before any model or image is read
    _check_val_fraction(val_fraction)
    if scale != 1 and model == "classic":
        raise CellsegError("--scale applies to network models, not classic")
    net = ClassicModel() if model == "classic" else _load_model(model, device=device, threads=threads, tracking_uri=tracking_uri)
    channel = read_channel(net, channel)  # the model's own unless --channel: the baseline reads the same
    given = _given_name(model, net)
    if given:
        net.display_name = given  # the report names models:/NAME@ALIAS, not its download's cache path
    val_fraction = _val_fraction(val_fraction, net)
    if split != "val" and _is_training_data(net, data_dir):
        typer.echo(f"note: {data_dir} is the dataset this model was trained on; --split {split} scores images it "
                   "learnt from (report --split val, held out)", err=True)
    out = output or Path("cellseg-eval") / _report_name(data_dir, split, net, model, tta, scale)
    from cellseg.evaluate import model_name

    _check_report_folder(out, model_name(net), data_dir, split, overwrite, tta, scale)
    kw = dict(split=split, val_fraction=val_fraction, tile=image_tile(tile, scale), overlap=overlap, batch_size=batch_size,
              semantic_masks=semantic_masks, progress=not quiet, channel=channel)
    pp = {"interior_threshold": interior_threshold, "foreground_threshold": foreground_threshold, "min_size": min_size, "min_score": min_score}
    pp = {k: v for k, v in pp.items() if v is not None}
    if pp and model == "classic":
        raise CellsegError("--interior-threshold/--foreground-threshold/--min-size/--min-score apply to network models, not classic")
    if tta and model == "classic":
        raise CellsegError("--tta applies to network models, not classic")
    from cellseg.inference import with_settings

    net = with_settings(net, tta, scale)
    if log:  # refused now, not after the evaluation
        from cellseg.config import EXPERIMENT_NAME_RULE, bad_experiment_name

        if bad_experiment_name(experiment):
            raise CellsegError(f"--experiment {experiment!r}: {EXPERIMENT_NAME_RULE}")
    if log:  # an unreachable tracking server fails now, not after the evaluation
        from cellseg import tracking

        tracking.setup(tracking_uri)
    report = evaluate_dataset(net, data_dir, postprocess_kwargs=pp, **kw)
    base = evaluate_dataset(ClassicModel(), data_dir, **kw) if baseline and model != "classic" else None
    paths = write_report(report, out)
    base_paths = write_report(base, out / "classic") if base is not None else None
    if base is None:
        remove_report(out / "classic")  # an earlier run's baseline would pass for this report's
    Console().print(format_table(report, base))
    typer.echo(f"report: {paths['summary']}")
    if log:
        run_id = log_report(report, paths, experiment=experiment, run_name=f"evaluate {out.name}",
                            baseline=(base, base_paths) if base is not None else None)
        typer.echo(f"logged MLflow run {run_id}")


@app.command("tune")
def tune_cmd(
    data_dir: Annotated[Path, typer.Argument(metavar="DATA_DIR", parser=_path, help="dataset with images/ and masks/ (the training data: its validation split is used)")],
    model: Annotated[Path, typer.Option("--model", "-m", parser=_path, help="exported model (.onnx) to tune; the result is stored in it")],
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="as in training (default: the model's recorded value, else 0.2)")] = None,
    tile: ScaledTileOpt = DEFAULT_TILE,
    overlap: OverlapOpt = 0.125,
    batch_size: BatchOpt = DEFAULT_BATCH,
    threads: ThreadsOpt = 0,
    tta: TtaOpt = False,
    scale: ScaleOpt = 1.0,
    channel: ChannelOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the best thresholds; do not store them")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Tune the post-processing thresholds on the validation split and store them in the model.

    `infer` and `evaluate` of this file then use them by default (options still override them);
    `cellseg register --onnx FILE` makes the tuned file the registered champion that serving uses.
    Tune with the --scale and --tta you will segment with (min sizes are stored in model px).
    """
    from cellseg.evaluate import MIN_BRIGHT_GROUP, TUNED_KEYS, tune_thresholds
    from cellseg.inference import OnnxModel, check_scale, image_tile, with_settings
    from cellseg.postprocess import effective_postprocess

    if model.suffix.lower() != ".onnx":
        raise CellsegError(f"{model}: tune stores thresholds in an exported .onnx model (cellseg export)")
    _check_val_fraction(val_fraction)
    check_scale(scale)
    net = OnnxModel(model, threads=threads)
    val_fraction = _val_fraction(val_fraction, net)
    from cellseg.data.io import replaceable

    target = replaceable(model)[0] if not dry_run else model  # a read-only model is refused before the work
    folder = target.absolute().parent  # the model (a link's target) is replaced by a rename in its folder
    if not dry_run and not os.access(folder, os.W_OK | os.X_OK):
        raise CellsegError(f"{model}: its folder {folder} is read-only; tune stores the thresholds in the model (or use --dry-run)")
    if channel is not None and net.channel is not None and channel != net.channel:
        raise CellsegError(f"--channel {channel}: {model} was trained on channel {net.channel}, the one infer and evaluate read; "
                           "tune on that one (leave --channel out)")
    result = tune_thresholds(with_settings(net, tta, scale), data_dir, split="val", val_fraction=val_fraction,
                             tile=image_tile(tile, scale), overlap=overlap, batch_size=batch_size, progress=not quiet,
                             channel=channel)
    stored = net.postprocess  # the thresholds in use until now (the defaults where none are stored)
    current = tuple(effective_postprocess(stored)[k] for k in TUNED_KEYS)
    now = next((s for s in result.scores if tuple(s[k] for k in TUNED_KEYS) == current), None)
    best = result.best
    label = "stored" if stored else "default"
    before = f" ({label} {'/'.join(map(str, current))}: mAP {now['map']:.3f})" if now and not net.postprocess_bright else ""
    settings = (" with flip TTA" if tta else "") + (f" at scale {scale:g}" if scale != 1 else "")
    settings += f" ({result.images} image{'s' if result.images != 1 else ''})"
    point = lambda p: (f"interior {p['interior_threshold']}, foreground {p['foreground_threshold']}, min size {p['min_size']}, "  # noqa: E731
                       f"min score {p['min_score']}")
    if result.best_bright is None:
        typer.echo(f"best on {data_dir} val{settings}: {point(best)}: mAP {result.best_map:.3f}{before}")
    else:
        other, bright = result.groups["other"], result.groups["bright"]
        typer.echo(f"best on {data_dir} val{settings}: mAP {result.best_map:.3f}{before}, each kind of image at its own thresholds:\n"
                   f"  {other['images']} dark-background images: {point(best)}: mAP {other['map']:.3f}\n"
                   f"  {bright['images']} bright-background (inverted) images: {point(result.best_bright)}: mAP {bright['map']:.3f}")
    if result.best_map <= 0:
        stored_note = "" if dry_run else f"; nothing stored in {model}"
        raise CellsegError(f"{data_dir}: no threshold setting matched a single object on the validation split "
                           f"(best mAP 0){stored_note} (is the model trained for this data?)")
    if note := result.few_images_note():
        typer.echo(note, err=True)
    if not dry_run:
        from cellseg.export import store_postprocess

        store_postprocess(model, best, result.best_bright)
        typer.echo(f"stored in {model}")
        if net.postprocess_bright and result.best_bright is None:
            typer.echo(f"note: the bright-background thresholds stored before were removed: this split has fewer than "
                       f"{MIN_BRIGHT_GROUP} images of a kind, so one setting serves every image", err=True)
        if net.run_id:
            typer.echo(f"note: registered versions of run {net.run_id} (if any) serve the copy they were registered with; "
                       f"where that run is in your tracking store, cellseg register --onnx {shlex.quote(str(model))} "
                       "makes this file the champion", err=True)


@app.command("quantize")
def quantize_cmd(
    model: Annotated[Optional[Path], typer.Argument(metavar="MODEL", parser=_path, show_default=False, help="exported fp32 model (.onnx); or `quantize DATA_DIR -m MODEL`, as tune takes it")] = None,
    data_dir: Annotated[Optional[Path], typer.Argument(metavar="DATA_DIR", parser=_path, show_default=False, help="dataset with images/ and masks/ (its training split calibrates the int8 ranges)")] = None,
    model_opt: Annotated[Optional[Path], typer.Option("--model", "-m", parser=_path, help="the model, as `tune DATA_DIR -m MODEL` takes it")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", parser=_path, help="default: MODEL with .int8.onnx")] = None,
    calib: Annotated[int, typer.Option("--calib", min=1, help="training-split images to calibrate on")] = 32,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="as in training (default: the model's recorded value, else 0.2)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an --output that is not an int8 copy of this model's run")] = False,
) -> None:
    """Write an int8 copy of an exported model (static QDQ, calibrated on training images).

    On CPUs with VNNI/AMX it runs about 1.4x faster; check its accuracy with `cellseg evaluate`.
    `cellseg infer` picks models/cellseg-nuclei.int8.onnx by itself on such CPUs.
    """
    from cellseg.export import check_model_output, check_replaces_own_model
    from cellseg.inference import OnnxModel
    from cellseg.quantize import calibration_images, int8_path, quantize_static

    forms = "`quantize MODEL DATA_DIR` or `quantize DATA_DIR -m MODEL`"
    if model_opt is not None:  # quantize DATA_DIR -m MODEL: the one positional is the dataset
        if data_dir is not None:
            raise CellsegError(f"quantize takes the model once: {model} {data_dir} and --model {model_opt}; use {forms}")
        if model is None:
            raise CellsegError(f"quantize -m {model_opt}: missing DATA_DIR; use {forms}")
        model, data_dir = model_opt, model
    elif model is None:
        raise CellsegError(f"quantize: missing MODEL and DATA_DIR; use {forms}")
    elif data_dir is None:
        raise CellsegError(f"quantize {model}: missing DATA_DIR; use {forms}")
    if model.suffix.lower() != ".onnx":
        raise CellsegError(f"{model}: quantize takes an exported .onnx model (cellseg export)")
    _check_val_fraction(val_fraction)
    net = OnnxModel(model, device="cpu")
    val_fraction = _val_fraction(val_fraction, net)
    out = output or int8_path(model)
    if out.resolve() == model.resolve():
        raise CellsegError(f"{out}: the int8 copy would overwrite its source; pick another --output")
    check_model_output(out)
    # the default output is this file's int8 copy: one of an earlier version (another run) is stale, replaced
    check_replaces_own_model(out, net.run_id, "int8", overwrite, any_run=output is None)
    crops = calibration_images(data_dir, net.low_percentile, net.high_percentile, net.invert_bright, calib,
                               val_fraction, net.size_multiple, channel=net.channel)
    quantize_static(model, out, crops)
    typer.echo(f"wrote {out} (int8, calibrated on {len(crops)} training images of {data_dir}); "
               f"check it: cellseg evaluate {shlex.quote(str(data_dir))} --split val --model {shlex.quote(str(out))}")


@app.command("register")
def register_cmd(
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="register this run")] = None,
    experiment: Annotated[str, typer.Option("--experiment", help="else pick the best run of this experiment")] = "cellseg",
    metric: Annotated[str, typer.Option("--metric", help="validation metric that picks the best run")] = "val_map",
    name: Annotated[str, typer.Option("--name", help="registered model name")] = "cellseg-unet",
    onnx: Annotated[Optional[Path], typer.Option("--onnx", parser=_path, help="register this exported file (e.g. after cellseg tune) as its run's serving model")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Register a run's model and point the alias 'champion' at the new version.

    With --onnx FILE: the file is attached to the run it was exported from and served as is
    (with the thresholds `cellseg tune` stored in it).
    """
    from cellseg import registry, tracking

    registry.check_model_name(name)
    if onnx is not None:
        from cellseg.inference import OnnxModel

        file_run = OnnxModel(onnx, device="cpu", threads=1).run_id
        if not file_run:
            raise CellsegError(f"{onnx}: records no training run (exported from a checkpoint outside MLflow?); "
                               "register the run, then export it with cellseg export")
        if run_id is not None and run_id != file_run:
            raise CellsegError(f"{onnx}: exported from run {file_run}, not --run-id {run_id}")
        run_id = file_run
    client = registry.connect(tracking_uri)
    if onnx is not None and not registry.holds_run(client, run_id):
        import mlflow

        raise CellsegError(f"{onnx}: exported from run {run_id}, which the tracking store {mlflow.get_tracking_uri()} "
                           "does not hold (another store's model?); pass that store with --tracking-uri")
    if run_id is None:
        run_id = registry.best_run(experiment, metric).info.run_id
    before = registry.current_champion(name)
    existing = {v.version for v in registry.run_versions(registry.connect(), name, run_id)}
    if onnx is not None:
        from cellseg.serving import register_pyfunc

        mv = register_pyfunc(run_id, name, metric=metric, onnx_path=onnx)
    else:
        mv = registry.register_run(run_id, name=name, metric=metric)
    if mv.version in existing:
        typer.echo(f"run {run_id}: this model is already models:/{name}/{mv.version}; no new version (alias champion on it)")
    else:
        typer.echo(f"registered run {run_id} as models:/{name}/{mv.version} (alias champion)")
    status = registry.get_run(registry.connect(), run_id).info.status
    if status != "FINISHED":  # e.g. stopped by hand: its best epoch so far is what was registered
        typer.echo(f"note: run {run_id} ended {status}, before its planned epochs (`cellseg train --resume {run_id}{tracking.uri_option()}` "
                   "goes on); its best epoch so far is what was registered", err=True)
    for line in registry.registration_notes(before, mv, metric):
        typer.echo(line, err=line.startswith("note:"))


@app.command("export")
def export_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", parser=_path, help="ONNX file to write, e.g. models/NAME.onnx")],
    model_uri: Annotated[Optional[str], typer.Option("--model-uri", help="registered model, e.g. models:/cellseg-unet@champion")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run-id", help="a training run (its best checkpoint)")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", parser=_path, help="a checkpoint file (best.pt / last.pt)")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="float16 weights (for the CUDA provider)")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an --output of another run, precision or with tuned thresholds")] = False,
    attach: Annotated[bool, typer.Option("--attach/--no-attach", help="log the ONNX on the training run and register it")] = True,
    name: Annotated[str, typer.Option("--name", help="registered model name")] = "cellseg-unet",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Export a trained model to ONNX (dynamic batch/height/width), checked against PyTorch.

    Without --model-uri, --run-id or --checkpoint: the registered champion (models:/cellseg-unet@champion).
    """
    from cellseg import registry
    from cellseg.export import check_model_output, check_replaces_own_model, export_checked, load_net_from_checkpoint

    if sum(x is not None for x in (model_uri, run_id, checkpoint)) > 1:
        raise CellsegError("give one of --model-uri, --run-id, --checkpoint")
    registry.check_model_name(name)
    check_model_output(output)
    if checkpoint is None:
        registry.connect(tracking_uri)
        if run_id is None:
            import re

            m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?", model_uri or f"models:/{name}@champion")
            if not m:
                raise CellsegError(f"--model-uri {model_uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
            mv = registry.get_version(m.group(1), m.group(2), m.group(3))
            if not mv.run_id:
                raise CellsegError(f"{model_uri or f'models:/{name}@champion'}: version {mv.version} has no source run, "
                                   "so no checkpoint to export (its ONNX is what it serves)")
            run_id, name = mv.run_id, m.group(1)
        checkpoint = registry.run_checkpoint(run_id)
    net, cfg, ckpt_run = load_net_from_checkpoint(checkpoint)
    run_id = run_id or ckpt_run
    if net.dataset_hash is None and run_id:  # a checkpoint from before checkpoints held it: the run's tag
        net.dataset_hash = registry.run_dataset_hash(run_id, tracking_uri)
    if net.dataset_hash is None:
        where = "nor does its run's dataset.hash tag" if run_id else "and names no training run"
        typer.echo(f"note: {checkpoint} records no hash of its training data ({where}), "
                   "so evaluate cannot tell when it scores the images the model was trained on", err=True)
    check_replaces_own_model(output, run_id, "fp16" if fp16 else "fp32", overwrite)
    diff = export_checked(net, cfg, output, run_id=run_id, fp16=fp16)  # checked before the file is written
    if fp16:
        typer.echo(f"wrote {output} (fp16 weights)")
    else:
        typer.echo(f"wrote {output}: ONNX vs PyTorch max |logit diff| {diff:.2e} (64x64 and 520x696 inputs)")
    if attach and run_id:
        try:
            _attach_export(output, run_id, name, tracking_uri)
        except KeyboardInterrupt:
            typer.echo(f"\ninterrupted: {output} is written and checked, but may not be attached to run {run_id} "
                       "nor registered; rerun the same command to attach it", err=True)
            raise _interrupt_told() from None


def _attach_export(output: Path, run_id: str, name: str, tracking_uri: str | None) -> None:
    """Log an exported ONNX file on its run and, when the run is registered, register its pyfunc."""
    from cellseg import registry

    try:
        client = registry.connect(tracking_uri)
        run = registry.get_run(client, run_id)
    except CellsegError as exc:
        typer.echo(f"not attached to MLflow: {exc}", err=True)
        return
    same = registry.is_current_onnx(run, output)
    uri = registry.attach_onnx(run_id, output, name=name)
    typer.echo(f"run {run_id} has this ONNX already: {uri}" if same else f"logged ONNX on run {run_id}: {uri}")
    existing = {v.version for v in registry.run_versions(client, name, run_id)}
    if existing:
        from cellseg.serving import register_pyfunc

        # the run is registered: its champion becomes the pyfunc that serves labels from this ONNX
        mv = register_pyfunc(run_id, name)
        again = "already registered: " if mv.version in existing else "registered "
        typer.echo(f"{again}models:/{name}/{mv.version} (pyfunc serving labels, alias champion)")


_PIP_NAMES = {"psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient", "pyodbc": "pyodbc", "ray": "'cellseg-unet[ray]'"}


_INTERRUPT_TOLD = False  # a command said how a Ctrl-C left things: main adds nothing


def _interrupt_told() -> typer.Exit:
    """Exit(130) for a command that has printed what an interrupt left done and undone."""
    global _INTERRUPT_TOLD
    _INTERRUPT_TOLD = True
    return typer.Exit(130)


def _other_rank() -> bool:
    """True in a torchrun worker other than rank 0 (from torchrun's environment; torch not imported)."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1") or 1) > 1 and env.get("RANK", "0") != "0"


def _rank_zero_first(seconds: float = 2.0) -> None:
    """In a torchrun worker other than rank 0, wait before printing an error: rank 0, which refuses a
    bad config or dataset alike, says it first and torchrun stops this worker meanwhile (one error
    line, not one per rank); an error of this rank alone is still printed, a moment later."""
    if _other_rank():
        try:
            time.sleep(seconds)
        except KeyboardInterrupt:  # Ctrl-C meanwhile: the error is still printed, not a traceback
            pass


def main() -> None:
    """Entry point: run the app, turning CellsegError into one line on stderr and exit code 2."""
    global _INTERRUPT_TOLD
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    _INTERRUPT_TOLD = False
    try:
        rc = app(standalone_mode=False)
    except CellsegError as exc:
        _rank_zero_first()
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        if not _other_rank():  # (rank 0 says how the run ended)
            typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:  # a file or folder the command had to write or read (read-only disk, a folder for a file, ...)
        if os.environ.get("CELLSEG_DEBUG"):
            raise
        _rank_zero_first()
        names = [str(n) for n in (exc.filename, exc.filename2) if n]
        where = f"{' -> '.join(names)}: " if names else ""
        typer.echo(f"error: {where}{exc.strerror or exc} (CELLSEG_DEBUG=1 shows the traceback)", err=True)
        sys.exit(2)
    except MemoryError as exc:  # numpy's says what it could not allocate
        if os.environ.get("CELLSEG_DEBUG"):
            raise
        _rank_zero_first()
        what = str(exc).splitlines()[0] if str(exc) else "MemoryError"
        typer.echo(f"error: out of memory ({what}); for huge images lower --tile / --batch-size "
                   "(CELLSEG_DEBUG=1 shows where)", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:  # an optional package a choice needs (a database driver for the tracking URI, ...)
        if os.environ.get("CELLSEG_DEBUG") or not exc.name:
            raise
        _rank_zero_first()
        package = _PIP_NAMES.get(exc.name.split(".")[0], exc.name.split(".")[0])
        typer.echo(f"error: the Python package {package} is not installed (pip install {package}); what you asked for needs it "
                   "(CELLSEG_DEBUG=1 shows where)", err=True)
        sys.exit(2)
    except Exception as exc:  # click usage errors arrive here with standalone_mode=False
        _rank_zero_first()
        if is_mlflow_error(exc):
            typer.echo(f"error: MLflow: {first_line(exc)}", err=True)
            sys.exit(2)
        # typer vendors its own click, so match the class by name rather than import it
        if any(c.__name__ == "ClickException" for c in type(exc).__mro__):
            exc.show()
            sys.exit(exc.exit_code)
        raise
    if rc == 130 and not _INTERRUPT_TOLD and not _other_rank():  # typer's own Exit(130) for a Ctrl-C: a bare exit before
        typer.echo("interrupted", err=True)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


if __name__ == "__main__":
    main()
