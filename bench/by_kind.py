"""Scores of a `cellseg evaluate` report grouped by image kind.

Usage: python bench/by_kind.py REPORT_DIR DATA_DIR

Kinds: grey or colour (channels differ), dark or bright background (median grey level, of the
mean of the colours, above half the range), as in the DSB 2018 mix of fluorescence, brightfield and H&E-like tissue.
Prints the number of images and the per-image means of mAP and AP@0.5 for each kind.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from cellseg.data.dataset import list_pairs
from cellseg.data.io import read_pixels, to_single_channel


def image_kind(path: Path) -> str:
    """'grey-dark', 'grey-bright', 'colour-dark' or 'colour-bright' for one image file."""
    raw = np.asarray(read_pixels(path))
    colour = raw.ndim == 3 and raw.shape[-1] >= 3 and not (
        np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 1], raw[..., 2])
    )
    grey = raw[..., :3].astype(np.float32).mean(axis=-1) if colour else to_single_channel(raw, path)  # kinds as before the darkest-colour reading
    top = np.iinfo(raw.dtype).max if raw.dtype.kind in "ui" else float(grey.max() or 1)
    return ("colour" if colour else "grey") + ("-bright" if np.median(grey) > top / 2 else "-dark")


def main(report: Path, data: Path) -> None:
    images = {stem: image_path for stem, image_path, _ in list_pairs(data)}
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(report / "per_image.csv") as f:
        for row in csv.DictReader(f):
            groups[image_kind(images[row["stem"]])].append((float(row["map"]), float(row["ap50"])))
    print(f"{'kind':<14} {'images':>6} {'mAP':>6} {'AP@0.5':>7}")
    for kind, rows in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        m, a = np.mean(rows, axis=0)
        print(f"{kind:<14} {len(rows):>6} {m:>6.3f} {a:>7.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2])
    main(Path(sys.argv[1]), Path(sys.argv[2]))
