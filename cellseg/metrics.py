"""Instance segmentation metrics: overlaps, IoU, CTC SEG, DSB-style matching and average precision.

Label images: integer (or bool) arrays of any shape, 0 = background, any non-negative ids (they
need not be contiguous). Object i of an overlap/IoU matrix is the i-th smallest id of its image.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from cellseg.errors import CellsegError
from cellseg.postprocess import _check_labels, _compact

THRESHOLDS = np.round(np.linspace(0.5, 0.95, 10), 2)  # IoU thresholds 0.50, 0.55, ..., 0.95
THRESHOLDS.setflags(write=False)


def _check_pair(gt, pred) -> tuple[np.ndarray, np.ndarray]:
    """Checked label arrays of equal shape."""
    g, p = _check_labels(gt, "gt"), _check_labels(pred, "pred")
    if g.shape != p.shape:
        raise CellsegError(f"gt and pred must have the same shape, got {g.shape} and {p.shape}")
    return g, p


def _overlap(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Overlap matrix of two checked label arrays (see overlap_matrix)."""
    g, n_gt = _compact(g)
    p, n_pred = _compact(p)
    idx = g.ravel() * (n_pred + 1) + p.ravel()
    counts = np.bincount(idx, minlength=(n_gt + 1) * (n_pred + 1))
    return counts.reshape(n_gt + 1, n_pred + 1).astype(np.int64, copy=False)


def _iou_from_overlap(ov: np.ndarray) -> np.ndarray:
    """(n_gt, n_pred) float64 IoU from an overlap matrix with background row/column."""
    inter = ov[1:, 1:]
    area_gt = ov[1:, :].sum(axis=1)
    area_pred = ov[:, 1:].sum(axis=0)
    union = area_gt[:, None] + area_pred[None, :] - inter  # >= 1: every object has pixels
    return inter / union


def overlap_matrix(gt, pred) -> np.ndarray:
    """Pixel counts of every (gt object, pred object) pair, background included.

    Args:
        gt, pred: label images of the same shape.
    Returns:
        (n_gt + 1, n_pred + 1) int64; row/column 0 is background, row i the i-th smallest gt id.
    """
    return _overlap(*_check_pair(gt, pred))


def iou_matrix(gt, pred) -> np.ndarray:
    """Intersection over union of every (gt object, pred object) pair.

    Args:
        gt, pred: label images of the same shape.
    Returns:
        (n_gt, n_pred) float64 in [0, 1]; no background row/column.
    """
    return _iou_from_overlap(overlap_matrix(gt, pred))


def foreground_iou(gt, pred) -> float:
    """IoU of the foreground masks (gt > 0) and (pred > 0); 1.0 when both are empty."""
    g, p = _check_pair(gt, pred)
    g, p = g > 0, p > 0
    union = np.count_nonzero(g | p)
    return 1.0 if union == 0 else np.count_nonzero(g & p) / union


def _foreground_iou_from_overlap(ov: np.ndarray) -> float:
    union = int(ov.sum() - ov[0, 0])
    return 1.0 if union == 0 else int(ov[1:, 1:].sum()) / union


def _seg_from_overlap(ov: np.ndarray) -> float:
    n_gt, n_pred = ov.shape[0] - 1, ov.shape[1] - 1
    if n_gt == 0:
        return float("nan")
    if n_pred == 0:
        return 0.0
    inter = ov[1:, 1:]
    area_gt = ov[1:, :].sum(axis=1)
    area_pred = ov[:, 1:].sum(axis=0)
    best = inter.argmax(axis=1)
    best_inter = inter[np.arange(n_gt), best]
    matched = 2 * best_inter > area_gt  # strictly more than half of the gt object
    jaccard = best_inter / (area_gt + area_pred[best] - best_inter)
    return float(np.where(matched, jaccard, 0.0).mean())


def seg_score(gt, pred) -> float:
    """Cell Tracking Challenge SEG: mean over gt objects of the Jaccard index with its match.

    A gt object's match is the pred object covering strictly more than half of it (at most one
    can); gt objects without a match score 0. One pred object may match several gt objects.

    Args:
        gt, pred: label images of the same shape.
    Returns:
        Score in [0, 1]; nan when gt has no objects (aggregate() skips nan).
    """
    return _seg_from_overlap(overlap_matrix(gt, pred))


@dataclass(frozen=True)
class Matching:
    """One-to-one matching of gt and pred objects at one IoU threshold (a pair matches if IoU > thresh).

    accuracy is the Data Science Bowl 2018 average precision tp / (tp + fp + fn).
    mean_matched_iou is the mean IoU of the matched pairs (0.0 when nothing matched).
    When gt and pred are both empty every ratio is 1.0; otherwise a 0/0 ratio is 0.0.
    """

    thresh: float
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    accuracy: float
    mean_matched_iou: float
    n_true: int
    n_pred: int


def _check_thresh(thresh: float) -> float:
    t = float(thresh)
    if not 0.0 <= t <= 1.0:
        raise CellsegError(f"IoU threshold must be in [0, 1], got {thresh}")
    return t


def _match(iou: np.ndarray, thresh: float) -> tuple[int, float]:
    """Largest one-to-one set of pairs with IoU > thresh (ties: larger IoU sum); (count, IoU sum)."""
    candidate = iou > thresh
    if not candidate.any():
        return 0, 0.0
    if thresh >= 0.5:  # IoU > 0.5 pairs never share an object, so every candidate is a match
        return int(candidate.sum()), float(iou[candidate].sum())
    rows, cols = candidate.any(axis=1), candidate.any(axis=0)
    sub, cand = iou[rows][:, cols], candidate[rows][:, cols]
    # Maximise the number of matches first; the IoU term (< 0.5 in total) only breaks ties.
    cost = -(cand * (1.0 + sub / (2 * min(sub.shape))))
    r, c = linear_sum_assignment(cost)
    ok = cand[r, c]
    return int(ok.sum()), float(sub[r, c][ok].sum())


def _matching_from_counts(thresh: float, tp: int, iou_sum: float, n_true: int, n_pred: int) -> Matching:
    fp, fn = n_pred - tp, n_true - tp
    if n_true == 0 and n_pred == 0:
        return Matching(thresh, 0, 0, 0, 1.0, 1.0, 1.0, 1.0, 1.0, 0, 0)

    def ratio(num: float, den: float) -> float:
        return num / den if den else 0.0

    return Matching(
        thresh=thresh,
        tp=tp,
        fp=fp,
        fn=fn,
        precision=ratio(tp, tp + fp),
        recall=ratio(tp, tp + fn),
        f1=ratio(2 * tp, 2 * tp + fp + fn),
        accuracy=ratio(tp, tp + fp + fn),
        mean_matched_iou=ratio(iou_sum, tp),
        n_true=n_true,
        n_pred=n_pred,
    )


def _matching_from_iou(iou: np.ndarray, thresh: float) -> Matching:
    tp, iou_sum = _match(iou, thresh)
    return _matching_from_counts(thresh, tp, iou_sum, iou.shape[0], iou.shape[1])


def matching(gt, pred, thresh: float = 0.5) -> Matching:
    """Match gt and pred objects one-to-one, a pair counting when IoU > thresh (DSB convention).

    For thresh >= 0.5 such pairs are unique, so the matching is exact without search; below 0.5
    the most matches (then the largest IoU sum) is found with linear_sum_assignment.

    Args:
        gt, pred: label images of the same shape.
        thresh: IoU threshold in [0, 1] (strict: IoU must exceed it).
    """
    return _matching_from_iou(iou_matrix(gt, pred), _check_thresh(thresh))


def _ap_from_iou(iou: np.ndarray, thresholds) -> np.ndarray:
    ts = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    return np.array([_matching_from_iou(iou, _check_thresh(t)).accuracy for t in ts], dtype=np.float64)


def average_precision(gt, pred, thresholds=THRESHOLDS) -> np.ndarray:
    """DSB average precision tp / (tp + fp + fn) at each IoU threshold.

    Args:
        gt, pred: label images of the same shape.
        thresholds: (T,) IoU thresholds in [0, 1].
    Returns:
        (T,) float64; 1.0 everywhere when both images are empty.
    """
    return _ap_from_iou(iou_matrix(gt, pred), thresholds)


def mean_average_precision(gt, pred, thresholds=THRESHOLDS) -> float:
    """Mean of average_precision over the thresholds (default IoU 0.50:0.05:0.95)."""
    return float(average_precision(gt, pred, thresholds).mean())


def evaluate_image(gt, pred) -> dict[str, float]:
    """All metrics of one image from a single overlap matrix.

    Returns:
        iou (foreground IoU), seg (CTC SEG, nan without gt objects), ap50, map (mean AP at
        0.50:0.05:0.95), precision, recall, f1 (at IoU > 0.5), n_true, n_pred, n_matched (object
        counts, int; n_matched: pairs at IoU > 0.5).
    """
    return evaluate_overlap(overlap_matrix(gt, pred))


def without_predicted(ov: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The overlap matrix once the pred objects not in `keep` ((n_pred,) bool) are set to background:
    their pixels join column 0. Scoring filtered predictions this way needs no new label image."""
    keep = np.asarray(keep, bool)
    if keep.shape != (ov.shape[1] - 1,):
        raise CellsegError(f"keep has shape {keep.shape}, expected ({ov.shape[1] - 1},): one entry per pred object")
    out = np.empty((ov.shape[0], int(keep.sum()) + 1), ov.dtype)
    out[:, 0] = ov[:, 0] + ov[:, 1:][:, ~keep].sum(axis=1)
    out[:, 1:] = ov[:, 1:][:, keep]
    return out


def evaluate_overlap(ov: np.ndarray) -> dict[str, float]:
    """`evaluate_image`'s metrics from an (n_gt + 1, n_pred + 1) overlap matrix (`overlap_matrix`)."""
    iou = _iou_from_overlap(ov)
    ap = _ap_from_iou(iou, THRESHOLDS)
    m50 = _matching_from_iou(iou, 0.5)
    return {
        "iou": _foreground_iou_from_overlap(ov),
        "seg": _seg_from_overlap(ov),
        "ap50": m50.accuracy,
        "map": float(ap.mean()),
        "precision": m50.precision,
        "recall": m50.recall,
        "f1": m50.f1,
        "n_true": m50.n_true,
        "n_pred": m50.n_pred,
        "n_matched": m50.tp,
    }


def aggregate(rows: list[dict]) -> dict[str, float]:
    """Combine per-image metric dicts: mean per key over images, skipping nan.

    Keys starting with "n_" are counts and are summed; n_images (the number of rows) is added.
    A key that is nan in every row stays nan. Means are per image (the DSB definition of AP and
    mAP), except that with the counts n_true, n_pred and n_matched precision, recall and f1 are
    pooled over the objects of all images (as StarDist's matching_dataset): an image with nothing
    to find and nothing found does not make them look better, one with many objects weighs more;
    nan where undefined (no objects predicted, or none to find).

    Args:
        rows: dicts with the same keys, e.g. from evaluate_image.
    """
    if not rows:
        raise CellsegError("no per-image metrics to aggregate")
    keys = list(rows[0])
    for i, row in enumerate(rows):
        if set(row) != set(keys):
            raise CellsegError(f"metrics row {i} has keys {sorted(row)}, expected {sorted(keys)}")
    out: dict[str, float] = {}
    for key in keys:
        values = np.array([float(row[key]) for row in rows], dtype=np.float64)
        if key.startswith("n_"):
            out[key] = int(np.nansum(values))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-nan column -> nan
                out[key] = float(np.nanmean(values))
    if {"n_true", "n_pred", "n_matched"} <= out.keys():
        tp, n_true, n_pred = out["n_matched"], out["n_true"], out["n_pred"]
        pooled = {"precision": (tp, n_pred), "recall": (tp, n_true), "f1": (2 * tp, n_true + n_pred)}
        for key, (num, den) in pooled.items():
            if key in out:
                out[key] = num / den if den else float("nan")
    if "n_images" not in out:
        out["n_images"] = len(rows)
    return out
