"""Tests for the synthetic fluorescence-nuclei generator and its cached default dataset."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi

from cellseg.data.io import read_image, read_mask
from cellseg.data.synth import (
    MIN_NUCLEUS_PX,
    default_dataset_dir,
    ensure_default_dataset,
    synth_image,
    write_dataset,
)
from cellseg.errors import CellsegError

SIZE = (96, 112)  # small, non-square: keeps the tests fast and catches H/W mix-ups


def _touching_ids(labels: np.ndarray) -> set[int]:
    """Ids of labels 8-adjacent (1-px dilation) to a different label."""
    ids: set[int] = set()
    for a, b in (
        (labels[:, :-1], labels[:, 1:]),  # right
        (labels[:-1, :], labels[1:, :]),  # down
        (labels[:-1, :-1], labels[1:, 1:]),  # down-right
        (labels[:-1, 1:], labels[1:, :-1]),  # down-left
    ):
        m = (a > 0) & (b > 0) & (a != b)
        ids.update(a[m].tolist())
        ids.update(b[m].tolist())
    return ids


@pytest.fixture(scope="module")
def samples():
    """A handful of default-size images from fixed seeds, shared by the statistics tests."""
    return [synth_image(np.random.default_rng(s)) for s in range(6)]


def test_touching_helper_on_known_layout():
    lab = np.zeros((6, 8), np.int32)
    lab[1:3, 1:3] = 1
    lab[3:5, 3:5] = 2  # diagonal neighbour of 1
    lab[1:3, 6:8] = 3  # isolated
    assert _touching_ids(lab) == {1, 2}


def test_synth_image_types_and_shapes():
    img, lab = synth_image(np.random.default_rng(0), size=SIZE)
    assert img.dtype == np.uint16 and lab.dtype == np.int32
    assert img.shape == lab.shape == SIZE
    sq_img, _ = synth_image(np.random.default_rng(0), size=64)
    assert sq_img.shape == (64, 64)


def test_synth_image_deterministic():
    a = synth_image(np.random.default_rng(7), size=SIZE)
    b = synth_image(np.random.default_rng(7), size=SIZE)
    c = synth_image(np.random.default_rng(8), size=SIZE)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_labels_contiguous_and_min_size(samples):
    for _, lab in samples:
        n = int(lab.max())
        assert n >= 10
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        assert np.all(sizes > 0), "every id 1..N present"
        assert sizes.min() >= MIN_NUCLEUS_PX >= 20
        # each nucleus is one 4-connected piece
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            assert ndi.label(lab[sl] == i)[1] == 1


def test_requested_count_and_counts_range(samples):
    _, lab = synth_image(np.random.default_rng(3), n_nuclei=12)
    assert lab.max() == 12
    img0, lab0 = synth_image(np.random.default_rng(3), n_nuclei=0)
    assert lab0.max() == 0 and img0.dtype == np.uint16
    mean_n = np.mean([lab.max() for _, lab in samples])
    assert 15 <= mean_n <= 35  # about 25 per 256x256
    for img, _ in samples:
        assert 20 <= img.min() and img.max() < 20000
    with pytest.raises(CellsegError):
        synth_image(np.random.default_rng(0), n_nuclei=-1)
    with pytest.raises(CellsegError):
        synth_image(np.random.default_rng(0), size=(8, 8))


def test_many_nuclei_touch(samples):
    touching = sum(len(_touching_ids(lab)) for _, lab in samples)
    total = sum(int(lab.max()) for _, lab in samples)
    assert touching / total >= 0.2
    for _, lab in samples:
        assert len(_touching_ids(lab)) >= 2  # at least one touching pair in every image


def test_signal_present_but_not_trivially_separable(samples):
    ious, merged = [], 0
    for img, lab in samples:
        fg = lab > 0
        f = img.astype(np.float32)
        assert f[fg].mean() > 1.5 * f[~fg].mean()
        # noise: neighbouring background pixels differ (shot + read noise)
        assert np.std(np.diff(f[~fg][:2000])) > 2.0
        img8 = cv2.normalize(f, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        thr, _ = cv2.threshold(img8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        pred = img8 > thr
        ious.append((pred & fg).sum() / (pred | fg).sum())
        # touching nuclei merge in the connected components of the true foreground
        merged += ndi.label(fg)[1] < lab.max()
    assert max(ious) < 0.99
    assert merged == len(samples)


def test_write_dataset_layout_and_determinism(tmp_path):
    a = write_dataset(tmp_path / "a", n=3, size=SIZE, seed=5)
    b = write_dataset(tmp_path / "b", n=3, size=SIZE, seed=5)
    c = write_dataset(tmp_path / "c", n=3, size=SIZE, seed=6)
    assert a == tmp_path / "a"
    names = sorted(p.name for p in (a / "images").iterdir())
    assert names == ["synth_0000.png", "synth_0001.png", "synth_0002.png"]
    assert sorted(p.name for p in (a / "masks").iterdir()) == names
    for name in names:
        img, lab = read_image(a / "images" / name), read_mask(a / "masks" / name)
        assert img.shape == lab.shape == SIZE
        assert lab.max() >= 1 and img.max() > 255  # 16-bit data survived the round trip
        assert (a / "images" / name).read_bytes() == (b / "images" / name).read_bytes()
        assert (a / "masks" / name).read_bytes() == (b / "masks" / name).read_bytes()
    assert (a / "images" / names[0]).read_bytes() != (c / "images" / names[0]).read_bytes()
    # image i does not depend on n
    d = write_dataset(tmp_path / "d", n=1, size=SIZE, seed=5)
    assert (d / "images" / names[0]).read_bytes() == (a / "images" / names[0]).read_bytes()
    # masks round-trip to the labels of synth_image
    lab0 = read_mask(a / "masks" / names[0])
    sizes = np.bincount(lab0.ravel())[1:]
    assert np.all(sizes >= MIN_NUCLEUS_PX)


def test_write_dataset_refuses_non_empty(tmp_path):
    out = write_dataset(tmp_path / "ds", n=2, size=SIZE, seed=0)
    with pytest.raises(CellsegError, match="images"):
        write_dataset(out, n=2, size=SIZE, seed=1)
    write_dataset(out, n=1, size=SIZE, seed=1, overwrite=True)
    # the stale second pair of the earlier run is gone
    assert sorted(p.name for p in (out / "images").iterdir()) == ["synth_0000.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["synth_0000.png"]
    fresh = write_dataset(tmp_path / "fresh", n=1, size=SIZE, seed=1)
    assert (out / "images/synth_0000.png").read_bytes() == (fresh / "images/synth_0000.png").read_bytes()
    with pytest.raises(CellsegError):
        write_dataset(tmp_path / "zero", n=0, size=SIZE)
    (out / "masks" / "real_cell.png").write_bytes(b"not synthetic")  # real data is never mixed with synthetic
    with pytest.raises(CellsegError, match=r"masks: holds files that are not synthetic \(real_cell.png\)"):
        write_dataset(out, n=1, size=SIZE, seed=2, overwrite=True)
    assert (out / "masks" / "real_cell.png").read_bytes() == b"not synthetic"
    report = tmp_path / "report"
    report.mkdir()
    (report / "summary.json").write_text("{}")  # another command's output folder is no place for a dataset
    with pytest.raises(CellsegError, match=r"report: holds another command's summary.json"):
        write_dataset(report, n=1, size=SIZE)
    assert sorted(p.name for p in report.iterdir()) == ["summary.json"]


def test_ensure_default_dataset_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLSEG_CACHE_DIR", str(tmp_path / "cache"))
    expected = tmp_path / "cache" / "synth-n2-s48-seed3"
    assert default_dataset_dir(n=2, size=48, seed=3) == expected
    root = ensure_default_dataset(n=2, size=48, seed=3)
    assert root == expected
    names = sorted(p.name for p in (root / "images").iterdir())
    assert names == ["synth_0000.png", "synth_0001.png"]
    assert sorted(p.name for p in (root / "masks").iterdir()) == names
    # no temp folders left beside it
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [expected.name]
    # second call reuses the files (not rewritten)
    mtime = (root / "images" / names[0]).stat().st_mtime_ns
    os.utime(root / "images" / names[0], ns=(mtime - 10**9, mtime - 10**9))
    assert ensure_default_dataset(n=2, size=48, seed=3) == root
    assert (root / "images" / names[0]).stat().st_mtime_ns == mtime - 10**9
    # a damaged cache (file deleted) is regenerated
    (root / "masks" / names[1]).unlink()
    ensure_default_dataset(n=2, size=48, seed=3)
    assert (root / "masks" / names[1]).exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [expected.name]


def test_default_dataset_dir_home_fallback(monkeypatch, tmp_path):
    monkeypatch.delenv("CELLSEG_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_dataset_dir() == tmp_path / ".cache" / "cellseg" / "synth-n48-s256-seed0"
