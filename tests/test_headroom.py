"""bench/headroom.py: its scale-1 scores are `cellseg evaluate`'s, its oracle and ensemble rows are what they say."""

import importlib.util
import json
from pathlib import Path

import pytest

from cellseg.data.synth import write_dataset
from cellseg.evaluate import evaluate_dataset
from cellseg.inference import OnnxModel

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "cellseg-nuclei.onnx"


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
    assert headroom.main([str(SHIPPED), str(SHIPPED), "--data", str(data), "--split", "all", "--scales", "0.7,1.4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    report = evaluate_dataset(OnnxModel(SHIPPED), data, split="all", progress=False, keep_worst=0)
    at_one = result["scales"]["1.0"]  # scale 1 is always measured
    assert at_one["n_images"] == 4 and at_one["map"] > 0.2
    assert at_one["map"] == pytest.approx(report.summary["map"], abs=1e-9)
    assert at_one["ap50"] == pytest.approx(report.summary["ap50"], abs=1e-9)
    assert set(result["scales"]) == {"0.7", "1.0", "1.4"}
    assert result["scales"]["0.7"]["map"] != at_one["map"]  # the image really was resized
    assert result["oracle_scale"]["map"] >= max(r["map"] for r in result["scales"].values())
    # the same model twice: the mean of identical probabilities is the model itself
    assert result["ensemble"]["map"] == pytest.approx(at_one["map"], abs=1e-12)
    assert [m["map"] for m in result["models"]] == pytest.approx([at_one["map"]] * 2, abs=1e-12)
    printed = capsys.readouterr().out
    assert "best scale per image (oracle)" in printed and "mean of the models probabilities" in printed


def test_headroom_refuses_bad_scales(data):
    with pytest.raises(SystemExit):
        _headroom().main([str(SHIPPED), "--data", str(data), "--scales", "1,zero"])
