"""How much test-time rescaling or an ensemble could add to a model (upper bounds, using the labels).

Usage: python bench/headroom.py [--data DIR] [--split val] [--scales 0.5,0.7,1,1.4,2] MODEL.onnx [MORE.onnx ...]

For every image of the split, the first model predicts at each scale exactly as `cellseg evaluate
--scale` does (`inference.Rescaled`: tiles zoomed for the model, probabilities zoomed back,
minimum sizes converted to image pixels). Printed: the mean mAP / AP@0.5 at each fixed scale;
the per-image oracle (for each image the scale with the best mAP, and separately the one with
the best AP@0.5, chosen with its labels: no real method can do better by one zoom per image);
and, with more models, each model alone and the mean of all their probabilities at scale 1
(thresholds of the first model). A helper for deciding what to try next, not a benchmark (not
in run_all.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.data.io import normalize_flagged, read_image, read_mask  # noqa: E402
from cellseg.evaluate import select_pairs  # noqa: E402
from cellseg.errors import CellsegError  # noqa: E402
from cellseg.inference import OnnxModel, Rescaled, check_scale, predict_tiled, read_channel  # noqa: E402
from cellseg.metrics import aggregate, evaluate_image  # noqa: E402
from cellseg.postprocess import model_postprocess, probabilities_to_instances  # noqa: E402

DSB = ROOT.parent / "shared" / "data" / "dsb2018-train"


def headroom(paths: list[Path], data: Path, split: str, scales: list[float]) -> dict:
    """{'scales': {scale: summary}, 'oracle_scale': summary, 'models': [...], 'ensemble': summary | None}."""
    if 1.0 not in scales:
        scales = sorted(scales + [1.0])
    models = [OnnxModel(p) for p in paths]
    first = models[0]
    zoomed = {s: Rescaled(first, s) if s != 1 else first for s in scales}
    # sizes in image px at each zoom; bright-background (inverted) images at the model's own point for them
    post = {(s, b): model_postprocess(z, bright=b) for s, z in zoomed.items() for b in (False, True)}
    pairs = select_pairs(data, split)
    if not pairs:
        raise SystemExit(f"{data}: no images in the {split} split")
    per_scale: dict[float, list[dict]] = {s: [] for s in scales}
    oracle_map, oracle_ap50, others, ensemble = [], [], [[] for _ in models[1:]], []
    for _, image_path, mask_path in pairs:
        labels = read_mask(mask_path)
        raw = read_image(image_path, channel=read_channel(first))
        rows = {}
        img, bright = normalize_flagged(raw, first.low_percentile, first.high_percentile, first.invert_bright)
        for s in scales:
            probs = predict_tiled(zoomed[s], img)
            rows[s] = evaluate_image(labels, probabilities_to_instances(probs, **post[s, bright]))
            per_scale[s].append(rows[s])
            if s == 1.0:
                mean_probs = probs / len(models)
        oracle_map.append(max(r["map"] for r in rows.values()))  # per metric: each its own best scale
        oracle_ap50.append(max(r["ap50"] for r in rows.values()))
        if len(models) > 1:
            for m, rows_m in zip(models[1:], others):
                img, bright_m = normalize_flagged(raw, m.low_percentile, m.high_percentile, m.invert_bright)
                probs = predict_tiled(m, img)
                rows_m.append(evaluate_image(labels, probabilities_to_instances(probs, **model_postprocess(m, bright=bright_m))))
                mean_probs += probs / len(models)
            ensemble.append(evaluate_image(labels, probabilities_to_instances(mean_probs, **post[1.0, bright])))
    pick = lambda rows: {k: aggregate(rows)[k] for k in ("map", "ap50", "n_images")}  # noqa: E731
    return {
        "split": split, "postprocess": post[1.0, False], "postprocess_bright": post[1.0, True],
        "scales": {str(s): pick(r) for s, r in per_scale.items()},
        "oracle_scale": {"map": float(np.nanmean(oracle_map)), "ap50": float(np.nanmean(oracle_ap50)), "n_images": len(pairs)},
        "models": [{"file": str(p), **pick(r)} for p, r in zip(paths, [per_scale[1.0], *others])],
        "ensemble": pick(ensemble) if ensemble else None,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", type=Path, nargs="+", help="cellseg ONNX files; the first is rescaled")
    ap.add_argument("--data", type=Path, default=DSB, help="images/ + masks/ dataset (default: DSB 2018)")
    ap.add_argument("--split", default="val", choices=("val", "train", "all"))
    ap.add_argument("--scales", default="0.5,0.7,1,1.4,2", help="comma-separated zoom factors")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    try:
        scales = sorted({float(s) for s in args.scales.split(",")})
    except ValueError:
        ap.error(f"--scales {args.scales}: expected numbers separated by commas")
    try:
        for s in scales:
            check_scale(s)
    except CellsegError as exc:
        ap.error(f"--scales {args.scales}: {exc}")
    out = headroom(args.models, args.data, args.split, scales)
    n = out["oracle_scale"]["n_images"]
    print(f"{args.models[0].name} on {n} {args.split} images, thresholds {out['postprocess']} (bright-background images {out['postprocess_bright']})")
    print(f"{'':<34} {'mAP':>6} {'AP@0.5':>7}")
    for s, r in out["scales"].items():
        print(f"{'scale ' + s:<34} {r['map']:>6.3f} {r['ap50']:>7.3f}")
    r = out["oracle_scale"]
    print(f"{'best scale per image (oracle)':<34} {r['map']:>6.3f} {r['ap50']:>7.3f}  (each metric's own best)")
    if out["ensemble"]:
        for m in out["models"]:
            print(f"{Path(m['file']).name[:34]:<34} {m['map']:>6.3f} {m['ap50']:>7.3f}")
        r = out["ensemble"]
        print(f"{'mean of the models probabilities':<34} {r['map']:>6.3f} {r['ap50']:>7.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
