"""Tests for cellseg.data.augment: reproducibility, label validity and the geometry of each op."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellseg.config import AugmentConfig
from cellseg.data.augment import (
    Augmenter,
    elastic_deform,
    mirror_quarters,
    random_flip_rot90,
    random_intensity,
    random_rotate,
)

ALL_OFF = dict(flips=False, rot90=False, rotate=False, mirror_quarters=False, elastic=False, intensity=False)


def make_pair(h: int = 48, w: int = 40, n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth float32 image and int32 labels with n (possibly overlapping) discs."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.int32)
    for i in range(1, n + 1):
        c = (int(rng.integers(w)), int(rng.integers(h)))
        cv2.circle(labels, c, int(rng.integers(2, max(3, min(h, w) // 4))), i, -1)
    image = (labels > 0).astype(np.float32) * 0.8 + rng.uniform(0, 0.2, (h, w)).astype(np.float32)
    return image, labels


def assert_pair(image, labels, shape=None):
    assert image.dtype == np.float32 and labels.dtype == np.int32
    assert image.flags.c_contiguous and labels.flags.c_contiguous
    assert image.shape == labels.shape
    if shape is not None:
        assert image.shape == shape


def assert_ids_subset(before, after):
    assert set(np.unique(after)) <= set(np.unique(before))


def assert_quarter_bijection(before, after):
    """Output ids correspond one-to-one to (quarter, input id) pieces of the mirrored input."""
    h, w = before.shape
    hs, ws = h // 2, w // 2
    q_index = np.zeros((h, w), np.int64)
    q_index[:hs, ws:], q_index[hs:, :ws], q_index[hs:, ws:] = 1, 2, 3
    mirrored = before.copy()
    for rs, cs in [(slice(0, hs), slice(0, ws)), (slice(0, hs), slice(ws, w)),
                   (slice(hs, h), slice(0, ws)), (slice(hs, h), slice(ws, w))]:
        mirrored[rs, cs] = before[rs, cs][::-1, ::-1]
    assert np.array_equal(after == 0, mirrored == 0)
    fg = mirrored > 0
    pairs = set(zip(q_index[fg].tolist(), mirrored[fg].tolist(), after[fg].tolist()))
    pieces = {(q, o) for q, o, _ in pairs}
    new_ids = {n for _, _, n in pairs}
    assert len(pairs) == len(pieces) == len(new_ids)
    # Compact: renumbered 1..n.
    assert new_ids == set(range(1, len(new_ids) + 1))


class FixedAngle:
    """Stands in for a Generator whose uniform() always returns one angle."""

    def __init__(self, angle: float) -> None:
        self.angle = angle

    def uniform(self, lo, hi):
        return self.angle


OPS = {
    "flip_rot90": lambda im, lab, rng: random_flip_rot90(im, lab, rng),
    "rotate": lambda im, lab, rng: random_rotate(im, lab, rng),
    "mirror": lambda im, lab, rng: mirror_quarters(im, lab, rng, p=1.0),
    "elastic": lambda im, lab, rng: elastic_deform(im, lab, rng, alpha=30.0, sigma=4.0),
    "augmenter": lambda im, lab, rng: Augmenter(AugmentConfig(), elastic=True)(im, lab, rng),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_same_seed_same_output(name):
    image, labels = make_pair()
    a = OPS[name](image, labels, np.random.default_rng(7))
    b = OPS[name](image, labels, np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert_pair(*a)


def test_intensity_reproducible_and_mild():
    image, _ = make_pair()
    a = random_intensity(image, np.random.default_rng(3))
    b = random_intensity(image, np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == image.shape
    assert not np.array_equal(a, image)
    assert -0.5 < a.min() and a.max() < 1.6


@pytest.mark.parametrize("seed", range(6))
def test_ops_keep_ids(seed):
    image, labels = make_pair(seed=seed)
    for name in ("flip_rot90", "rotate", "elastic"):
        im, lab = OPS[name](image, labels, np.random.default_rng(seed))
        assert_pair(im, lab)
        assert_ids_subset(labels, lab)
    im, lab = mirror_quarters(image, labels, np.random.default_rng(seed), p=1.0)
    assert_pair(im, lab, labels.shape)
    assert_quarter_bijection(labels, lab)


def test_flips_preserve_multiset():
    image, labels = make_pair(h=30, w=21)
    seen_shapes = set()
    for seed in range(12):
        im, lab = random_flip_rot90(image, labels, np.random.default_rng(seed))
        seen_shapes.add(im.shape)
        assert np.array_equal(np.sort(im, axis=None), np.sort(image, axis=None))
        assert np.array_equal(np.sort(lab, axis=None), np.sort(labels, axis=None))
    assert seen_shapes == {(30, 21), (21, 30)}


def test_flips_only_keeps_shape():
    image, labels = make_pair(h=30, w=21)
    for seed in range(6):
        im, lab = random_flip_rot90(image, labels, np.random.default_rng(seed), rot90=False)
        assert im.shape == (30, 21)


def test_rotate_90_matches_rot90():
    image, labels = make_pair(h=41, w=41)
    im, lab = random_rotate(image, labels, FixedAngle(90.0))
    assert_pair(im, lab, (41, 41))
    inner = (slice(2, -2), slice(2, -2))
    assert np.mean(lab[inner] == np.rot90(labels)[inner]) > 0.99
    assert np.allclose(im[inner], np.rot90(image)[inner], atol=1e-4)


def test_rotate_zero_is_identity_and_fills_corners():
    image, labels = make_pair()
    im, lab = random_rotate(image, labels, np.random.default_rng(0), max_angle=0.0)
    assert np.allclose(im, image, atol=1e-5) and np.array_equal(lab, labels)
    # Reflect padding: a rotated all-ones image has no empty corners.
    ones = np.ones((32, 48), np.float32)
    im, _ = random_rotate(ones, np.ones((32, 48), np.int32), FixedAngle(45.0))
    assert np.allclose(im, 1.0)


def test_mirror_quarters_by_hand():
    image = np.arange(16, dtype=np.float32).reshape(4, 4)
    labels = np.zeros((4, 4), np.int32)
    labels[1:3, 1:3] = 7  # one cell cut into four pieces by the quarter lines
    im, lab = mirror_quarters(image, labels, np.random.default_rng(0), p=1.0)
    expected_image = np.array(
        [[5, 4, 7, 6], [1, 0, 3, 2], [13, 12, 15, 14], [9, 8, 11, 10]], np.float32
    )
    expected_labels = np.array([[1, 0, 0, 2], [0, 0, 0, 0], [0, 0, 0, 0], [3, 0, 0, 4]], np.int32)
    assert np.array_equal(im, expected_image)
    assert np.array_equal(lab, expected_labels)


def test_mirror_quarters_symmetric_image_and_p0():
    # Each quarter is symmetric under a 180 degree flip, so the image is unchanged.
    quarter = np.array([[1, 2], [2, 1]], np.float32)
    image = np.block([[quarter, quarter * 2], [quarter * 3, quarter * 4]])
    labels = np.zeros((4, 4), np.int32)
    labels[0, 0] = labels[1, 1] = 5  # a piece entirely inside quarter 0 keeps one id
    im, lab = mirror_quarters(image, labels, np.random.default_rng(0), p=1.0)
    assert np.array_equal(im, image)
    assert np.array_equal(lab, (labels > 0).astype(np.int32))
    im, lab = mirror_quarters(image, labels, np.random.default_rng(0), p=0.0)
    assert np.array_equal(im, image) and np.array_equal(lab, labels)


def test_mirror_quarters_odd_size():
    image, labels = make_pair(h=17, w=23)
    im, lab = mirror_quarters(image, labels, np.random.default_rng(1), p=1.0)
    assert_pair(im, lab, (17, 23))
    assert_quarter_bijection(labels, lab)


def test_elastic_alpha0_exact_identity():
    image, labels = make_pair()
    im, lab = elastic_deform(image, labels, np.random.default_rng(0), alpha=0.0, sigma=4.0)
    assert np.array_equal(im, image) and np.array_equal(lab, labels)


def test_elastic_displacement_grows_with_alpha():
    h = w = 64
    # Every pixel its own id: after a nearest-neighbour warp each id tells where it came from.
    ids = np.arange(h * w, dtype=np.int32).reshape(h, w)
    image = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[:h, :w]
    inner = (slice(16, -16), slice(16, -16))  # away from reflected borders
    means = []
    for alpha in (50.0, 200.0, 800.0):
        _, lab = elastic_deform(image, ids, np.random.default_rng(5), alpha=alpha, sigma=8.0)
        sy, sx = np.divmod(lab, w)
        disp = np.hypot(sy - yy, sx - xx)[inner]
        # A smoothed U(-1, 1) field stays in [-1, 1], so no pixel moves further than alpha*sqrt(2).
        assert disp.max() <= alpha * np.sqrt(2) + 1
        means.append(disp.mean())
    assert means[0] < means[1] < means[2]
    assert means[0] < 2.0  # sigma 8 keeps the moderate-alpha field gentle
    assert means[2] > 1.0


def test_augmenter_all_off_is_identity():
    image, labels = make_pair()
    aug = Augmenter(AugmentConfig(**ALL_OFF))
    im, lab = aug(image, labels, np.random.default_rng(0))
    assert np.array_equal(lab, labels) and np.array_equal(im, image)
    assert aug.describe() == "none"


def test_augmenter_elastic_override_and_describe():
    cfg = AugmentConfig(elastic=False)
    assert not Augmenter(cfg).elastic
    aug = Augmenter(cfg, elastic=True)
    assert aug.elastic and "elastic" in aug.describe()
    assert Augmenter(AugmentConfig(elastic=True), elastic=False).describe().count("elastic") == 0
    text = Augmenter(AugmentConfig()).describe()
    for name in ("flips", "rot90", "rotate", "mirror_quarters", "intensity"):
        assert name in text


def test_augmenter_elastic_only_keeps_ids():
    image, labels = make_pair()
    aug = Augmenter(AugmentConfig(**{**ALL_OFF, "elastic": True, "elastic_alpha_max": 40.0}))
    im, lab = aug(image, labels, np.random.default_rng(2))
    assert_pair(im, lab, labels.shape)
    assert_ids_subset(labels, lab)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(8, 64), w=st.integers(8, 64), seed=st.integers(0, 2**31 - 1))
def test_random_sizes(h, w, seed):
    image, labels = make_pair(h=h, w=w, n=5, seed=seed % 1000)
    rng = np.random.default_rng(seed)
    im, lab = random_flip_rot90(image, labels, rng)
    assert_pair(im, lab)
    assert im.shape in ((h, w), (w, h))
    assert_ids_subset(labels, lab)
    for im2, lab2 in (
        random_rotate(image, labels, rng),
        elastic_deform(image, labels, rng, alpha=float(rng.uniform(0, 50)), sigma=4.0),
    ):
        assert_pair(im2, lab2, (h, w))
        assert_ids_subset(labels, lab2)
    im, lab = mirror_quarters(image, labels, rng, p=1.0)
    assert_pair(im, lab, (h, w))
    assert_quarter_bijection(labels, lab)
    im, lab = Augmenter(AugmentConfig(), elastic=True)(image, labels, rng)
    assert_pair(im, lab)
    assert im.shape in ((h, w), (w, h))
    # At most four pieces per input id after quarter mirroring; ids stay non-negative.
    assert lab.min() >= 0 and len(np.unique(lab[lab > 0])) <= 4 * len(np.unique(labels[labels > 0]))
    assert np.isfinite(im).all()


def test_large_ids_survive_resampling():
    # int32 is resampled directly (no float32 round trip), so ids above 2**24 stay exact.
    image, labels = make_pair()
    big = np.where(labels > 0, labels + 2**30, 0).astype(np.int32)
    rng = np.random.default_rng(4)
    for _, lab in (random_rotate(image, big, rng), elastic_deform(image, big, rng, 30.0, 4.0)):
        assert_ids_subset(big, lab)
    _, lab = mirror_quarters(image, big, rng, p=1.0)
    assert_quarter_bijection(big, lab)
