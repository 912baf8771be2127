"""Benchmark: fast vs naive U-Net weight map on a real 520x696 DSB mask (best of N, one run).

Usage: python bench/weightmap.py [--mask PATH] [--repeat N] [--json OUT]
Without --mask it picks the 520x696 mask with the most nuclei from
../shared/data/dsb2018-train/masks (relative to the project root), or a synthetic mask of
random discs when that folder is missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.data.io import read_mask  # noqa: E402
from cellseg.data.targets import (  # noqa: E402
    class_balance_weights,
    instances_to_classes,
    unet_weight_map,
    unet_weight_map_naive,
)

MASK_DIR = ROOT.parent / "shared" / "data" / "dsb2018-train" / "masks"
SHAPE = (520, 696)


def pick_mask(folder: Path) -> tuple[np.ndarray, str]:
    """The 520x696 mask with the most nuclei in `folder`: (labels (H, W) int32, its path)."""
    best, best_n, best_path = None, -1, ""
    for path in sorted(folder.glob("*.png")):
        labels = read_mask(path)
        if labels.shape != SHAPE:
            continue
        n = len(np.unique(labels)) - 1
        if n > best_n:
            best, best_n, best_path = labels, n, str(path)
    if best is None:
        raise SystemExit(f"no {SHAPE[0]}x{SHAPE[1]} mask in {folder}")
    return best, best_path


def synthetic_mask(n: int = 300, seed: int = 0) -> np.ndarray:
    """520x696 int32 label image of n random discs of radius 4-10 px."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    labels = np.zeros(SHAPE, np.int32)
    for i in range(1, n + 1):
        cy, cx, r = rng.integers(0, SHAPE[0]), rng.integers(0, SHAPE[1]), rng.integers(4, 11)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return labels


def best_time(fn, labels: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    """Best wall time (s) of `repeat` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(labels)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask", type=Path, help="instance mask to use (default: busiest DSB 520x696 mask)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method; best is kept")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "weightmap.json")
    args = ap.parse_args(argv)

    if args.mask is not None:
        labels, source = read_mask(args.mask), str(args.mask)
    elif MASK_DIR.is_dir():
        labels, source = pick_mask(MASK_DIR)
    else:
        print(f"{MASK_DIR} missing: using a synthetic mask of random discs")
        labels, source = synthetic_mask(), "synthetic random discs"
    n_obj = len(np.unique(labels)) - 1

    t_naive, naive = best_time(unet_weight_map_naive, labels, args.repeat)
    t_fast, fast = best_time(unet_weight_map, labels, args.repeat)
    # compare where the border term matters (naive term > 1e-4): the rest is the class weight
    term = naive - class_balance_weights(instances_to_classes(labels))
    where = term > 1e-4
    max_diff = float(np.abs(fast - naive)[where].max()) if where.any() else 0.0
    max_diff_all = float(np.abs(fast - naive).max())
    ok = max_diff < 1e-4
    ratio = t_naive / t_fast

    print(f"mask: {source}  shape {labels.shape[0]}x{labels.shape[1]}  best of {args.repeat}")
    print(f"{'objects':>8} {'naive s':>9} {'fast s':>9} {'speed-up':>9} {'max|diff|':>10}")
    print(f"{n_obj:>8d} {t_naive:>9.3f} {t_fast:>9.4f} {ratio:>8.1f}x {max_diff:>10.2e}  {'OK' if ok else 'MISMATCH'}")

    result = {
        "mask": source,
        "shape": list(labels.shape),
        "n_objects": n_obj,
        "repeat": args.repeat,
        "naive_s": t_naive,
        "fast_s": t_fast,
        "speedup": ratio,
        "max_abs_diff_where_term_gt_1e-4": max_diff,
        "max_abs_diff_all_pixels": max_diff_all,
        "match": ok,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
