"""Tests for 3-class targets and U-Net weight maps on tiny synthetic label images."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellseg.data.targets import (
    class_balance_weights,
    dataset_class_weights,
    instances_to_classes,
    make_targets,
    unet_weight_map,
    unet_weight_map_naive,
)
from cellseg.errors import CellsegError


def _random_discs(shape=(64, 64), n=30, seed=0) -> np.ndarray:
    """Label image of n random discs (later discs overwrite earlier), ids 1..n."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.integers(2, 6)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return labels


def test_two_touching_squares_width_1():
    labels = np.zeros((8, 10), np.int32)
    labels[2:6, 1:5] = 1
    labels[2:6, 5:9] = 7  # non-contiguous id
    classes = instances_to_classes(labels, boundary_width=1)
    expected = np.zeros_like(classes)
    expected[2:6, 1:9] = 2
    # only the 2x2 centres of each 4x4 square have all 8 neighbours with their own label
    expected[3:5, 2:4] = 1
    expected[3:5, 6:8] = 1
    # the touching columns 4 and 5 are boundary even in rows 3-4
    assert classes.dtype == np.uint8
    np.testing.assert_array_equal(classes, expected)


def test_lone_square_counts_and_background():
    labels = np.zeros((20, 20), np.int32)
    labels[5:15, 5:15] = 3
    classes = instances_to_classes(labels, boundary_width=2)
    assert (classes == 1).sum() == 6 * 6
    assert (classes == 2).sum() == 100 - 36
    assert (classes == 0).sum() == 400 - 100
    assert np.all(classes[labels == 0] == 0)


def test_image_border_is_not_boundary():
    labels = np.ones((6, 6), np.int32)
    assert np.all(instances_to_classes(labels, 2) == 1)
    labels = np.zeros((6, 6), np.int32)
    labels[:, :3] = 1  # touches the left border; only the column next to background is boundary
    classes = instances_to_classes(labels, 1)
    assert np.all(classes[:, :2] == 1)
    assert np.all(classes[:, 2] == 2)


def test_width_zero_and_bad_input():
    labels = np.zeros((5, 5), np.int32)
    labels[1:4, 1:4] = 1
    assert np.all(instances_to_classes(labels, 0)[labels > 0] == 1)
    with pytest.raises(CellsegError):
        instances_to_classes(labels, -1)
    with pytest.raises(CellsegError):
        instances_to_classes(labels.astype(np.float32))
    with pytest.raises(CellsegError):
        instances_to_classes(-labels)
    with pytest.raises(CellsegError):
        unet_weight_map(labels, sigma=0.0)


def test_class_balance_normalised():
    classes = np.zeros((10, 10), np.uint8)
    classes[:2, :5] = 1  # 10 interior px
    classes[5, :5] = 2  # 5 boundary px
    w = class_balance_weights(classes)
    assert w.dtype == np.float32
    assert np.isclose(w.mean(), 1.0, atol=1e-6)
    # inverse frequency: rarer class weighs more, ratios match counts
    assert np.isclose(w[5, 0] / w[0, 0], 10 / 5)
    assert np.isclose(w[5, 9] / w[5, 0], 5 / 85)
    # absent classes are ignored: single class means weight 1 everywhere
    np.testing.assert_allclose(class_balance_weights(np.zeros((4, 4), np.uint8)), 1.0)


def test_dataset_class_balance_weighs_every_crop_alike():
    """class_balance "dataset": w_c from the class counts of all training labels together, the same
    for every crop; "crop" gives a crop holding a sliver of a cell a huge interior weight."""
    dense = np.zeros((20, 20), np.int32)
    dense[2:18, 2:18] = 1  # 16x16 cell: 12x12 interior inside a 2 px boundary ring
    sliver = np.zeros((20, 20), np.int32)
    sliver[8:13, 8:13] = 1  # 5x5 cell: 1 interior pixel
    counts = sum(np.bincount(instances_to_classes(lab).ravel(), minlength=3) for lab in (dense, sliver))
    assert counts[1] == 144 + 1 and counts[2] == (256 - 144) + (25 - 1)
    want = counts.sum() / (3 * counts)
    got = dataset_class_weights([dense, sliver])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for lab in (dense, sliver):
        classes, w = make_targets(lab, w0=0.0, class_balance="dataset", class_weights=got)
        np.testing.assert_allclose(w, np.asarray(got, np.float32)[classes])
    _, per_crop = make_targets(sliver, w0=0.0)
    assert per_crop[10, 10] > 50 * got[1]  # the sliver's one interior pixel: 400 / 3 against 800 / 435
    with pytest.raises(CellsegError, match="class_balance 'dataset' needs class_weights"):
        make_targets(dense, class_balance="dataset")
    with pytest.raises(CellsegError, match="expected 'crop' or 'dataset'"):
        make_targets(dense, class_balance="image")
    with pytest.raises(CellsegError, match="expected three finite numbers"):
        class_balance_weights(instances_to_classes(dense), (1.0, 2.0))
    assert dataset_class_weights([np.zeros((4, 4), np.int32)]) == (1.0, 0.0, 0.0)  # absent classes weigh 0


def test_fast_matches_naive_on_random_discs():
    labels = _random_discs((64, 64), n=30, seed=1)
    assert len(np.unique(labels)) > 20
    fast = unet_weight_map(labels)
    naive = unet_weight_map_naive(labels)
    assert fast.dtype == np.float32 and fast.shape == labels.shape
    np.testing.assert_allclose(fast, naive, atol=1e-4, rtol=0)
    assert np.all(np.isfinite(fast)) and np.all(fast > 0)


def test_fast_matches_naive_small_sigma():
    # a small sigma makes the crop margin small, so crop edges are exercised
    labels = _random_discs((48, 48), n=15, seed=2)
    np.testing.assert_allclose(
        unet_weight_map(labels, sigma=1.5, w0=3.0), unet_weight_map_naive(labels, sigma=1.5, w0=3.0), atol=1e-4
    )


def test_gap_between_cells_weighs_more_than_far_background():
    labels = np.zeros((40, 60), np.int32)
    labels[10:20, 5:15] = 1
    labels[10:20, 18:28] = 2  # 3-px gap at columns 15..17
    w = unet_weight_map(labels)
    assert labels[15, 16] == 0 and labels[35, 55] == 0
    assert w[15, 16] > w[35, 55] + 5.0
    # far background carries only the class weight
    assert np.isclose(w[35, 55], class_balance_weights(instances_to_classes(labels))[35, 55])


def test_zero_or_one_instance_and_w0_zero():
    empty = np.zeros((16, 16), np.int32)
    np.testing.assert_allclose(unet_weight_map(empty), 1.0)
    one = empty.copy()
    one[4:10, 4:10] = 5
    np.testing.assert_array_equal(unet_weight_map(one), class_balance_weights(instances_to_classes(one)))
    two = one.copy()
    two[11:15, 11:15] = 9
    np.testing.assert_array_equal(unet_weight_map(two, w0=0.0), class_balance_weights(instances_to_classes(two)))


def test_make_targets():
    labels = _random_discs((32, 32), n=8, seed=3)
    classes, weights = make_targets(labels)
    assert classes.dtype == np.uint8 and weights.dtype == np.float32
    np.testing.assert_array_equal(classes, instances_to_classes(labels))
    np.testing.assert_array_equal(weights, unet_weight_map(labels, classes))


@settings(max_examples=25, deadline=None)
@given(
    labels=hnp.arrays(np.int32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
                      elements=st.integers(0, 5)),
    width=st.integers(0, 3),
)
def test_property_classes_and_weights(labels, width):
    classes = instances_to_classes(labels, width)
    np.testing.assert_array_equal(classes > 0, labels > 0)
    for i in np.unique(labels[labels > 0]):
        assert np.isin(classes[labels == i], (1, 2)).any()
    weights = unet_weight_map(labels, classes, boundary_width=width)
    assert np.all(np.isfinite(weights)) and np.all(weights > 0)
    np.testing.assert_allclose(weights, unet_weight_map_naive(labels, classes), atol=1e-4)


def test_weight_touching_weighs_the_shared_edge_only():
    labels = np.zeros((30, 60), np.int32)
    labels[10:20, 5:15] = 1
    labels[10:20, 15:25] = 2  # touches cell 1 along columns 14 | 15
    labels[10:20, 45:55] = 3  # far from both
    classes = instances_to_classes(labels)
    plain = unet_weight_map(labels, classes)
    touch = unet_weight_map(labels, classes, weight_touching=True)
    extra = touch - plain
    assert classes[15, 14] == 2 and classes[15, 15] == 2
    # the edge where cells 1 and 2 meet: d1 = 0, d2 = 1 -> nearly w0 extra
    assert extra[15, 14] > 9.0 and extra[15, 15] > 9.0
    # the boundary of the distant cell 3 barely changes; interiors and background not at all
    assert extra[:, 40:].max() < 0.01  # cell 3 is 21 px from cell 2
    assert np.all(extra[classes == 1] == 0) and np.all(extra[labels == 0] == 0)
    # the outer edge of cell 1 is 10 px from cell 2: w0 exp(-100 / 50) = 1.35
    assert abs(extra[15, 5] - 10 * np.exp(-2.0)) < 1e-3
    np.testing.assert_allclose(touch, unet_weight_map_naive(labels, classes, weight_touching=True), atol=1e-4)
    _, via_targets = make_targets(labels, weight_touching=True)
    np.testing.assert_array_equal(via_targets, touch)


def test_weight_touching_fast_matches_naive_on_random_discs():
    labels = _random_discs((64, 64), n=30, seed=4)
    np.testing.assert_allclose(
        unet_weight_map(labels, weight_touching=True), unet_weight_map_naive(labels, weight_touching=True), atol=1e-4
    )
