"""Benchmark: int8 quantisation of the ONNX model, its speed and its accuracy change.

Usage: python bench/int8.py [--model PATH] [--data DIR] [--calib N] [--quick] [--json OUT]

Quantises the model with onnxruntime.quantization (static QDQ as `cellseg quantize` does it,
calibrated on N images of the training split; dynamic ConvInteger), then scores the fp32 model and each int8 model with
`evaluate_dataset` on the validation split -- the call behind `cellseg evaluate DATA --split val`,
with the post-processing thresholds stored in the model -- and times each pass (inference and
post-processing, after a warm-up; one process, one after the other). Without the DSB data it
uses the synthetic nuclei dataset. The int8 files are written next to the JSON (`model.int8-*.onnx`) so that
`cellseg evaluate --model` can be run on them again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from infer import quantize  # noqa: E402

from cellseg.evaluate import evaluate_dataset, select_pairs  # noqa: E402
from cellseg.inference import OnnxModel  # noqa: E402
from cellseg.quantize import calibration_images  # noqa: E402

DSB = ROOT.parent / "shared" / "data" / "dsb2018-train"
METRICS = ("map", "ap50", "f1", "seg", "iou")


def score(path: str, root: Path, split: str) -> dict:
    """evaluate_dataset of one ONNX file: the summary metrics and the wall time of the pass."""
    model = OnnxModel(path)
    model(np.zeros((1, model.in_channels, 200, 200), np.float32))  # warm-up: session set-up is not timed
    t0 = time.perf_counter()
    report = evaluate_dataset(model, root, split=split, progress=False, keep_worst=0)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, **{k: float(report.summary[k]) for k in METRICS},
            "n_pred": int(report.summary["n_pred"]), "n_images": int(report.summary["n_images"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "cellseg-nuclei.onnx")
    ap.add_argument("--data", type=Path, help="images/ + masks/ dataset (default: DSB 2018 when present, else synthetic)")
    ap.add_argument("--calib", type=int, default=32, help="training-split images to calibrate the static quantiser on")
    ap.add_argument("--quick", action="store_true", help="smoke run: synthetic data, 4 calibration images")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "int8.json")
    args = ap.parse_args(argv)
    if not args.model.is_file():
        print(f"{args.model}: no such model file", file=sys.stderr)
        return 2
    if args.data is None and (args.quick or not (DSB / "images").is_dir()):
        from cellseg.data.synth import ensure_default_dataset

        args.data = ensure_default_dataset(n=12 if args.quick else 48)
    root = args.data or DSB
    split = "val"
    if not select_pairs(root, split):
        split = "all"  # tiny datasets may have no validation image
    work = args.json.parent
    work.mkdir(parents=True, exist_ok=True)

    fp32 = OnnxModel(str(args.model))
    calib = calibration_images(root, fp32.low_percentile, fp32.high_percentile, fp32.invert_bright,
                               4 if args.quick else args.calib, multiple=fp32.size_multiple, channel=fp32.channel)
    t0 = time.perf_counter()
    files = quantize(str(args.model), work, calib)
    quant_seconds = time.perf_counter() - t0
    (work / "model.pre.onnx").unlink(missing_ok=True)

    results = {"fp32": {"file": str(args.model), **score(str(args.model), root, split)}}
    for kind, path in files.items():
        name = f"int8-{kind}"
        if path.startswith("error"):
            results[name] = {"error": path}
            continue
        results[name] = {"file": path, **score(path, root, split)}
    ref = results["fp32"]
    for r in results.values():
        if "seconds" in r:
            r["speed_vs_fp32"] = ref["seconds"] / r["seconds"]
            r["delta"] = {k: r[k] - ref[k] for k in METRICS}

    print(f"\n{root} ({split} split, {ref['n_images']} images), model {args.model.name}, "
          f"calibration {len(calib)} images, quantisation {quant_seconds:.0f} s")
    print(f"{'model':14s} {'seconds':>8s} {'speed':>6s} " + " ".join(f"{k:>7s}" for k in METRICS))
    for name, r in results.items():
        if "error" in r:
            print(f"{name:14s} {r['error']}")
            continue
        print(f"{name:14s} {r['seconds']:8.1f} {r['speed_vs_fp32']:5.2f}x " + " ".join(f"{r[k]:7.3f}" for k in METRICS))
    args.json.write_text(json.dumps({"data": str(root), "split": split, "calibration_images": len(calib),
                                     "quantize_seconds": quant_seconds, "results": results}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
