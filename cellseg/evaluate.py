"""Evaluation of a model (or the classic baseline) on a labelled dataset: metrics, report, MLflow.

Network models go through the same tiled inference (`predict_many`) and post-processing
(`probabilities_to_instances`) as `cellseg predict`, so the numbers describe what users get.
Images stream through: only the worst few images' arrays are kept, for the figure.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cellseg.classic import ClassicModel
from cellseg.data.dataset import list_pairs, split_stems
from cellseg.data.io import atomic_write, normalize_flagged, normalize_percentile, read_image, read_mask
from cellseg.errors import CellsegError
from cellseg.defaults import DEFAULT_BATCH, DEFAULT_TILE
from cellseg.inference import predict_many, read_channel, wrapper_settings
from cellseg.metrics import aggregate, evaluate_image, evaluate_overlap, overlap_matrix, without_predicted
from cellseg.postprocess import (
    DEFAULT_SIZES,
    check_postprocess,
    model_postprocess,
    object_scores,
    probabilities_to_instances,
)

SPLITS = ("all", "val", "train")
METRIC_KEYS = ("map", "ap50", "f1", "precision", "recall", "seg", "iou", "n_true", "n_pred", "n_matched")
REPORT_FILES = ("per_image.csv", "summary.json", "worst.png")  # what write_report writes in its folder
TABLE_COLUMNS = ("stem", *METRIC_KEYS, "seconds")  # per_image.csv's leading columns
# (interior, foreground) threshold pairs `cellseg tune` tries; weighted-loss models often sit at a low
# interior and a high foreground threshold (the class weights inflate p(boundary)), so both ends are in
DEFAULT_GRID = tuple(itertools.product((0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)))
DEFAULT_MIN_SIZES = (10, 20, 40, 60)
# minimum object scores (mean foreground probability) tune tries; 0 keeps every object. The objects sit at
# p(foreground) > the foreground threshold (up to 0.95), so the useful values are near 1
DEFAULT_MIN_SCORES = (0.0, 0.95, 0.96, 0.97, 0.975, 0.98)
FEW_TUNING_IMAGES = 10  # tune notes that thresholds chosen on fewer validation images may not carry over
MIN_BRIGHT_GROUP = 10  # images of each kind (bright-background or not) a split needs for per-kind thresholds
TUNED_KEYS = ("interior_threshold", "foreground_threshold", "min_size", "min_score")  # what tune chooses and stores


@dataclass
class EvalReport:
    """Per-image rows (stem, metrics, seconds), the summary (aggregate + n_images, model, split),
    the run parameters, and the worst images as (label, image, gt, pred) rows for the figure."""

    per_image: list[dict]
    summary: dict
    params: dict = field(default_factory=dict)
    worst: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)


@dataclass
class ThresholdTuning:
    """Result of `tune_thresholds`: the best grid point (usable as postprocess_kwargs) and every score.

    With `best_bright`, `best` is the best point for the images the model does not invert and
    `best_bright` the best for those it inverts as bright-background (brightfield, H&E);
    `best_map` is then the mean mAP over all images, each group at its own point, and
    `groups` holds each group's image count and mAP."""

    best: dict
    best_map: float
    scores: list[dict]
    best_bright: dict | None = None
    groups: dict = field(default_factory=dict)
    images: int = 0  # images of the split tuned on

    def few_images_note(self) -> str | None:
        """The note when thresholds were chosen on fewer than FEW_TUNING_IMAGES images, else None."""
        if self.images >= FEW_TUNING_IMAGES:
            return None
        return (f"note: tuned on only {self.images} validation image{'s' if self.images != 1 else ''}: thresholds "
                "chosen on so few may not carry over to other images")


# ------------------------------------------------------------------------------------------ helpers


def _as_model(model_or_classic):
    """ClassicModel for "classic", else the network model, checked for the attributes used here."""
    if isinstance(model_or_classic, str):
        if model_or_classic != "classic":
            raise CellsegError(f"model '{model_or_classic}': pass a loaded model or 'classic'")
        return ClassicModel()
    if isinstance(model_or_classic, ClassicModel):
        return model_or_classic
    missing = [a for a in ("low_percentile", "high_percentile") if not hasattr(model_or_classic, a)]
    if missing or not callable(model_or_classic):
        raise CellsegError(f"{model_or_classic!r} is not a cellseg model (missing {', '.join(missing) or '__call__'})")
    return model_or_classic


def model_name(model) -> str:
    """'classic', the name the user gave it (`display_name`: a models:/ URI, a run id), the model
    file, or the model's repr."""
    if isinstance(model, ClassicModel):
        return "classic"
    given = getattr(model, "display_name", None)
    if isinstance(given, str):
        return given
    path = getattr(model, "path", None)
    return str(path) if path is not None else repr(model)


def select_pairs(root: Path, split: str = "all", val_fraction: float = 0.2) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) of one split, by the same stem-hash split as training."""
    if split not in SPLITS:
        raise CellsegError(f"split '{split}': expected one of {', '.join(SPLITS)}")
    pairs = list_pairs(root)
    if split == "all":
        return pairs
    train, val = split_stems([p[0] for p in pairs], val_fraction, root)
    keep = set(val if split == "val" else train)
    return [p for p in pairs if p[0] in keep]


def _read_pair(image_path: Path, mask_path: Path, semantic: bool, channel: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw (H, W) float32 image (its `channel`, of a multi-channel one) and int32 labels; CellsegError
    naming the file when unusable."""
    image = read_image(image_path, channel=channel)
    gt = read_mask(mask_path, semantic=semantic)
    if image.shape != gt.shape:
        raise CellsegError(
            f"{mask_path}: mask is {gt.shape[0]}x{gt.shape[1]} but image {image_path.name} "
            f"is {image.shape[0]}x{image.shape[1]}; evaluation data must be clean"
        )
    return image, gt


def _stream(model, pairs, tile, overlap, batch_size, semantic, bright: dict | None = None,
            channel: int | None = None) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """(stem, normalised image, gt, output) per image: output is labels (classic) or (3, H, W) probabilities.
    `bright`, when given, gets stem -> whether the model inverted the image as bright-background."""
    if isinstance(model, ClassicModel):
        for stem, ip, mp in pairs:
            raw, gt = _read_pair(ip, mp, semantic, channel)
            norm = normalize_percentile(raw, model.low_percentile, model.high_percentile)
            yield stem, norm, gt, model(raw)
        return
    in_flight: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def images():
        for stem, ip, mp in pairs:
            raw, gt = _read_pair(ip, mp, semantic, channel)
            norm, inverted = normalize_flagged(raw, model.low_percentile, model.high_percentile, getattr(model, "invert_bright", False))
            if bright is not None:
                bright[stem] = inverted
            in_flight[stem] = (norm, gt)  # predict_many bounds how many are in flight
            yield stem, norm

    for stem, probs in predict_many(model, images(), tile=tile, overlap=overlap, batch_size=batch_size):
        norm, gt = in_flight.pop(stem)
        yield stem, norm, gt, probs


class _Progress:
    """A transient rich bar over images on stderr; nothing when disabled."""

    def __init__(self, enabled: bool, total: int, label: str):
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            from cellseg.progress import console

            self._bar = Progress(
                TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=True,
            )
            self._task = self._bar.add_task(label, total=total)

    def __enter__(self):
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1)


def _rows_in_order(rows: list[dict], pairs) -> list[dict]:
    order = {p[0]: i for i, p in enumerate(pairs)}
    return sorted(rows, key=lambda r: order[r["stem"]])


# --------------------------------------------------------------------------------------- evaluation


def evaluate_dataset(
    model_or_classic,
    root: str | Path,
    split: str = "all",
    val_fraction: float = 0.2,
    tile: int = DEFAULT_TILE,
    overlap: float = 0.125,
    batch_size: int = DEFAULT_BATCH,
    semantic_masks: bool = False,
    progress: bool = True,
    postprocess_kwargs: dict | None = None,
    keep_worst: int = 4,
    channel: int | None = None,
) -> EvalReport:
    """Predict every image of an images/ + masks/ dataset (or one split of it) and score it.

    Args:
        model_or_classic: a model (OnnxModel, TorchModel, or any object with its interface),
            a ClassicModel, or the string "classic".
        split: "all", or "val"/"train" of the deterministic stem-hash split with `val_fraction`
            (use the training run's value).
        postprocess_kwargs: options of probabilities_to_instances (network models only), on top
            of those stored in the model (`cellseg tune`); tune them on the validation split only.
        keep_worst: how many lowest-mAP images to keep for the figure.
        channel: of multi-channel images, the one to segment (`--channel`); None: the one the model
            was trained on, if any.
    Raises:
        CellsegError naming the file when an image or mask cannot be read or their sizes differ:
        evaluation data must be clean, so nothing is skipped.
    """
    model = _as_model(model_or_classic)
    channel = read_channel(model, channel)
    classic = isinstance(model, ClassicModel)
    if classic and postprocess_kwargs:
        raise CellsegError("postprocess_kwargs apply to network models; the classic baseline has none")
    pp = {} if classic else model_postprocess(model, check_postprocess(postprocess_kwargs))
    pp_bright = {} if classic else model_postprocess(model, postprocess_kwargs, bright=True)
    bright: dict[str, bool] = {}
    if keep_worst < 0:
        raise CellsegError(f"keep_worst {keep_worst}: expected 0 or more")
    root = Path(root)
    pairs = select_pairs(root, split, val_fraction)

    rows: list[dict] = []
    worst: list[tuple[float, str, np.ndarray, np.ndarray, np.ndarray]] = []
    with _Progress(progress, len(pairs), f"evaluate {split}") as bar:
        last = time.perf_counter()
        for stem, image, gt, out in _stream(model, pairs, tile, overlap, batch_size, semantic_masks, bright, channel):
            pred = out if classic else probabilities_to_instances(out, **(pp_bright if bright.get(stem) else pp))
            seconds = time.perf_counter() - last  # reading + prediction + post-processing, metrics excluded
            metrics = evaluate_image(gt, pred)
            rows.append({"stem": stem, **metrics, "seconds": seconds})
            if keep_worst:
                worst.append((metrics["map"], stem, image, gt, pred))
                worst.sort(key=lambda w: (w[0], w[1]))
                del worst[keep_worst:]  # only the worst k images' arrays stay in memory
            bar.advance()
            last = time.perf_counter()

    rows = _rows_in_order(rows, pairs)
    summary: dict[str, Any] = aggregate([{k: v for k, v in r.items() if k != "stem"} for r in rows])
    summary.update(model=model_name(model), split=split)
    params = {
        "model": model_name(model),
        "model_run_id": getattr(model, "run_id", None),
        "provider": getattr(model, "provider", None),
        "split": split,
        **wrapper_settings(model),  # tta, scale
        "val_fraction": val_fraction,
        "data": str(root.resolve()),
        "semantic_masks": semantic_masks,
        "channel": channel,
        "low_percentile": model.low_percentile,
        "high_percentile": model.high_percentile,
    }
    if classic:
        params.update(min_size=model.min_size, sigma=model.sigma, h=model.h)
    else:
        params.update(tile=tile, overlap=overlap, batch_size=batch_size, **{f"postprocess.{k}": v for k, v in pp.items()})
        if pp_bright != pp:
            params.update({f"postprocess_bright.{k}": v for k, v in pp_bright.items()})
        params["bright_images"] = sum(bright.values())
    figure = [(f"{m:.2f} {stem}", image, gt, pred) for m, stem, image, gt, pred in worst]
    return EvalReport(rows, summary, params, figure)


def tune_thresholds(
    model,
    root: str | Path,
    split: str = "val",
    grid=DEFAULT_GRID,
    val_fraction: float = 0.2,
    tile: int = DEFAULT_TILE,
    overlap: float = 0.125,
    batch_size: int = DEFAULT_BATCH,
    semantic_masks: bool = False,
    min_sizes=DEFAULT_MIN_SIZES,
    progress: bool = True,
    min_group: int = MIN_BRIGHT_GROUP,
    channel: int | None = None,
    min_scores=DEFAULT_MIN_SCORES,
) -> ThresholdTuning:
    """Best (interior_threshold, foreground_threshold, min_size, min_score) by mean mAP over a split
    (validation by default).

    For a model that inverts bright-background images (brightfield, H&E), when the split holds at
    least `min_group` images of each kind, each kind gets its own best point (`best` and
    `best_bright`): their objects differ (large, textured nuclei) and so do their best thresholds.

    Each image's probabilities are computed once and every grid point is post-processed from
    them while the image is in memory (the min_size and min_score filters only drop objects, so
    they are scored from each threshold pair's overlap matrix without new labels), so cost is one
    inference pass plus the post-processing. Ties go to the higher AP50,
    then to the earlier grid point. Tune on validation only: thresholds chosen on the data you
    report are optimistic. Min sizes are px of the model's input, as stored in the model: behind
    a `Rescaled` zoom (`--scale`) they filter objects of size / scale² image px, as inference does;
    the model's stored min_seed_size (else the default) is kept, zoomed by the same rule.
    """
    model = _as_model(model)
    if isinstance(model, ClassicModel):
        raise CellsegError("tune_thresholds needs a network model; the classic baseline has no probabilities")
    channel = read_channel(model, channel)
    pairs_ab = [(float(a), float(b)) for a, b in grid]
    sizes = [int(m) for m in min_sizes]
    min_scores = [float(s) for s in min_scores]
    if not pairs_ab or not sizes or not min_scores:
        raise CellsegError("tune_thresholds: empty threshold grid")
    if not all(0.0 <= s <= 1.0 for s in min_scores):
        raise CellsegError(f"min scores {min_scores}: expected numbers in [0, 1]")
    for a, b in pairs_ab:
        if not (0.0 <= a <= 1.0 and 0.0 <= b <= 1.0):
            raise CellsegError(f"threshold pair ({a}, {b}): thresholds must be in [0, 1]")
    if min(sizes) < 0:
        raise CellsegError(f"min sizes {sizes}: expected whole numbers >= 0")
    points = [(a, b, m, s) for a, b in pairs_ab for s in min_scores for m in sizes]
    zoom = wrapper_settings(model)["scale"]
    image_sizes = [max(int(m > 0), int(round(m / zoom**2))) for m in sizes]  # Rescaled.postprocess's rule
    seed_size = model_postprocess(model).get("min_seed_size", DEFAULT_SIZES["min_seed_size"])  # stored, zoomed alike
    pairs = select_pairs(Path(root), split, val_fraction)
    per_point: list[list[dict]] = [[] for _ in points]
    bright: dict[str, bool] = {}
    stems: list[str] = []
    with _Progress(progress, len(pairs), f"tune {split}") as bar:
        for stem, _image, gt, probs in _stream(model, pairs, tile, overlap, batch_size, semantic_masks, bright, channel):
            stems.append(stem)
            i = 0
            for a, b in pairs_ab:
                labels = probabilities_to_instances(probs, interior_threshold=a, foreground_threshold=b, min_size=0,
                                                    min_seed_size=seed_size)
                ov = overlap_matrix(gt, labels)  # labels are 1..N: column j is object j
                area = ov[:, 1:].sum(axis=0)
                score = object_scores(labels, probs[0])[1:] if any(min_scores) else None
                for s in min_scores:
                    for m in image_sizes:
                        keep = (area >= m) & (score >= s) if s > 0 else area >= m  # 0: off, as in inference
                        per_point[i].append(evaluate_overlap(ov if keep.all() else without_predicted(ov, keep)))
                        i += 1
            bar.advance()
    if not any(row["n_true"] for row in per_point[0]):
        raise CellsegError(f"{root}: the {split} split has no labelled object (every mask is empty): nothing to tune thresholds on")
    scores = [
        {"interior_threshold": a, "foreground_threshold": b, "min_size": m, "min_score": s, **aggregate(rows)}
        for (a, b, m, s), rows in zip(points, per_point)
    ]
    best_i = _best_point(scores)
    point = lambda i: {k: scores[i][k] for k in TUNED_KEYS}  # noqa: E731
    is_bright = [bright[s] for s in stems]
    n_bright = sum(is_bright)
    if min(n_bright, len(stems) - n_bright) < max(1, min_group):
        return ThresholdTuning(point(best_i), scores[best_i]["map"], scores, images=len(stems))
    group = {kind: [i for i, b in enumerate(is_bright) if b == (kind == "bright")] for kind in ("other", "bright")}
    best_of = {kind: _best_point([aggregate([rows[i] for i in idx]) for rows in per_point]) for kind, idx in group.items()}
    chosen = [per_point[best_of["bright" if b else "other"]][i] for i, b in enumerate(is_bright)]
    groups = {kind: {"images": len(idx), "map": aggregate([per_point[best_of[kind]][i] for i in idx])["map"]} for kind, idx in group.items()}
    return ThresholdTuning(point(best_of["other"]), aggregate(chosen)["map"], scores, point(best_of["bright"]), groups, len(stems))


def _best_point(means: list[dict]) -> int:
    """Index of the grid point whose aggregated scores have the highest mAP (ties: higher AP50, then earlier)."""
    return max(range(len(means)), key=lambda i: (means[i]["map"], means[i]["ap50"], -i))


# ------------------------------------------------------------------------------------------ outputs


def _jsonable(x):
    """JSON-safe copy: nan/inf -> None (strict JSON has no NaN), numpy scalars -> Python."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write per_image.csv (one row per image), summary.json (summary + params) and worst.png.

    worst.png (image | truth | prediction, worst mAP first, labelled "mAP stem") is written
    when the report kept worst images. Returns {"per_image", "summary", "worst"} -> paths.
    """
    import pandas as pd

    from cellseg.plots import validation_overlay

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"per_image": out_dir / "per_image.csv", "summary": out_dir / "summary.json"}
    df = pd.DataFrame(report.per_image)
    df = df[[c for c in TABLE_COLUMNS if c in df.columns] + [c for c in df.columns if c not in TABLE_COLUMNS]]
    atomic_write(paths["per_image"], lambda tmp: df.to_csv(tmp, index=False, float_format="%.6g"))
    text = json.dumps(_jsonable({**report.summary, "params": report.params}), indent=2, allow_nan=False) + "\n"
    atomic_write(paths["summary"], lambda tmp: Path(tmp).write_text(text))
    if report.worst:
        paths["worst"] = out_dir / "worst.png"
        title = f"worst {len(report.worst)} by mAP: {report.summary.get('model', '')} ({report.summary.get('split', '')})"
        atomic_write(paths["worst"], lambda tmp: validation_overlay(report.worst, tmp, title[:120]))
    else:
        (out_dir / "worst.png").unlink(missing_ok=True)  # an earlier report's figure would pass for this one's
    return paths


def is_report_table(path: str | Path) -> bool:
    """True when `path` is a per_image.csv that write_report wrote (judged by its header), e.g. the
    one a report interrupted before its summary.json left."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith(",".join(TABLE_COLUMNS[:2]) + ",")
    except (OSError, UnicodeDecodeError):
        return False


def remove_report(out_dir: str | Path, model: str = "classic") -> bool:
    """Delete the report of `model` in `out_dir` (the files `write_report` writes; the folder
    when that empties it), so a rerun without the baseline leaves no earlier baseline beside its
    report; True if one was there. Anything else (another model's report) is left alone."""
    out_dir = Path(out_dir)
    try:
        earlier = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(earlier, dict) and earlier.get("model") == model and isinstance(earlier.get("params"), dict)):
        return False
    found = False
    for name in REPORT_FILES:
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            found = True
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    return found


def _metrics(report: EvalReport, prefix: str = "") -> dict[str, float]:
    """The report's finite summary numbers as MLflow metrics."""
    return {
        prefix + k: float(v)
        for k, v in report.summary.items()
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def log_report(report: EvalReport, paths: dict[str, Path], experiment: str = "cellseg-eval", run_name: str | None = None,
               tracking_uri: str | None = None, baseline: tuple[EvalReport, dict[str, Path]] | None = None) -> str:
    """Log an evaluation as an MLflow run (params, summary metrics, report files); returns the run id.

    Nested under the active run when there is one (e.g. evaluation at the end of training).
    `baseline`: the classic baseline's (report, paths), logged beside it as metrics `classic.*`
    and artifacts under `classic/`.
    """
    import mlflow

    from cellseg import __version__
    from cellseg.tracking import setup

    setup(tracking_uri)
    mlflow.set_experiment(experiment)
    params = {k: ("" if v is None else str(v))[:500] for k, v in report.params.items()}
    metrics = _metrics(report)
    if baseline is not None:
        metrics.update(_metrics(baseline[0], "classic."))
    with mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({"cellseg.version": __version__, "cellseg.kind": "evaluation", "dataset.path": params.get("data", "")})
        if report.params.get("model_run_id"):
            mlflow.set_tag("cellseg.model_run_id", report.params["model_run_id"])
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for path in paths.values():
            mlflow.log_artifact(str(path))
        for path in (baseline[1].values() if baseline is not None else ()):
            mlflow.log_artifact(str(path), "classic")
        return run.info.run_id


def _fmt(key: str, value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if key.startswith("n_"):
        return f"{int(value):,}"
    if key == "seconds":
        return f"{value:.3f} s"
    return f"{value:.3f}"


def format_table(report: EvalReport, baseline: EvalReport | None = None):
    """A rich Table: metric | value (| baseline): means per image, summed counts, and precision,
    recall and F1 pooled over all objects (`metrics.aggregate`)."""
    from rich.table import Table

    s = report.summary
    title = f"{s.get('model', '')} - {s.get('split', '')} split, {s.get('n_images', 0)} images"
    table = Table(title=title, min_width=len(title))  # wide enough that the title stays on one line
    table.add_column("metric")
    table.add_column("value", justify="right")
    if baseline is not None:
        name = baseline.summary.get("model", "baseline")
        table.add_column("classic baseline" if name == "classic" else f"baseline ({name})", justify="right")
    for key in (*METRIC_KEYS, "n_images", "seconds"):
        if key not in s and (baseline is None or key not in baseline.summary):
            continue
        label = {"seconds": "seconds / image", "precision": "precision (pooled)", "recall": "recall (pooled)",
                 "f1": "f1 (pooled)", "n_matched": "n_matched (IoU > 0.5)"}.get(key, key)
        cells = [label, _fmt(key, s.get(key))]
        if baseline is not None:
            cells.append(_fmt(key, baseline.summary.get(key)))
        table.add_row(*cells)
    return table
