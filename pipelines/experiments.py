"""The original method's experiment grid as one MLflow parent run with nested child runs.

Variants (same data, same budget): vanilla vs 2x2 tiles, each with and without curriculum
(batch size 4), and batch sizes 1 and 8 without curriculum. The parent run gets a summary
table (Markdown + CSV) and a plot of validation IoU per epoch for every variant.

    python -m pipelines.experiments [--data DIR] [--epochs N] [--steps-per-epoch S]
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from pathlib import Path

from pipelines.common import OneLineParser, one_line_errors, stop_after_interruption, whole_number

MLPROJECT_NAMES = {"--epochs": "budget_epochs", "--steps-per-epoch": "budget_steps"}  # option -> MLproject parameter

VARIANTS: list[tuple[str, dict]] = [
    ("vanilla", {"train.tiles": 1, "curriculum.enabled": False, "train.batch_size": 4}),
    ("vanilla+curriculum", {"train.tiles": 1, "curriculum.enabled": True, "train.batch_size": 4}),
    ("tiles", {"train.tiles": 4, "curriculum.enabled": False, "train.batch_size": 4}),
    ("tiles+curriculum", {"train.tiles": 4, "curriculum.enabled": True, "train.batch_size": 4}),
    ("batch1", {"train.tiles": 1, "curriculum.enabled": False, "train.batch_size": 1}),
    ("batch8", {"train.tiles": 1, "curriculum.enabled": False, "train.batch_size": 8}),
]
COLUMNS = ["variant", "run_id", "best_epoch", "epochs", "val_iou", "val_seg", "val_map", "val_ap50", "seconds"]


def summary_row(name: str, result, metric: str) -> dict:
    """Scores of a variant at its best epoch (by the early-stopping metric)."""
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), result.history[-1])
    return {
        "variant": name,
        "run_id": result.run_id,
        "best_epoch": result.best_epoch,
        "epochs": result.last_epoch,
        **{k: round(float(best[k]), 4) for k in ("val_iou", "val_seg", "val_map", "val_ap50")},
        "seconds": round(sum(h["epoch_seconds"] for h in result.history), 1),
    }


def to_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def comparison_plot(histories: dict[str, list[dict]], path: Path) -> None:
    """Validation IoU (and mAP) per epoch, one line per variant."""
    from cellseg.plots import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, hist in histories.items():
        epochs = [h["epoch"] for h in hist]
        axes[0].plot(epochs, [h["val_iou"] for h in hist], marker=".", label=name)
        axes[1].plot(epochs, [h["val_map"] for h in hist], marker=".", label=name)
    for ax, title in zip(axes, ("validation IoU", "validation mAP@0.5:0.95")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _log_summary(rows: list[dict], histories: dict[str, list[dict]]) -> None:
    """The variants' best scores as metrics, and summary.md/.csv and the comparison plot as artifacts, of the active run."""
    import mlflow

    for r in rows:
        for k in ("val_iou", "val_seg", "val_map"):
            if not math.isnan(r[k]):
                mlflow.log_metric(f"{r['variant'].replace('+', '_')}.{k}", r[k])
    if rows:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "summary.md").write_text(to_markdown(rows))
            (Path(d) / "summary.csv").write_text(to_csv(rows))
            comparison_plot(histories, Path(d) / "val_iou.png")
            mlflow.log_artifacts(d)


def run_experiments(cfg, data: str | None = None, variants=VARIANTS, quiet: bool = True) -> tuple[str, list[dict]]:
    """Train every variant as a child of one parent run; returns (parent run id, summary rows)."""
    import mlflow

    from cellseg import tracking
    from cellseg.config import apply_overrides, flatten
    from cellseg.data.dataset import split_pairs
    from cellseg.train import resolve_data_dir, train

    # the dataset every variant trains on is checked before the parent run exists (a bad path made an
    # empty FAILED run per attempt)
    root = resolve_data_dir(cfg, data)
    split_pairs(cfg, root)
    data = str(root)
    tracking.setup(cfg.tracking.uri)
    if not os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run` the run and experiment exist already
        mlflow.set_experiment(cfg.tracking.experiment)
    rows, histories, interrupted = [], {}, None
    with tracking.sigterm_interrupts():
        parent = mlflow.start_run(run_name=cfg.tracking.run_name or "experiments")
        status = "FAILED"
        try:
            mlflow.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("train.epochs", "train.steps", "train.val_steps", "data.", "model."))})
            mlflow.set_tag("cellseg.pipeline", "experiments")
            for i, (name, overrides) in enumerate(variants, 1):
                if not quiet:
                    print(f"[{i}/{len(variants)}] {name}: " + ", ".join(f"{k} {v}" for k, v in overrides.items()), flush=True)
                child_cfg = apply_overrides(cfg, {**overrides, "tracking.run_name": name})
                try:
                    result = train(child_cfg, data_dir=data, quiet=quiet)
                except KeyboardInterrupt as exc:  # a second Ctrl-C, or a signal outside the epoch loop
                    interrupted = (getattr(exc, "run_id", None), getattr(exc, "run_status", None), getattr(exc, "run_config", child_cfg))
                    break
                if result.status == "KILLED":  # Ctrl-C or SIGTERM ended an epoch: no further variants
                    interrupted = (result.run_id, "KILLED", child_cfg)
                    break
                rows.append(summary_row(name, result, cfg.early_stopping.metric))
                histories[name] = result.history
            _log_summary(rows, histories)  # an interrupted grid keeps the summary of the variants that finished
            status = "KILLED" if interrupted else "FINISHED"
        except KeyboardInterrupt:  # outside a variant's training
            status, interrupted = "KILLED", interrupted or (None, None, cfg)
        finally:
            tracking.end_run(status)
    if interrupted:
        done = ", ".join(r["variant"] for r in rows) or "none"
        stop_after_interruption(*interrupted, f"; parent run {parent.info.run_id} KILLED (variants finished: {done})")
    return parent.info.run_id, rows


def main(argv: list[str] | None = None) -> None:
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from cellseg.config import apply_overrides, load_config
    from cellseg.tracking import check_launched_experiment

    ap = OneLineParser(prog="python -m pipelines.experiments", description=__doc__.splitlines()[0], mlproject=MLPROJECT_NAMES)
    ap.add_argument("--data", default=None, help="dataset folder (default: synthetic)")
    ap.add_argument("--config", default=None, help="base YAML config")
    ap.add_argument("--epochs", type=whole_number, default=20, help="budget: epochs per variant")
    ap.add_argument("--steps-per-epoch", type=whole_number, default=10, help="budget: training steps per epoch")
    ap.add_argument("--val-steps", type=whole_number, default=None, help="validation images per epoch")
    ap.add_argument("--experiment", default=None, help="default: cellseg-experiments (under `mlflow run`: its --experiment-name)")
    ap.add_argument("--tracking-uri", default=None)
    args = ap.parse_args(argv)
    with one_line_errors():
        check_launched_experiment(args.experiment, args.tracking_uri)
        cfg = apply_overrides(
            load_config(args.config or None),
            {
                "train.epochs": args.epochs,
                "train.steps_per_epoch": args.steps_per_epoch,
                "train.val_steps": args.val_steps,
                "tracking.experiment": args.experiment or "cellseg-experiments",
                "tracking.uri": args.tracking_uri,
            },
            {"train.epochs": ap.label("--epochs"), "train.steps_per_epoch": ap.label("--steps-per-epoch"),
             "train.val_steps": "--val-steps", "tracking.experiment": "--experiment", "tracking.uri": "--tracking-uri"},
        )
        run_id, rows = run_experiments(cfg, data=args.data or None, quiet=False)
    print(to_markdown(rows))
    print(f"parent run {run_id}")


if __name__ == "__main__":
    main()
