"""Two `cellseg evaluate` reports of the same images compared image by image.

Usage: python bench/paired.py OLD_REPORT_DIR NEW_REPORT_DIR [--draws 5000] [--seed 0]

For mAP, AP@0.5 and SEG: both means, the mean per-image difference (new - old), its 95%
bootstrap interval (images resampled with replacement, `--draws` times) and how many images got
better / worse. The reports must score the same images (e.g. both `--split val`).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

METRICS = ("map", "ap50", "seg")


def read_scores(report: Path) -> dict[str, dict[str, float]]:
    """stem -> {metric: value} from a report's per_image.csv."""
    path = report / "per_image.csv"
    if not path.is_file():
        raise SystemExit(f"{report}: no per_image.csv (not a cellseg evaluate report)")
    with open(path, newline="") as f:
        return {row["stem"]: {k: float(row[k]) for k in METRICS} for row in csv.DictReader(f)}


def paired(old: dict, new: dict, draws: int = 5000, seed: int = 0) -> dict[str, dict[str, float]]:
    """{metric: {old, new, diff, low, high, better, worse}} over the images both reports hold."""
    if set(old) != set(new):
        raise SystemExit(f"the reports score different images ({len(set(old) ^ set(new))} differ): compare reports of one split")
    stems = sorted(old)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(stems), (draws, len(stems)))
    out = {}
    for key in METRICS:
        a = np.array([old[s][key] for s in stems])
        b = np.array([new[s][key] for s in stems])
        d = b - a
        low, high = np.percentile(d[picks].mean(axis=1), [2.5, 97.5])
        out[key] = {"old": float(a.mean()), "new": float(b.mean()), "diff": float(d.mean()), "low": float(low),
                    "high": float(high), "better": int((d > 1e-9).sum()), "worse": int((d < -1e-9).sum())}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--draws", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = paired(read_scores(args.old), read_scores(args.new), args.draws, args.seed)
    print(f"{'metric':<6} {'old':>6} {'new':>6} {'diff':>7}  95% interval        better worse")
    for key, r in result.items():
        print(f"{key:<6} {r['old']:>6.3f} {r['new']:>6.3f} {r['diff']:>+7.3f}  [{r['low']:+.3f}, {r['high']:+.3f}]  {r['better']:>6} {r['worse']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
