"""--scale: images zoomed for the model (Rescaled), outputs at the image's size."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from typer.testing import CliRunner

from cellseg.cli import app
from cellseg.data.io import read_mask, read_pixels, write_labels_tiff
from cellseg.data.synth import write_dataset
from cellseg.errors import CellsegError
from cellseg.evaluate import evaluate_dataset
from cellseg.inference import FlipAverage, OnnxModel, Rescaled, TileBatcher, wrapper_settings

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "cellseg-nuclei.onnx"
ZOOM = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic nuclei at DSB-like size, and the same images and masks 4x larger."""
    root = tmp_path_factory.mktemp("rescaled")
    small, big = root / "small", root / "big"
    write_dataset(small, n=4, size=(96, 96), seed=3)
    (big / "images").mkdir(parents=True)
    (big / "masks").mkdir()
    side = 96 * ZOOM
    for p in sorted((small / "images").iterdir()):
        cv2.imwrite(str(big / "images" / p.name), cv2.resize(read_pixels(p), (side, side), interpolation=cv2.INTER_LINEAR))
    for p in sorted((small / "masks").iterdir()):
        write_labels_tiff(big / "masks" / f"{p.stem}.tif", cv2.resize(read_mask(p), (side, side), interpolation=cv2.INTER_NEAREST_EXACT))
    return small, big


@pytest.fixture(scope="module")
def model():
    return OnnxModel(SHIPPED)


class Recorder:
    """A stand-in model: records the tile shapes it is given, answers logits equal to the tile."""

    size_multiple, low_percentile, high_percentile = 8, 1.0, 99.8

    def __init__(self, postprocess=None):
        self.postprocess, self.seen = postprocess, []

    def __call__(self, batch):
        self.seen.append(batch.shape)
        return np.repeat(batch[:, :1], 3, axis=1)


def test_rescaled_zooms_exactly_and_returns_the_tile_shape(model):
    batch = np.random.default_rng(0).random((2, 1, 96, 104), dtype=np.float32)
    for scale in (0.25, 0.5, 1.7):
        assert Rescaled(model, scale)(batch).shape == (2, 3, 96, 104)
    rec = Recorder()
    out = Rescaled(rec, 0.3)(np.ones((1, 2, 40, 72), np.float32))  # off the size multiple, two channels
    assert rec.seen == [(1, 2, 12, 22)]  # round(40 * 0.3), round(72 * 0.3): the model pads, not the zoom
    assert out.shape == (1, 3, 40, 72) and np.allclose(out, 1)
    Rescaled(rec, 0.1)(np.ones((1, 1, 16, 16), np.float32))
    assert rec.seen[-1] == (1, 1, 8, 8)  # never below one size multiple (the model's reflect padding needs pixels)


def test_rescaled_converts_sizes_to_image_pixels(model):
    assert Rescaled(model, 0.5).postprocess["min_size"] == model.postprocess["min_size"] * 4
    assert Rescaled(model, 2).postprocess["min_size"] == round(model.postprocess["min_size"] / 4)
    assert Rescaled(model, 0.5).postprocess["min_seed_size"] == 3 * 4  # the default, converted too
    assert Rescaled(Recorder(), 0.5).postprocess == {"min_size": 40, "min_seed_size": 12}  # nothing tuned: defaults
    assert Rescaled(model, 0.5).low_percentile == model.low_percentile  # other attributes are the model's
    assert Rescaled(FlipAverage(model), 0.5).postprocess == FlipAverage(Rescaled(model, 0.5)).postprocess
    model.postprocess_bright = {}
    assert Rescaled(model, 0.5).postprocess_bright == {}  # none stored: the usual point serves bright images too
    model.postprocess_bright = {"interior_threshold": 0.4, "min_size": 40}
    assert Rescaled(model, 0.5).postprocess_bright == {"interior_threshold": 0.4, "min_size": 160, "min_seed_size": 12}
    assert FlipAverage(Rescaled(model, 2)).postprocess_bright["min_size"] == 10
    assert wrapper_settings(FlipAverage(Rescaled(model, 0.5))) == {"tta": True, "scale": 0.5}
    assert wrapper_settings(model) == {"tta": False, "scale": 1.0}
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e9):
        with pytest.raises(CellsegError, match=r"--scale \S+: expected a zoom factor between 0.1 and 10$"):
            Rescaled(model, bad)


def test_tiler_margin_is_in_the_models_pixels(model):
    assert TileBatcher(model).margin == 32
    assert TileBatcher(Rescaled(model, 0.25)).margin == 128
    assert TileBatcher(FlipAverage(Rescaled(model, 2))).margin == 16


def test_scale_restores_accuracy_on_objects_too_large_for_the_model(data, model):
    small, big = data
    at_size = evaluate_dataset(model, small, progress=False, keep_worst=0).summary["map"]
    too_big = evaluate_dataset(model, big, progress=False, keep_worst=0).summary["map"]
    report = evaluate_dataset(Rescaled(model, 1 / ZOOM), big, progress=False, keep_worst=0)
    assert too_big < at_size - 0.2  # 4x larger nuclei are over-split by the DSB model
    assert report.summary["map"] > too_big + 0.2 and report.summary["map"] > at_size - 0.1
    assert report.params["scale"] == 1 / ZOOM


def test_infer_and_evaluate_take_scale(data, tmp_path):
    _, big = data
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["infer", str(big / "images"), "-o", str(out), "--model", str(SHIPPED), "--scale", "0.25", "-q"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tile"] == 768 * 4  # --tile counts the model's pixels: 768 of them cover 3072 image px
    assert "scale 0.25" in summary["model"] and summary["postprocess"]["min_size"] == 16 * OnnxModel(SHIPPED).postprocess["min_size"]
    masks = tifffile.imread(out / "synth_0000_masks.tif")
    assert masks.shape == (96 * ZOOM, 96 * ZOOM) and masks.max() > 0
    assert summary["scale"] == 0.25 and summary["tta"] is False

    # a --min-size given by the user is in image pixels already: not converted
    res = runner.invoke(app, ["infer", str(big / "images"), "-o", str(tmp_path / "o2"), "--model", str(SHIPPED), "--scale", "0.25", "--min-size", "7", "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o2" / "summary.json").read_text())["postprocess"]["min_size"] == 7

    res = runner.invoke(app, ["evaluate", str(big), "--model", str(SHIPPED), "--scale", "0.25", "--tta", "--no-baseline", "-q", "-o", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    params = json.loads((tmp_path / "ev" / "summary.json").read_text())["params"]
    assert params["scale"] == 0.25 and params["tta"] is True and params["tile"] == 768 * 4

    for args, message in (
        (["infer", str(big / "images"), "-o", str(tmp_path / "x"), "--scale", "0"], "--scale 0: expected a zoom factor between 0.1 and 10"),
        (["evaluate", str(big), "--model", "classic", "--scale", "0.5"], "--scale applies to network models, not classic"),
    ):
        res = runner.invoke(app, args)  # the console script prints a CellsegError as one line
        assert isinstance(res.exception, CellsegError) and message in str(res.exception), res.output
    assert not (tmp_path / "x").exists()
