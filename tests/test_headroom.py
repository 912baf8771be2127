"""bench/headroom.py: its scale-1 scores are `cellseg evaluate`'s, its oracle and ensemble rows are what they say."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cellseg.data.io import normalize_percentile, read_image, read_mask
from cellseg.data.synth import write_dataset
from cellseg.evaluate import evaluate_dataset, select_pairs
from cellseg.inference import OnnxModel, Rescaled, predict_tiled
from cellseg.metrics import aggregate, evaluate_image
from cellseg.postprocess import probabilities_to_instances

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "cellseg-nuclei.onnx"
INT8 = ROOT / "models" / "cellseg-nuclei.int8.onnx"  # a second model with other probabilities


def _headroom():
    spec = importlib.util.spec_from_file_location("headroom", ROOT / "bench" / "headroom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("headroom")
    write_dataset(root, n=4, size=(128, 128), seed=3)
    return root


def test_headroom_rows(data, tmp_path, capsys):
    headroom = _headroom()
    out = tmp_path / "h.json"
    argv = [str(SHIPPED), str(INT8), "--data", str(data), "--split", "all", "--scales", "0.7,1.4", "--json", str(out)]
    assert headroom.main(argv) == 0
    result = json.loads(out.read_text())
    fp32, int8 = OnnxModel(SHIPPED), OnnxModel(INT8)
    report = evaluate_dataset(fp32, data, split="all", progress=False, keep_worst=0)
    at_one = result["scales"]["1.0"]  # scale 1 is always measured
    assert at_one["n_images"] == 4 and at_one["map"] > 0.2
    assert at_one["map"] == pytest.approx(report.summary["map"], abs=1e-9)
    assert at_one["ap50"] == pytest.approx(report.summary["ap50"], abs=1e-9)
    assert set(result["scales"]) == {"0.7", "1.0", "1.4"}
    zoomed = evaluate_dataset(Rescaled(fp32, 0.7), data, split="all", progress=False, keep_worst=0)
    assert result["scales"]["0.7"]["map"] == pytest.approx(zoomed.summary["map"], abs=1e-9)  # = evaluate --scale 0.7
    assert result["scales"]["0.7"]["map"] != at_one["map"]
    for key in ("map", "ap50"):
        assert result["oracle_scale"][key] >= max(r[key] for r in result["scales"].values())
    # the ensemble row is the mean of the two models' probabilities, at the first model's thresholds
    rows = []
    for _, image_path, mask_path in select_pairs(data, "all"):
        raw = read_image(image_path)
        probs = [predict_tiled(m, normalize_percentile(raw, m.low_percentile, m.high_percentile, m.invert_bright)) for m in (fp32, int8)]
        assert not np.allclose(probs[0], probs[1], atol=1e-4)
        rows.append(evaluate_image(read_mask(mask_path), probabilities_to_instances((probs[0] + probs[1]) / 2, **fp32.postprocess)))
    assert result["ensemble"]["map"] == pytest.approx(aggregate(rows)["map"], abs=1e-6)
    assert result["models"][0]["map"] == at_one["map"]
    assert result["models"][1]["map"] == pytest.approx(evaluate_dataset(int8, data, split="all", progress=False, keep_worst=0).summary["map"], abs=1e-9)
    printed = capsys.readouterr().out
    assert "best scale per image (oracle)" in printed and "mean of the models probabilities" in printed


@pytest.mark.parametrize("scales", ["1,zero", "0,1", "nan", "20"])
def test_headroom_refuses_bad_scales(data, scales):
    with pytest.raises(SystemExit):
        _headroom().main([str(SHIPPED), "--data", str(data), "--scales", scales])
