"""End-to-end pipeline: train -> export -> tune thresholds -> evaluate -> register (what `make demo` runs).

    python -m pipelines.main [--data DIR] [--epochs N] [--experiment NAME] [--output outputs/demo.onnx]

Without --data it trains on the embedded synthetic nuclei. Every step is a library call;
the same steps are the CLI commands `cellseg train/export/tune/evaluate/register`. The
thresholds are tuned on the validation split, which also gives the reported scores (the split
is held out from training, but not from threshold choice: a test set would score a little lower).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from cellseg.errors import CellsegError
from pipelines.common import OneLineParser, one_line_errors, stop_after_interruption, whole_number

DEMO = {
    "model.depth": 3,
    "model.base_channels": 16,
    "data.crop_size": 128,
    "train.batch_size": 4,
    "train.steps_per_epoch": 12,
    "schedule.until": [15, 25, 1000],
    "schedule.lrs": [1e-3, 5e-4, 1e-4],
    "curriculum.enabled": True,
    "early_stopping.metric": "val_map",
}


def run_pipeline(cfg, data: str | None, output: Path, quiet: bool = False) -> dict:
    """Train, export to ONNX, tune post-processing thresholds on the validation split (stored in
    the ONNX), evaluate the validation split, register the run with its ONNX as the champion."""
    from rich.console import Console

    from cellseg import tracking
    from cellseg.export import check_model_output
    from cellseg.train import resolve_data_dir, train

    output = Path(output)
    check_model_output(output)  # before training: a foreign or read-only file there is refused now, not after the run
    console = Console(stderr=True)
    uri = tracking.setup(cfg.tracking.uri)
    console.rule("[bold]1/5 train")
    result = None
    try:
        result = train(cfg, data_dir=data, quiet=quiet)
        run_id, status = result.run_id, result.status
    except KeyboardInterrupt as exc:  # a second Ctrl-C, or a signal outside the epoch loop
        run_id, status = getattr(exc, "run_id", None), getattr(exc, "run_status", None)
    if result is None or status == "KILLED":
        # Ctrl-C or SIGTERM: an interrupted run is neither exported nor registered
        stop_after_interruption(run_id, status, cfg, f"; nothing exported or registered (once the run is done: "
                                f"`cellseg export --run-id {run_id} -o {shlex.quote(str(output))}{_replacing(output)}{tracking.uri_option()}`)"
                                if run_id else "")
    root = resolve_data_dir(cfg, data)
    stage = ["export"]
    try:
        with tracking.sigterm_interrupts():
            return _after_training(cfg, result, root, output, uri, console, quiet, stage)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM after the run ended FINISHED: say what is left to do
        print(f"interrupted during {stage[0]}: MLflow run {run_id} had ended FINISHED; "
              f"{_rest_of_pipeline(stage[0], run_id, output, root, cfg)}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def _replacing(output: Path) -> str:
    """' --overwrite' when the pipeline's output file exists (an earlier run's model, which the
    pipeline replaces, and `cellseg export` keeps unless told)."""
    return " --overwrite" if output.exists() else ""


def _rest_of_pipeline(stage: str, run_id: str, output: Path, root: Path, cfg) -> str:
    """The commands that do what the pipeline left undone from `stage` on."""
    from cellseg import tracking

    uri, out = tracking.uri_option(), shlex.quote(str(output))
    steps = {
        "export": f"cellseg export --run-id {run_id} -o {out} --no-attach{_replacing(output)}{uri}",
        "tune": f"cellseg tune {shlex.quote(str(root))} -m {out}",
        "register": f"cellseg register --onnx {out}{tracking.name_option(cfg.tracking.model_name)}{uri}",
    }
    order = ["export", "tune", "register"]
    todo = order[order.index(stage if stage in order else "register"):]
    done = "its registration was cut short" if stage == "register" else "the pipeline has not registered it"
    return f"{done}; go on with " + ", then ".join(f"`{steps[s]}`" for s in todo)


def _after_training(cfg, result, root: Path, output: Path, uri: str, console, quiet: bool, stage: list[str]) -> dict:
    """Steps 2-5 of run_pipeline; `stage[0]` names the step under way."""
    from cellseg import registry, tracking
    from cellseg.evaluate import evaluate_dataset, format_table, log_report, write_report
    from cellseg.evaluate import tune_thresholds
    from cellseg.export import export_checked, load_net_from_checkpoint, store_postprocess
    from cellseg.inference import OnnxModel
    from cellseg.serving import register_pyfunc

    console.rule("[bold]2/5 export")
    net, net_cfg, _ = load_net_from_checkpoint(result.checkpoint_dir / "best.pt")
    diff = export_checked(net, net_cfg, output, run_id=result.run_id)  # checked before the file is written
    console.print(f"{output}: ONNX vs PyTorch max |diff| {diff:.1e}")

    stage[0] = "tune"
    console.rule("[bold]3/5 tune post-processing thresholds (validation split)")
    tuned = tune_thresholds(OnnxModel(output), root, split="val", val_fraction=cfg.data.val_fraction, progress=not quiet)
    if tuned.best_map <= 0:  # as `cellseg tune`: such a model is not stored, evaluated nor registered
        raise CellsegError(f"{root}: the trained model matched no object on the validation split at any threshold "
                           f"(best mAP 0): {output} is left untuned and nothing is registered; train longer (--epochs)")
    if note := tuned.few_images_note():
        console.print(note, markup=False)
    store_postprocess(output, tuned.best, tuned.best_bright)
    bright = f", bright-background images {tuned.best_bright}" if tuned.best_bright else ""
    console.print(f"{output}: post-processing {tuned.best}{bright} (validation mAP {tuned.best_map:.3f})")

    stage[0] = "evaluate"
    console.rule("[bold]4/5 evaluate (validation split)")
    model = OnnxModel(output)
    report = evaluate_dataset(model, root, split="val", val_fraction=cfg.data.val_fraction, progress=not quiet)
    paths = write_report(report, output.parent / f"{output.stem}-eval")
    console.print(format_table(report))
    log_report(report, paths, experiment=tracking.experiment_of(result.run_id), run_name=f"evaluate {result.run_id[:8]}")

    stage[0] = "register"
    console.rule("[bold]5/5 register")
    registry.connect(uri)
    before = registry.current_champion(cfg.tracking.model_name)
    mv = register_pyfunc(result.run_id, cfg.tracking.model_name, onnx_path=output)
    console.print(f"models:/{cfg.tracking.model_name}/{mv.version} is the champion (pyfunc serving labels)")
    for line in registry.registration_notes(before, mv):
        console.print(line, markup=False)
    return {"run_id": result.run_id, "onnx": str(output), "model_name": cfg.tracking.model_name, "version": mv.version,
            "val": report.summary}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from cellseg.config import apply_overrides, load_config
    from cellseg.tracking import check_launched_experiment

    ap = OneLineParser(prog="python -m pipelines.main", description=__doc__.splitlines()[0], mlproject={"--epochs": "epochs"})
    ap.add_argument("--data", default=None, help="dataset folder (default: synthetic nuclei)")
    ap.add_argument("--config", default=None, help="YAML config (default: a small demo config)")
    ap.add_argument("--epochs", type=whole_number, default=None, help="default: 30 for the demo config, else the config's")
    ap.add_argument("--experiment", default=None, help="default: the config's (cellseg-demo for the demo)")
    ap.add_argument("--output", type=Path, default=Path("outputs/demo.onnx"))
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    with one_line_errors():
        check_launched_experiment(args.experiment, args.tracking_uri)
        cfg = load_config(args.config) if args.config else apply_overrides(load_config(None), {**DEMO, "train.epochs": 30, "tracking.experiment": "cellseg-demo"})
        cfg = apply_overrides(cfg, {"train.epochs": args.epochs, "tracking.experiment": args.experiment,
                                    "tracking.uri": args.tracking_uri},
                              {"train.epochs": "--epochs", "tracking.experiment": "--experiment", "tracking.uri": "--tracking-uri"})
        out = run_pipeline(cfg, args.data, args.output, quiet=args.quiet)
    v = out["val"]
    print(f"run {out['run_id']}: validation IoU {v['iou']:.3f}  SEG {v['seg']:.3f}  AP@0.5 {v['ap50']:.3f}  "
          f"mAP {v['map']:.3f}; ONNX {out['onnx']}; models:/{out['model_name']}/{out['version']} @champion")
    onnx = shlex.quote(os.path.abspath(out["onnx"]))  # absolute: `mlflow run` works in the project folder, not the user's
    print(f"next: cellseg infer --model onnx <folder>   (or --model {onnx})")


if __name__ == "__main__":
    main()
