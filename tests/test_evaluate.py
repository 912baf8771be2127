"""The classic baseline and dataset evaluation: metrics, split, report files, MLflow, tuning."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellseg import classic as classic_mod
from cellseg.classic import ClassicModel, segment_classic
from cellseg.data.dataset import list_pairs
from cellseg.data.io import read_image, read_mask, write_png
from cellseg.errors import CellsegError
from cellseg.evaluate import (
    DEFAULT_GRID,
    DEFAULT_MIN_SCORES,
    DEFAULT_MIN_SIZES,
    EvalReport,
    evaluate_dataset,
    format_table,
    log_report,
    tune_thresholds,
    write_report,
)
from cellseg.metrics import iou_matrix

METRICS = ("iou", "seg", "ap50", "map", "precision", "recall", "f1")
CENTRES = [(20, 20), (20, 70), (60, 40), (100, 100), (95, 22), (55, 100)]


def discs(shape=(128, 128), centres=CENTRES, radius=10) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return labels


def noisy(labels: np.ndarray, seed: int = 0, dark_objects: bool = False) -> np.ndarray:
    img = np.where(labels > 0, 180.0, 30.0) + np.random.default_rng(seed).normal(0, 12, labels.shape)
    return (255.0 - img if dark_objects else img).astype(np.float32)


def assert_recovers(gt: np.ndarray, pred: np.ndarray, min_iou: float = 0.8) -> None:
    assert pred.dtype == np.int32 and pred.shape == gt.shape
    assert pred.max() == gt.max() == len(np.unique(pred)) - 1  # count matches, ids 1..N
    assert iou_matrix(gt, pred).max(axis=1).min() > min_iou


# --------------------------------------------------------------------------------------- classic


@pytest.mark.parametrize("dark_objects", [False, True], ids=["bright-on-dark", "dark-on-bright"])
def test_classic_segments_separated_discs(dark_objects):
    gt = discs()
    assert_recovers(gt, segment_classic(noisy(gt, dark_objects=dark_objects)))


def test_classic_splits_touching_discs():
    gt = discs(centres=[(64, 50), (64, 76)], radius=14)  # overlap: the later disc wins the lens
    pred = segment_classic(noisy(gt, seed=1))
    assert_recovers(gt, pred, min_iou=0.75)


def test_classic_flat_image_and_bad_input():
    assert segment_classic(np.full((32, 32), 7.0, np.float32)).max() == 0
    with pytest.raises(CellsegError):
        segment_classic(np.zeros((4, 4, 4), np.float32))
    model = ClassicModel(min_size=1000)
    assert model(noisy(discs())).max() == 0  # every disc is below min_size


# ------------------------------------------------------------------------------------ evaluation


def test_evaluate_classic_splits(tiny_data):
    report = evaluate_dataset("classic", tiny_data, progress=False)
    stems = [p[0] for p in list_pairs(tiny_data)]
    assert report.summary["n_images"] == 8 and report.summary["model"] == "classic"
    assert [r["stem"] for r in report.per_image] == stems
    for key in METRICS:
        assert 0.0 <= report.summary[key] <= 1.0
        assert all(0.0 <= r[key] <= 1.0 for r in report.per_image)
    assert report.summary["n_true"] == sum(r["n_true"] for r in report.per_image) > 0
    assert all(r["seconds"] >= 0 for r in report.per_image)
    assert len(report.worst) == 4

    val = evaluate_dataset(ClassicModel(), tiny_data, split="val", progress=False, keep_worst=0)
    train = evaluate_dataset("classic", tiny_data, split="train", progress=False, keep_worst=1)
    assert 1 <= val.summary["n_images"] < 8 and val.summary["split"] == "val"
    assert val.summary["n_images"] + train.summary["n_images"] == 8
    assert {r["stem"] for r in val.per_image} | {r["stem"] for r in train.per_image} == set(stems)
    assert val.worst == [] and len(train.worst) == 1


def test_predictions_equal_to_masks_score_one(tiny_data, monkeypatch):
    by_pixels = {read_image(img).tobytes(): read_mask(mask) for _, img, mask in list_pairs(tiny_data)}
    monkeypatch.setattr(classic_mod, "segment_classic", lambda image, *a, **k: by_pixels[image.tobytes()])
    report = evaluate_dataset("classic", tiny_data, progress=False)
    for key in METRICS:
        assert report.summary[key] == 1.0
        assert all(r[key] == 1.0 for r in report.per_image)
    assert report.summary["n_true"] == report.summary["n_pred"]


class ThresholdModel:
    """A pixelwise fake network: bright pixels are interior, dark ones background."""

    size_multiple = 8
    in_channels = 1
    low_percentile = 1.0
    high_percentile = 99.8
    provider = "fake"
    run_id = "abc123"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = 12.0 * (batch[:, 0] - 0.5)
        return np.stack([-x, x, np.full_like(x, -8.0)], axis=1).astype(np.float32)


@pytest.fixture
def disc_data(tmp_path):
    """4 clean 64x80 images of separated bright discs: a pixelwise model can be exact on them."""
    root = tmp_path / "discs"
    rng = np.random.default_rng(3)
    for i in range(4):
        centres = [(int(rng.integers(12, 20)), int(rng.integers(12, 20))), (44, 30), (20, 60), (50, 66)][: 2 + i % 3]
        gt = discs((64, 80), centres, radius=8)
        write_png(root / "images" / f"d{i}.png", np.where(gt > 0, 200, 20).astype(np.uint8))
        write_png(root / "masks" / f"d{i}.png", gt.astype(np.uint16))
    return root


def test_network_path_is_exact_on_clean_discs(disc_data):
    # tile 32 on 64x80 images: several tiles per image, blended, through the real inference path
    report = evaluate_dataset(ThresholdModel(), disc_data, tile=32, batch_size=3, progress=False)
    assert report.summary["n_images"] == 4
    for key in METRICS:
        assert report.summary[key] == pytest.approx(1.0)
    assert report.params["tile"] == 32 and report.params["model_run_id"] == "abc123"

    strict = evaluate_dataset(ThresholdModel(), disc_data, tile=32, progress=False, postprocess_kwargs={"min_size": 10_000})
    assert strict.summary["n_pred"] == 0 and strict.summary["map"] == 0.0
    with pytest.raises(CellsegError, match="unknown option"):
        evaluate_dataset(ThresholdModel(), disc_data, progress=False, postprocess_kwargs={"threshold": 0.5})
    with pytest.raises(CellsegError, match="network models"):
        evaluate_dataset("classic", disc_data, progress=False, postprocess_kwargs={"min_size": 3})


def test_tune_thresholds_returns_a_grid_point(disc_data):
    grid = [(0.3, 0.5), (0.5, 0.5), (1.0, 1.0)]
    result = tune_thresholds(ThresholdModel(), disc_data, split="all", grid=grid, tile=32, min_sizes=(10,), min_scores=(0,), progress=False)
    best = (result.best["interior_threshold"], result.best["foreground_threshold"])
    assert best in grid[:2] and result.best_map == pytest.approx(1.0)
    assert len(result.scores) == 3 and result.scores[2]["map"] == 0.0  # no pixel passes
    assert all(s["n_images"] == 4 for s in result.scores)
    val = tune_thresholds(ThresholdModel(), disc_data, progress=False)  # default: val split, default grid
    assert (val.best["interior_threshold"], val.best["foreground_threshold"]) in DEFAULT_GRID
    assert val.best["min_size"] in DEFAULT_MIN_SIZES and val.best["min_score"] in DEFAULT_MIN_SCORES
    assert len(val.scores) == len(DEFAULT_GRID) * len(DEFAULT_MIN_SIZES) * len(DEFAULT_MIN_SCORES)
    # a min_size larger than every disc removes them all: that grid point scores 0
    huge = tune_thresholds(ThresholdModel(), disc_data, split="all", grid=grid[:1], tile=32, min_sizes=(10, 10**6), min_scores=(0,), progress=False)
    assert huge.best["min_size"] == 10 and huge.scores[1]["map"] == 0.0 and huge.scores[1]["n_pred"] == 0
    assert val.scores[0]["n_images"] < 4
    with pytest.raises(CellsegError):
        tune_thresholds("classic", disc_data, progress=False)


def test_tune_min_sizes_are_model_px_behind_a_zoom(disc_data):
    """Tuning at --scale 2 stores min sizes in model px, which filter size / 4 image px at that scale,
    so `evaluate --scale 2` with the stored value scores what tune reported."""
    from cellseg.inference import Rescaled

    zoomed = Rescaled(ThresholdModel(), 2.0)
    disc_area = int((discs((64, 80), [(30, 30)], radius=8) == 1).sum())  # about 200 image px, 800 model px
    result = tune_thresholds(zoomed, disc_data, split="all", grid=[(0.5, 0.5)], tile=32, min_sizes=(4 * disc_area - 200, 4 * disc_area + 200), min_scores=(0,), progress=False)
    assert [s["map"] for s in result.scores] == [pytest.approx(1.0), 0.0]
    assert result.best["min_size"] == 4 * disc_area - 200
    tuned = ThresholdModel()
    tuned.postprocess = result.best  # as `tune` stores it in the model
    report = evaluate_dataset(Rescaled(tuned, 2.0), disc_data, tile=32, progress=False)
    assert report.summary["map"] == pytest.approx(result.best_map)


class CoreModel(ThresholdModel):
    """A fake network with bright cores as interior (the seeds), dimmer rims as boundary."""

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = batch[:, 0]
        cls = np.where(x > 0.7, 1, np.where(x > 0.2, 2, 0))
        return np.log(np.stack([cls == k for k in range(3)], axis=1) * 0.98 + 0.01).astype(np.float32)


def test_tune_keeps_the_stored_min_seed_size_zoomed_as_inference_does(tmp_path):
    """Two touching cells with a core each: dropping the cores (min_seed_size) merges them. Tuning
    applies the seed filter the model stores, in model px behind a zoom, so it scores what
    evaluate (and infer) then see."""
    from cellseg.inference import Rescaled

    yy, xx = np.mgrid[:64, :80]
    dist = [np.hypot(yy - 32, xx - cx) for cx in (30, 48)]
    gt = np.where(np.minimum(*dist) <= 10, np.where(dist[0] <= dist[1], 1, 2), 0).astype(np.uint16)
    image = np.where(np.minimum(*dist) <= 4, 250, np.where(gt > 0, 120, 20)).astype(np.uint8)  # cores of ~50 px
    root = tmp_path / "touching"
    write_png(root / "images" / "t.png", image)
    write_png(root / "masks" / "t.png", gt)
    scores = {}
    for stored, scale in [(30, 1.0), (100, 1.0), (100, 2.0)]:  # at scale 2, 100 model px are 25 image px
        model = CoreModel()
        model.postprocess = {"min_seed_size": stored}
        result = tune_thresholds(Rescaled(model, scale) if scale != 1.0 else model, root, split="all", grid=[(0.5, 0.5)],
                                 tile=32, min_sizes=(0,), progress=False)
        model.postprocess = {**model.postprocess, **result.best}  # as `tune` stores it
        report = evaluate_dataset(Rescaled(model, scale) if scale != 1.0 else model, root, split="all", tile=32, progress=False)
        assert report.summary["map"] == pytest.approx(result.best_map), (stored, scale)
        scores[stored, scale] = (result.best_map, result.scores[0]["n_pred"])
    assert scores[30, 1.0][1] == 2 and scores[30, 1.0][0] > 0.5  # both cores kept: two cells
    assert scores[100, 1.0][1] == 1 and scores[100, 1.0][0] < scores[30, 1.0][0]  # cores dropped: one merged object
    assert scores[100, 2.0][1] == 2  # the stored size is model px: 25 image px keep both cores


def test_tune_refuses_a_split_without_objects(disc_data, tmp_path):
    import shutil

    root = tmp_path / "empty"
    shutil.copytree(disc_data, root)
    for mask in (root / "masks").iterdir():
        write_png(mask, np.zeros((64, 80), np.uint16))
    with pytest.raises(CellsegError, match="the all split has no labelled object"):
        tune_thresholds(ThresholdModel(), root, split="all", tile=32, progress=False)


def test_bad_files_are_named(tiny_data, tmp_path):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(tiny_data, root)
    stem, _, mask = list_pairs(root)[2]
    mask = root / "masks" / mask.name
    mask.write_bytes(b"not a png")
    with pytest.raises(CellsegError, match=stem):
        evaluate_dataset("classic", root, progress=False)
    write_png(mask, np.zeros((10, 10), np.uint16))
    with pytest.raises(CellsegError, match="mask is 10x10"):
        evaluate_dataset("classic", root, progress=False)
    with pytest.raises(CellsegError, match="split"):
        evaluate_dataset("classic", tiny_data, split="test", progress=False)


# --------------------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def classic_report(tiny_data) -> EvalReport:
    return evaluate_dataset("classic", tiny_data, progress=False, keep_worst=2)


def test_write_report(classic_report, tmp_path):
    paths = write_report(classic_report, tmp_path / "out")
    assert set(paths) == {"per_image", "summary", "worst"}
    df = pd.read_csv(paths["per_image"])
    assert len(df) == 8 and list(df.columns[:2]) == ["stem", "map"] and "seconds" in df.columns
    summary = json.loads(paths["summary"].read_text())
    for key in (*METRICS, "n_true", "n_pred", "n_images", "model", "split"):
        assert key in summary
    assert summary["n_images"] == 8 and summary["params"]["split"] == "all"
    assert paths["worst"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_fig = EvalReport(classic_report.per_image, classic_report.summary, classic_report.params)
    assert "worst" not in write_report(no_fig, tmp_path / "nofig")
    # a report written over an earlier one leaves none of its files behind
    assert "worst" not in write_report(no_fig, tmp_path / "out") and not (tmp_path / "out" / "worst.png").exists()
    from cellseg.evaluate import remove_report

    write_report(classic_report, tmp_path / "out" / "classic")
    assert remove_report(tmp_path / "out" / "classic") and not (tmp_path / "out" / "classic").exists()
    assert not remove_report(tmp_path / "out" / "classic")
    network = EvalReport(classic_report.per_image, {**classic_report.summary, "model": "unet.onnx"}, classic_report.params)
    write_report(network, tmp_path / "mine" / "classic")  # a user's own report in a folder named classic
    assert not remove_report(tmp_path / "mine" / "classic") and (tmp_path / "mine" / "classic" / "summary.json").is_file()


def test_log_report(classic_report, tmp_path, tracking):
    from mlflow import MlflowClient

    paths = write_report(classic_report, tmp_path / "out")
    run_id = log_report(classic_report, paths, experiment="test-eval", run_name="classic-all")
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["map"] == pytest.approx(classic_report.summary["map"])
    assert run.data.metrics["n_images"] == 8
    assert run.data.params["model"] == "classic" and run.data.params["split"] == "all"
    names = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert {"per_image.csv", "summary.json", "worst.png"} <= names
    # with a baseline: its metrics as classic.*, its files under classic/
    base_paths = write_report(classic_report, tmp_path / "out" / "classic")
    run_id = log_report(classic_report, paths, experiment="test-eval", baseline=(classic_report, base_paths))
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics["classic.map"] == pytest.approx(classic_report.summary["map"])
    assert {a.path for a in MlflowClient().list_artifacts(run_id, "classic")} == {"classic/per_image.csv", "classic/summary.json", "classic/worst.png"}


def test_format_table(classic_report):
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(format_table(classic_report))
    console.print(format_table(classic_report, baseline=classic_report))
    text = console.export_text()
    assert "map" in text and "classic baseline" in text and "n_images" in text


def test_flip_tta_is_recorded_and_scores_a_pixelwise_model_the_same(disc_data):
    from cellseg.inference import FlipAverage

    plain = evaluate_dataset(ThresholdModel(), disc_data, tile=32, progress=False)
    tta = evaluate_dataset(FlipAverage(ThresholdModel()), disc_data, tile=32, progress=False)
    assert tta.params["tta"] is True and plain.params["tta"] is False
    assert tta.summary["map"] == pytest.approx(plain.summary["map"])  # flips change nothing per pixel


class InvertingModel(ThresholdModel):
    """ThresholdModel for a model that inverts bright-background images (as `data.invert_bright`)."""

    invert_bright = True


@pytest.fixture
def two_kinds(tmp_path):
    """2 dark-background and 2 bright-background images of the same discs: a bright core (radius 5)
    in a fainter ring (to radius 8). The dark-background masks hold the whole disc, the
    bright-background ones only the core, so each kind is exact at its own interior threshold."""
    root = tmp_path / "kinds"
    yy, xx = np.mgrid[:64, :80]
    for i in range(4):
        bright = i >= 2
        centres = [(18, 20), (44, 56)] if i % 2 else [(20, 58), (46, 22)]
        dist = np.min([np.hypot(yy - cy, xx - cx) for cy, cx in centres], axis=0)
        img = np.where(dist <= 5, 200, np.where(dist <= 8, 119, 20)).astype(np.uint8)
        gt = discs((64, 80), centres, radius=5 if bright else 8)
        write_png(root / "images" / f"k{i}.png", 255 - img if bright else img)
        write_png(root / "masks" / f"k{i}.png", gt.astype(np.uint16))
    return root


def test_tune_gives_bright_background_images_their_own_thresholds(two_kinds):
    grid = [(0.5, 0.5), (0.9, 0.9)]
    kw = dict(split="all", grid=grid, tile=32, min_sizes=(10,), min_scores=(0,), progress=False)
    result = tune_thresholds(InvertingModel(), two_kinds, min_group=2, **kw)
    assert result.best == {"interior_threshold": 0.5, "foreground_threshold": 0.5, "min_size": 10, "min_score": 0.0}
    assert result.best_bright == {"interior_threshold": 0.9, "foreground_threshold": 0.9, "min_size": 10, "min_score": 0.0}
    assert result.best_map == pytest.approx(1.0) and max(s["map"] for s in result.scores) < 0.9  # one point for all is worse
    assert result.groups == {"other": {"images": 2, "map": pytest.approx(1.0)}, "bright": {"images": 2, "map": pytest.approx(1.0)}}
    # too few images of a kind, or a model that inverts nothing: one operating point
    assert tune_thresholds(InvertingModel(), two_kinds, min_group=3, **kw).best_bright is None
    assert tune_thresholds(ThresholdModel(), two_kinds, min_group=1, **kw).best_bright is None

    # evaluate applies each kind's point; explicit options override both
    model = InvertingModel()
    model.postprocess, model.postprocess_bright = result.best, result.best_bright
    report = evaluate_dataset(model, two_kinds, tile=32, progress=False)
    assert report.summary["map"] == pytest.approx(1.0) and report.params["bright_images"] == 2
    assert report.params["postprocess_bright.interior_threshold"] == 0.9
    model.postprocess_bright = {}
    assert evaluate_dataset(model, two_kinds, tile=32, progress=False).summary["map"] < 0.9
    model.postprocess_bright = result.best_bright
    forced = evaluate_dataset(model, two_kinds, tile=32, progress=False, postprocess_kwargs={"interior_threshold": 0.5, "foreground_threshold": 0.5})
    assert forced.summary["map"] < 0.9 and "postprocess_bright.interior_threshold" not in forced.params


def test_infer_applies_the_bright_background_thresholds(two_kinds, tmp_path):
    from cellseg.batch import InferOptions, segment_folder

    model = InvertingModel()
    model.postprocess = {"interior_threshold": 0.5, "foreground_threshold": 0.5, "min_size": 10}
    model.postprocess_bright = {"interior_threshold": 0.9, "foreground_threshold": 0.9, "min_size": 10}
    for probs in (False, True):  # thresholds applied while tiling (masks sink) or after (probabilities kept)
        out = tmp_path / f"out{probs}"
        summary = segment_folder(model, two_kinds / "images", out, InferOptions(tile=32, save_probs=probs), progress=False)
        assert summary.ok and summary.postprocess_bright["interior_threshold"] == 0.9
        for i in range(4):
            labels = read_mask(out / f"k{i}_masks.tif")
            gt = read_mask(two_kinds / "masks" / f"k{i}.png")
            assert labels.max() == 2 and abs(int((labels > 0).sum()) - int((gt > 0).sum())) < 10, (probs, i)


def test_evaluate_and_tune_read_the_chosen_channel(disc_data, tmp_path):
    """A dataset of 2-channel ImageJ TIFFs (an even stain in channel 0, the discs in channel 1):
    refused without --channel, scored on channel 1 with it, as the 2-D images are."""
    import tifffile

    two = tmp_path / "two"
    (two / "images").mkdir(parents=True)
    (two / "masks").symlink_to(disc_data / "masks")
    for _, image, _ in list_pairs(disc_data):
        nuclei = read_image(image).astype(np.uint8)
        tifffile.imwrite(two / "images" / f"{image.stem}.tif", np.stack([np.full_like(nuclei, 90), nuclei]),
                         imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(CellsegError, match=r"d0.tif: 64x80 image with 2 channels \(CYX\); pick the nuclear stain with --channel K"):
        evaluate_dataset("classic", two, progress=False)
    for model in ("classic", ThresholdModel()):
        report = evaluate_dataset(model, two, tile=32, progress=False, channel=1)
        plain = evaluate_dataset(model, disc_data, tile=32, progress=False).summary
        assert {k: v for k, v in report.summary.items() if k != "seconds"} == {k: v for k, v in plain.items() if k != "seconds"}
        assert report.params["channel"] == 1
    grid = [(0.5, 0.5)]
    tuned = tune_thresholds(ThresholdModel(), two, split="all", grid=grid, tile=32, min_sizes=(10,), progress=False, channel=1)
    assert tuned.best_map == pytest.approx(1.0)
    assert tune_thresholds(ThresholdModel(), two, split="all", grid=grid, tile=32, min_sizes=(10,), progress=False,
                           channel=0).best_map == 0.0  # the even stain: nothing to find


def test_tune_finds_the_min_score_that_drops_unlabelled_faint_objects(tmp_path):
    """Faint discs the masks leave out come out as objects the fake network is less sure of
    (mean p(foreground) about 0.92 against 1.0): tune picks a min score that drops them; evaluate
    with the stored value, and infer through both its sinks, then drop them too."""
    import tifffile

    from cellseg.batch import InferOptions, segment_folder

    root = tmp_path / "faint"
    for i in range(4):
        bright, faint = [(16, 18), (46, 60)], [(44, 20), (16, 58)][: 1 + i % 2]
        image = np.where(discs((64, 80), bright, radius=7) > 0, 200, np.where(discs((64, 80), faint, radius=7) > 0, 128, 20))
        write_png(root / "images" / f"f{i}.png", image.astype(np.uint8))
        write_png(root / "masks" / f"f{i}.png", discs((64, 80), bright, radius=7).astype(np.uint16))
    kw = dict(split="all", grid=[(0.5, 0.5)], tile=32, min_sizes=(10,), progress=False)
    result = tune_thresholds(ThresholdModel(), root, min_scores=(0.0, 0.95, 0.999999), **kw)
    maps = [s["map"] for s in result.scores]
    assert maps[0] < 0.8 and maps[1] == pytest.approx(1.0) and maps[2] == 0.0  # all kept / faint dropped / all dropped
    assert result.best["min_score"] == 0.95
    model = ThresholdModel()
    model.postprocess = result.best  # as `tune` stores it
    assert evaluate_dataset(model, root, tile=32, progress=False).summary["map"] == pytest.approx(1.0)
    kept = evaluate_dataset(model, root, tile=32, progress=False, postprocess_kwargs={"min_score": 0.0})
    assert kept.summary["n_pred"] == 14 and kept.summary["n_true"] == 8
    for save_probs in (False, True):  # thresholded masks + p(background) (MaskSink), or the whole probabilities
        out = tmp_path / f"infer{save_probs}"
        summary = segment_folder(model, root / "images", out, InferOptions(tile=32, save_probs=save_probs), progress=False)
        assert summary.postprocess["min_score"] == 0.95
        assert [int(tifffile.imread(out / f"f{i}_masks.tif").max()) for i in range(4)] == [2, 2, 2, 2]
