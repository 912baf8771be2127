"""bench/paired.py: per-image differences of two evaluate reports and their bootstrap interval."""

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _paired():
    spec = importlib.util.spec_from_file_location("paired", ROOT / "bench" / "paired.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(folder: Path, scores: dict[str, float]) -> Path:
    folder.mkdir()
    with open(folder / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["stem", "map", "ap50", "seg", "seconds"])
        w.writeheader()
        for stem, v in scores.items():
            w.writerow({"stem": stem, "map": v, "ap50": min(1.0, v + 0.2), "seg": v, "seconds": 0.1})
    return folder


def test_paired_differences_and_interval(tmp_path, capsys):
    paired = _paired()
    old = {f"im{i}": 0.1 * i for i in range(8)}
    a = _report(tmp_path / "old", old)
    b = _report(tmp_path / "new", {s: v + (0.05 if i % 2 else -0.01) for i, (s, v) in enumerate(old.items())})
    r = paired.paired(paired.read_scores(a), paired.read_scores(b), draws=2000)["map"]
    assert r["diff"] == pytest.approx(0.02) and r["new"] - r["old"] == pytest.approx(0.02)
    assert -0.01 <= r["low"] < r["diff"] < r["high"] <= 0.05 and (r["better"], r["worse"]) == (4, 4)
    same = paired.paired(paired.read_scores(a), paired.read_scores(a))["seg"]
    assert same["diff"] == same["low"] == same["high"] == 0 and same["better"] == same["worse"] == 0
    assert paired.main([str(a), str(b)]) == 0 and "map     0.350  0.370  +0.020" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="score different images"):
        paired.paired(paired.read_scores(a), {"other": {"map": 0, "ap50": 0, "seg": 0}})
    with pytest.raises(SystemExit, match="not a cellseg evaluate report"):
        paired.read_scores(tmp_path)
