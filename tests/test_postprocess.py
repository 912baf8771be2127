"""probabilities_to_instances and the label helpers on hand-built probability maps."""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

import cellseg.postprocess as pp
from cellseg.errors import CellsegError
from cellseg.metrics import iou_matrix, matching
from cellseg.postprocess import probabilities_to_instances, relabel_sequential, remove_small_objects

BG, INTERIOR, BOUNDARY = 0, 1, 2


def one_hot(classes: np.ndarray) -> np.ndarray:
    """(3, H, W) float32 probabilities that are 1 on the given class map."""
    return (np.arange(3)[:, None, None] == classes[None]).astype(np.float32)


def classes_from_labels(labels: np.ndarray, erode: int = 2) -> np.ndarray:
    """Perfect class map: interior = each object eroded by `erode` px, boundary = the rest of it."""
    classes = np.where(labels > 0, BOUNDARY, BG)
    for i in np.unique(labels[labels > 0]):
        inner = ndimage.binary_erosion(labels == i, iterations=erode)
        classes[inner] = INTERIOR
    return classes


def two_touching_discs(shape=(64, 80)) -> np.ndarray:
    """Labels 1 and 2: discs of radius 14 whose overlap is split along the perpendicular bisector."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d1 = (yy - 32) ** 2 + (xx - 26) ** 2
    d2 = (yy - 32) ** 2 + (xx - 50) ** 2
    labels = np.zeros(shape, np.int32)
    labels[d1 <= 14**2] = 1
    labels[(d2 <= 14**2) & (d2 < d1)] = 2
    return labels


def test_two_touching_discs_perfect_probs():
    gt = two_touching_discs()
    assert ndimage.label(gt > 0)[1] == 1  # they really touch
    out = probabilities_to_instances(one_hot(classes_from_labels(gt)))
    assert out.dtype == np.int32 and out.shape == gt.shape
    assert set(np.unique(out)) == {0, 1, 2}
    m = matching(gt, out, 0.9)
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)
    assert np.all(out[gt == 0] == 0)  # growth stays inside the foreground


def test_soft_probs_still_split_discs():
    gt = two_touching_discs()
    probs = ndimage.gaussian_filter(one_hot(classes_from_labels(gt)), sigma=(0, 1, 1))
    probs /= probs.sum(axis=0, keepdims=True)
    out = probabilities_to_instances(probs)
    assert out.max() == 2
    assert (iou_matrix(gt, out).max(axis=1) > 0.85).all()


def test_all_background_gives_zeros():
    probs = one_hot(np.zeros((17, 23), np.int64))
    out = probabilities_to_instances(probs)
    assert out.dtype == np.int32 and out.shape == (17, 23) and not out.any()
    assert not probabilities_to_instances(np.zeros((3, 0, 5), np.float32)).any()


def test_foreground_threshold_respected():
    probs = np.zeros((3, 20, 20), np.float32)
    probs[0] = 1.0
    probs[:, 5:15, 5:15] = np.array([0.6, 0.2, 0.2])[:, None, None]  # foreground prob 0.4
    assert probabilities_to_instances(probs).max() == 0
    out = probabilities_to_instances(probs, foreground_threshold=0.3)
    assert out.max() == 1 and (out > 0).sum() == 100


def test_interior_threshold_splits_at_weak_bridge():
    classes = np.zeros((20, 40), np.int64)
    classes[4:16, 2:38] = BOUNDARY
    classes[6:14, 4:17] = INTERIOR
    classes[6:14, 23:36] = INTERIOR
    probs = one_hot(classes)
    probs[:, 9:11, 17:23] = np.array([0.0, 0.6, 0.4])[:, None, None]  # bridge with p_interior 0.6
    assert probabilities_to_instances(probs, interior_threshold=0.5).max() == 1
    out = probabilities_to_instances(probs, interior_threshold=0.7)
    assert out.max() == 2
    assert (out > 0).sum() == (classes > 0).sum()  # the whole foreground is shared out


def test_min_seed_size_drops_tiny_seeds():
    classes = np.zeros((20, 40), np.int64)
    classes[4:16, 2:38] = BOUNDARY
    classes[6:14, 4:14] = INTERIOR
    classes[9, 30:32] = INTERIOR  # 2-pixel seed
    probs = one_hot(classes)
    assert probabilities_to_instances(probs, min_seed_size=3).max() == 1
    assert probabilities_to_instances(probs, min_seed_size=2).max() == 2


def test_seedless_foreground_kept_and_not_absorbed():
    classes = np.zeros((20, 40), np.int64)
    classes[2:18, 2:18] = BOUNDARY
    classes[5:15, 5:15] = INTERIOR
    classes[5:10, 25:30] = BOUNDARY  # boundary-only cell, 25 px, separate component
    out = probabilities_to_instances(one_hot(classes))
    assert out.max() == 2
    assert len(np.unique(out[5:10, 25:30])) == 1 and out[7, 27] != out[10, 10]
    assert (out == out[7, 27]).sum() == 25


def test_small_objects_removed():
    classes = np.zeros((20, 40), np.int64)
    classes[2:18, 2:18] = BOUNDARY
    classes[5:15, 5:15] = INTERIOR
    classes[5:7, 25:27] = INTERIOR  # 4 px cell
    classes[12:14, 30:33] = BOUNDARY  # 6 px boundary-only fragment
    probs = one_hot(classes)
    out = probabilities_to_instances(probs, min_size=10)
    assert out.max() == 1 and out[10, 10] == 1
    out = probabilities_to_instances(probs, min_size=4, min_seed_size=1)
    assert out.max() == 3 and out.dtype == np.int32
    np.testing.assert_array_equal(np.unique(out), [0, 1, 2, 3])


def test_bad_probs_shape():
    with pytest.raises(CellsegError):
        probabilities_to_instances(np.zeros((2, 5, 5), np.float32))
    with pytest.raises(CellsegError):
        probabilities_to_instances(np.zeros((5, 5), np.float32))


@contextlib.contextmanager
def _counting_growth():
    """(seeded growth, one-pixel dilation) spies: their call counts measure work, not wall time."""
    with mock.patch.object(pp, "_grow", wraps=pp._grow) as grow, mock.patch.object(pp.cv2, "dilate", wraps=pp.cv2.dilate) as dilate:
        yield grow, dilate


def test_large_image_needs_no_per_object_work():
    rng = np.random.default_rng(0)
    gt = np.zeros((1000, 1000), np.int32)
    yy, xx = np.mgrid[-9:10, -9:10]
    disc = yy**2 + xx**2 <= 81
    for i, (r, c) in enumerate(rng.integers(10, 990, size=(1500, 2)), start=1):
        gt[r - 9 : r + 10, c - 9 : c + 10][disc] = i
    probs = one_hot(np.where(gt > 0, np.where(ndimage.binary_erosion(gt > 0, iterations=2), INTERIOR, BOUNDARY), BG))
    with _counting_growth() as (grow, dilate):
        out = probabilities_to_instances(probs)
    assert out.max() > 500
    # components with one seed need no growth; the rest are grown together, not one object at a time
    assert grow.call_count <= 1 and dilate.call_count <= 32


def test_remove_small_objects():
    labels = np.array([[0, 5, 5, 9], [0, 5, 0, 9], [2, 0, 0, 0]], np.uint16)
    out = remove_small_objects(labels, 2)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[0, 5, 5, 9], [0, 5, 0, 9], [0, 0, 0, 0]])
    np.testing.assert_array_equal(remove_small_objects(labels, 3), np.where(labels == 5, 5, 0))
    np.testing.assert_array_equal(remove_small_objects(labels, 0), labels)
    assert labels[2, 0] == 2  # input untouched
    with pytest.raises(CellsegError):
        remove_small_objects(labels, -1)


def test_relabel_sequential():
    labels = np.array([[0, 50, 50], [7, 0, 2**40]], np.int64)
    out = relabel_sequential(labels)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[0, 2, 2], [1, 0, 3]])
    np.testing.assert_array_equal(relabel_sequential(np.array([[3, 3], [0, 9]], np.uint8)), [[1, 1], [0, 2]])
    assert relabel_sequential(np.zeros((0, 3), np.int32)).shape == (0, 3)
    with pytest.raises(CellsegError):
        relabel_sequential(np.array([[-1]]))
    with pytest.raises(CellsegError):
        relabel_sequential(np.array([[1.5]]))


def _reference(probs, it=0.5, ft=0.5, min_size=10, min_seed_size=3):
    """Plain version: grow every seed over the whole foreground step by step, then label the rest."""
    fg = probs[1] + probs[2] > ft
    cross = ndimage.generate_binary_structure(2, 1)
    seeds, _ = ndimage.label((probs[1] > it) & fg, cross)
    seeds = remove_small_objects(seeds, min_seed_size)
    labels = seeds.copy()
    while True:
        grown = ndimage.grey_dilation(labels, footprint=cross)
        new = fg & (labels == 0) & (grown > 0)
        if not new.any():
            break
        labels[new] = grown[new]
    rest, _ = ndimage.label(fg & (labels == 0), cross)
    labels[rest > 0] = rest[rest > 0] + labels.max()
    return relabel_sequential(remove_small_objects(labels, min_size))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.3, 0.7), st.floats(0.2, 0.6), st.integers(0, 12), st.integers(0, 4))
def test_matches_plain_seeded_growth(seed, it, ft, min_size, min_seed_size):
    rng = np.random.default_rng(seed)
    logits = ndimage.gaussian_filter(rng.normal(size=(3, 40, 48)), sigma=(0, 2.5, 2.5)) * 8
    probs = np.exp(logits) / np.exp(logits).sum(axis=0)
    # the reference grows geodesically all the way; lift the 32-step Euclidean shortcut to compare
    with mock.patch.object(pp, "_grow", functools.partial(pp._grow, max_steps=10_000)):
        out = probabilities_to_instances(probs, it, ft, min_size, min_seed_size)
    np.testing.assert_array_equal(out, _reference(probs, it, ft, min_size, min_seed_size))


def test_sparse_seeds_in_huge_foreground_take_the_shortcut():
    probs = np.zeros((3, 1000, 1000), np.float32)
    probs[2] = 1.0
    for r, c in ((2, 2), (997, 997), (500, 20)):
        probs[1:, r - 2 : r + 3, c - 2 : c + 3] = np.array([1.0, 0.0])[:, None, None]
    with _counting_growth() as (_, dilate):
        out = probabilities_to_instances(probs)
    assert out.max() == 3 and out.all()
    assert dilate.call_count == 32  # then the Euclidean shortcut, not ~1000 one-pixel steps
    assert out[0, 0] != out[999, 999]


def _three_squares(confidence=(0.99, 0.9, 0.99)) -> np.ndarray:
    """(3, 40, 40) probabilities: three separate 8x8 squares of interior, each at its own p(interior)."""
    probs = one_hot(np.zeros((40, 40), int))
    for (r, c), p in zip([(4, 4), (4, 24), (24, 14)], confidence):
        probs[:, r : r + 8, c : c + 8] = np.array([1 - p, p, 0.0], np.float32)[:, None, None]
    return probs


def test_min_score_drops_the_objects_the_network_is_unsure_of():
    probs = _three_squares()
    labels = probabilities_to_instances(probs, min_size=1)
    np.testing.assert_allclose(pp.object_scores(labels, probs[0])[1:], [0.99, 0.9, 0.99], atol=1e-4)  # p(background) read as float16
    sure = probabilities_to_instances(probs, min_size=1, min_score=0.95)
    assert sure.max() == 2 and not sure[4:12, 24:32].any()  # renumbered 1..2, the unsure square gone
    np.testing.assert_array_equal(sure > 0, (labels > 0) & (labels != 2))
    assert probabilities_to_instances(probs, min_size=1, min_score=0.89).max() == 3  # kept just below its score
    assert probabilities_to_instances(probs, min_size=1, min_score=0.995).max() == 0


def test_min_score_from_thresholded_masks_matches_the_probabilities_path():
    """What infer's MaskSink path does (masks + p(background)) gives the labels of the probabilities."""
    probs = _three_squares((0.97, 0.96, 0.92))
    seeds, fg = pp.threshold_probabilities(probs)
    got = pp.masks_to_instances(seeds, fg, min_size=1, background=probs[0].copy(), min_score=0.95)
    np.testing.assert_array_equal(got, probabilities_to_instances(probs, min_size=1, min_score=0.95))
    assert got.max() == 2
    with pytest.raises(CellsegError, match="min_score needs the background"):
        pp.masks_to_instances(*pp.threshold_probabilities(probs), min_score=0.5)
    with pytest.raises(CellsegError, match=r"min_score 1.5: expected a number in \[0, 1\]"):
        pp.check_postprocess({"min_score": 1.5})
