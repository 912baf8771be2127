"""Metrics on hand-built label images with known answers, plus property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import linear_sum_assignment

from cellseg.errors import CellsegError
from cellseg.metrics import (
    THRESHOLDS,
    Matching,
    aggregate,
    average_precision,
    evaluate_image,
    evaluate_overlap,
    foreground_iou,
    iou_matrix,
    matching,
    mean_average_precision,
    overlap_matrix,
    seg_score,
    without_predicted,
)

RATIOS = ("precision", "recall", "f1", "accuracy", "mean_matched_iou")


def boxes(shape, *rects) -> np.ndarray:
    """Label image with rectangle i+1 at rects[i] = (r0, r1, c0, c1) (half-open)."""
    out = np.zeros(shape, np.int32)
    for i, (r0, r1, c0, c1) in enumerate(rects, start=1):
        out[r0:r1, c0:c1] = i
    return out


def same(a: dict, b: dict) -> bool:
    """Dicts equal, nan == nan."""
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or math.isclose(a[k], b[k], abs_tol=1e-12) for k in a
    )


GT3 = boxes((20, 30), (0, 5, 0, 5), (10, 18, 2, 9), (3, 9, 15, 28))


# --- hand-built cases -------------------------------------------------------------------------


def test_thresholds():
    assert THRESHOLDS.shape == (10,)
    assert THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def test_overlap_matrix_known_counts():
    gt = np.array([[0, 7, 7], [0, 7, 3]], np.uint16)  # ids 3, 7 -> rows 1, 2
    pred = np.array([[5, 5, 0], [0, 0, 0]], np.int64)
    ov = overlap_matrix(gt, pred)
    assert ov.dtype == np.int64
    np.testing.assert_array_equal(ov, [[1, 1], [1, 0], [2, 1]])
    np.testing.assert_allclose(iou_matrix(gt, pred), [[0.0], [1 / 4]])


def test_perfect_prediction_scores_one():
    m = matching(GT3, GT3)
    assert (m.tp, m.fp, m.fn, m.n_true, m.n_pred) == (3, 0, 0, 3, 3)
    assert all(getattr(m, k) == 1.0 for k in RATIOS)
    r = evaluate_image(GT3, GT3)
    assert {k: r[k] for k in ("iou", "seg", "ap50", "map", "precision", "recall", "f1")} == dict.fromkeys(
        ("iou", "seg", "ap50", "map", "precision", "recall", "f1"), 1.0
    )
    assert (r["n_true"], r["n_pred"]) == (3, 3)
    np.testing.assert_array_equal(average_precision(GT3, GT3), np.ones(10))


def test_empty_prediction_scores_zero():
    empty = np.zeros_like(GT3)
    r = evaluate_image(GT3, empty)
    assert r == {"iou": 0.0, "seg": 0.0, "ap50": 0.0, "map": 0.0, "precision": 0.0, "recall": 0.0,
                 "f1": 0.0, "n_true": 3, "n_pred": 0, "n_matched": 0}
    m = matching(GT3, empty, 0.3)
    assert (m.tp, m.fp, m.fn) == (0, 0, 3)
    np.testing.assert_array_equal(average_precision(GT3, empty), np.zeros(10))


def test_both_empty_conventions():
    empty = np.zeros((4, 5), np.uint8)
    m = matching(empty, empty)
    assert (m.tp, m.fp, m.fn, m.n_true, m.n_pred) == (0, 0, 0, 0, 0)
    assert all(getattr(m, k) == 1.0 for k in RATIOS)
    assert foreground_iou(empty, empty) == 1.0
    assert math.isnan(seg_score(empty, empty))
    assert mean_average_precision(empty, empty) == 1.0
    assert overlap_matrix(empty, empty).shape == (1, 1)
    assert iou_matrix(empty, empty).shape == (0, 0)


def test_empty_gt_with_predictions():
    empty = np.zeros_like(GT3)
    m = matching(empty, GT3)
    assert (m.tp, m.fp, m.fn) == (0, 3, 0)
    assert all(getattr(m, k) == 0.0 for k in RATIOS)
    r = evaluate_image(empty, GT3)
    assert math.isnan(r["seg"])
    assert r["iou"] == r["ap50"] == r["map"] == r["precision"] == r["recall"] == r["f1"] == 0.0


def test_half_overlapping_pair_thresholds():
    gt = boxes((10, 20), (0, 10, 0, 10))
    pred = boxes((10, 20), (0, 10, 5, 15))  # 50 shared of 150 -> IoU 1/3
    assert iou_matrix(gt, pred)[0, 0] == pytest.approx(1 / 3)
    assert foreground_iou(gt, pred) == pytest.approx(1 / 3)
    below, above = matching(gt, pred, 0.33), matching(gt, pred, 0.34)
    assert (below.tp, below.fp, below.fn) == (1, 0, 0)
    assert below.mean_matched_iou == pytest.approx(1 / 3)
    assert (above.tp, above.fp, above.fn) == (0, 1, 1)
    assert matching(gt, pred, 1 / 3).tp == 0  # strict: IoU must exceed thresh
    # pred covers exactly half of the gt object: not "more than half" -> SEG 0
    assert seg_score(gt, pred) == 0.0
    pred60 = boxes((10, 20), (0, 10, 4, 14))  # 60 of 100 covered, IoU 60/140
    assert seg_score(gt, pred60) == pytest.approx(3 / 7)


def test_exact_half_iou_not_matched_at_050():
    gt = boxes((1, 10), (0, 1, 0, 10))
    pred = boxes((1, 10), (0, 1, 0, 5))  # IoU exactly 0.5
    assert matching(gt, pred, 0.5).tp == 0
    assert matching(gt, pred, 0.49).tp == 1
    assert seg_score(gt, pred) == 0.0


def test_split_object():
    gt = boxes((10, 10), (0, 10, 0, 10))
    pred = boxes((10, 10), (0, 10, 0, 6), (0, 10, 6, 10))  # 60 / 40 split
    assert seg_score(gt, pred) == pytest.approx(0.6)
    m = matching(gt, pred, 0.5)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert (m.precision, m.recall, m.accuracy) == (0.5, 1.0, 0.5)
    assert m.f1 == pytest.approx(2 / 3)
    # 50 / 50 split: no pred covers more than half
    assert seg_score(gt, boxes((10, 10), (0, 10, 0, 5), (0, 10, 5, 10))) == 0.0


def test_merged_prediction():
    gt = boxes((10, 20), (0, 10, 0, 10), (0, 10, 10, 20))
    pred = boxes((10, 20), (0, 10, 0, 20))  # covers both, IoU 0.5 with each
    np.testing.assert_allclose(iou_matrix(gt, pred), [[0.5], [0.5]])
    assert seg_score(gt, pred) == pytest.approx(0.5)  # SEG lets one pred match several gts
    m = matching(gt, pred, 0.4)
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)  # one-to-one: one pred, one match
    assert matching(gt, pred, 0.5).tp == 0


def test_one_to_one_beats_greedy_below_half():
    # A=[0,10) B=[10,20); X=[4,14) has IoU .43 with A and .25 with B; Y=[0,3) has .3 with A.
    # Greedy by IoU takes X-A and leaves 1 match; the optimum is X-B + Y-A.
    gt = boxes((1, 20), (0, 1, 0, 10), (0, 1, 10, 20))
    pred = boxes((1, 20), (0, 1, 4, 14), (0, 1, 0, 3))
    m = matching(gt, pred, 0.2)
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)
    assert m.mean_matched_iou == pytest.approx((0.25 + 0.3) / 2)
    assert matching(gt, pred, 0.28).tp == 1


def test_relabelling_does_not_change_scores():
    pred = boxes((20, 30), (0, 5, 0, 4), (11, 18, 2, 9), (3, 9, 14, 26), (15, 20, 20, 30))
    ref = evaluate_image(GT3, pred)
    perm_gt = np.array([0, 3, 1, 2])[GT3]
    big = np.array([0, 60000, 7, 513, 65535], np.uint16)[pred]
    assert same(evaluate_image(perm_gt, big), ref)
    assert same(evaluate_image(GT3.astype(np.int64) * 2**40, pred.astype(np.uint64)), ref)
    np.testing.assert_array_equal(average_precision(perm_gt, big, [0.1, 0.5, 0.9]),
                                  average_precision(GT3, pred, [0.1, 0.5, 0.9]))


def test_bool_masks_are_one_object():
    gt = GT3 > 0
    assert evaluate_image(gt, gt)["map"] == 1.0
    assert iou_matrix(gt, gt).shape == (1, 1)


def test_3d_labels():
    gt = np.zeros((3, 4, 4), np.int32)
    gt[0:2, 0:2, 0:2] = 1
    assert matching(gt, gt).tp == 1


@pytest.mark.parametrize(
    "gt, pred",
    [
        (np.zeros((3, 3), np.int32), np.zeros((3, 4), np.int32)),
        (np.zeros((3, 3), np.float32), np.zeros((3, 3), np.int32)),
        (np.full((3, 3), -1, np.int32), np.zeros((3, 3), np.int32)),
    ],
)
def test_bad_inputs(gt, pred):
    with pytest.raises(CellsegError):
        evaluate_image(gt, pred)


@pytest.mark.parametrize("thresh", [-0.1, 1.5])
def test_bad_threshold(thresh):
    with pytest.raises(CellsegError):
        matching(GT3, GT3, thresh)


def test_aggregate():
    rows = [
        {"iou": 1.0, "seg": float("nan"), "map": 0.5, "n_true": 0, "n_pred": 2},
        {"iou": 0.5, "seg": 0.4, "map": 0.25, "n_true": 3, "n_pred": 4},
    ]
    out = aggregate(rows)
    assert out == {"iou": 0.75, "seg": 0.4, "map": 0.375, "n_true": 3, "n_pred": 6, "n_images": 2}
    assert aggregate([out, out])["n_images"] == 4  # counts add up when aggregating aggregates
    assert math.isnan(aggregate([{"seg": float("nan")}])["seg"])
    with pytest.raises(CellsegError):
        aggregate([])
    with pytest.raises(CellsegError):
        aggregate([{"iou": 1.0}, {"seg": 1.0}])


def test_aggregate_of_evaluate_image():
    out = aggregate([evaluate_image(GT3, GT3), evaluate_image(GT3, np.zeros_like(GT3))])
    assert out["map"] == 0.5 and out["n_true"] == 6 and out["n_pred"] == 3 and out["n_images"] == 2


# --- properties -------------------------------------------------------------------------------

label_images = arrays(
    np.int32, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 6)
)
PROPS = settings(max_examples=30, deadline=None)


@PROPS
@given(label_images)
def test_identical_images_score_one(lab):
    r = evaluate_image(lab, lab)
    for k in ("iou", "ap50", "map", "precision", "recall", "f1"):
        assert r[k] == 1.0
    assert r["seg"] == 1.0 if lab.any() else math.isnan(r["seg"])
    m = matching(lab, lab, 0.1)
    assert m.fp == m.fn == 0 and m.mean_matched_iou == 1.0


@PROPS
@given(label_images)
def test_empty_prediction_scores_zero_property(lab):
    r = evaluate_image(lab, np.zeros_like(lab))
    if lab.any():
        assert r["iou"] == r["seg"] == r["ap50"] == r["map"] == r["f1"] == 0.0
    else:
        assert r["map"] == 1.0


@PROPS
@given(label_images, st.data())
def test_relabel_invariance(lab, data):
    pred = data.draw(arrays(np.int32, lab.shape, elements=st.integers(0, 6)))
    p1 = np.array([0] + data.draw(st.permutations(range(1, 7))))
    p2 = np.array([0] + data.draw(st.permutations(range(1, 7)))) * 1000 + 3
    p2[0] = 0
    ref = evaluate_image(lab, pred)
    assert same(evaluate_image(p1[lab].astype(np.uint8), p2[pred].astype(np.uint16)), ref)
    ts = [0.05, 0.2, 0.45, 0.5, 0.8]
    np.testing.assert_array_equal(average_precision(p1[lab], p2[pred], ts), average_precision(lab, pred, ts))


@PROPS
@given(label_images, st.data())
def test_scoring_without_some_predictions_equals_scoring_the_filtered_image(lab, data):
    """What `tune` does to try min sizes and scores: drop pred columns from the overlap matrix."""
    pred = data.draw(arrays(np.int32, lab.shape, elements=st.integers(0, 6)))
    ids = np.unique(pred[pred > 0])
    keep = np.array(data.draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids))), bool)
    filtered = np.where(np.isin(pred, ids[keep]), pred, 0)
    assert same(evaluate_overlap(without_predicted(overlap_matrix(lab, pred), keep)), evaluate_image(lab, filtered))


def test_without_predicted_wants_one_entry_per_object():
    with pytest.raises(CellsegError, match="one entry per pred object"):
        without_predicted(overlap_matrix(GT3, GT3), np.ones(2, bool))


@PROPS
@given(label_images, st.data())
def test_matching_is_optimal_and_symmetric(lab, data):
    pred = data.draw(arrays(np.int32, lab.shape, elements=st.integers(0, 6)))
    thresh = data.draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7]))
    iou = iou_matrix(lab, pred)
    ov = overlap_matrix(lab, pred)
    assert ov.sum() == lab.size
    m = matching(lab, pred, thresh)
    expected = 0
    if iou.size:  # maximum number of one-to-one pairs with IoU > thresh
        r, c = linear_sum_assignment(-(iou > thresh).astype(float))
        expected = int((iou[r, c] > thresh).sum())
    assert m.tp == expected
    assert matching(pred, lab, thresh).tp == m.tp
    assert m.tp + m.fn == m.n_true and m.tp + m.fp == m.n_pred
    assert isinstance(m, Matching)


def test_dataset_precision_recall_and_f1_are_pooled_over_objects():
    """Three empty images found empty and one nucleus missed: recall 0 (not the per-image mean 0.75,
    which counted each empty image as a perfect find); AP and mAP stay per-image means (DSB)."""
    empty = np.zeros((8, 8), np.int32)
    one = empty.copy()
    one[2:5, 2:5] = 1
    rows = [evaluate_image(empty, empty)] * 3 + [evaluate_image(one, empty)]
    agg = aggregate(rows)
    assert (agg["n_true"], agg["n_pred"], agg["n_matched"]) == (1, 0, 0)
    assert agg["recall"] == 0.0 and agg["f1"] == 0.0 and math.isnan(agg["precision"])  # nothing predicted: undefined
    assert agg["map"] == agg["ap50"] == 0.75
    # many objects in one image weigh more than one object in another
    many = np.zeros((40, 40), np.int32)
    for i in range(4):
        many[10 * i:10 * i + 5, 2:7] = i + 1
    rows = [evaluate_image(many, many), evaluate_image(one, empty)]
    assert aggregate(rows)["recall"] == 4 / 5 and np.mean([r["recall"] for r in rows]) == 0.5
