"""Dataset layout checks, the deterministic split and the training dataset."""

import cv2
import numpy as np
import pytest

from cellseg.config import Config, apply_overrides
from cellseg.data.dataset import TrainDataset, list_pairs, load_split, quadrants, random_crop, random_scaled_crop, split_stems
from cellseg.errors import CellsegError


def _write(root, stems, shape=(40, 48), mask_shape=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in stems:
        cv2.imwrite(str(root / "images" / f"{s}.png"), rng.integers(0, 255, shape, dtype=np.uint8))
        m = np.zeros(mask_shape or shape, np.uint16)
        m[5:15, 5:15] = 1
        m[20:30, 20:30] = 2
        cv2.imwrite(str(root / "masks" / f"{s}.png"), m)


def test_split_is_deterministic_and_stable():
    stems = [f"img{i:03d}" for i in range(200)]
    train, val = split_stems(stems, 0.2)
    assert set(train) | set(val) == set(stems) and not set(train) & set(val)
    assert 20 < len(val) < 60
    # adding images never moves an existing image between splits
    train2, val2 = split_stems(stems + [f"new{i}" for i in range(50)], 0.2)
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert split_stems(["a", "b"], 0.2)[1] and split_stems(["a", "b"], 0.2)[0]


def test_layout_errors_name_files(tmp_path):
    with pytest.raises(CellsegError, match="dataset folder not found"):
        list_pairs(tmp_path / "nope")
    (tmp_path / "images").mkdir()
    with pytest.raises(CellsegError, match=r"missing masks/"):
        list_pairs(tmp_path)
    (tmp_path / "masks").mkdir()
    with pytest.raises(CellsegError, match=rf"missing images/\); images/ is part of the dataset {tmp_path}: pass that folder$"):
        list_pairs(tmp_path / "images")  # one level too deep
    with pytest.raises(CellsegError, match="no images"):
        list_pairs(tmp_path)
    _write(tmp_path, ["a", "b"])
    (tmp_path / "masks" / "b.png").unlink()
    with pytest.raises(CellsegError, match=r"images without masks: b.png"):
        list_pairs(tmp_path)
    _write(tmp_path, ["b"])
    cv2.imwrite(str(tmp_path / "masks" / "c.png"), np.zeros((4, 4), np.uint8))
    with pytest.raises(CellsegError, match=r"masks without images: c.png"):
        list_pairs(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    _write(tmp_path, ["a", "b", "c"], shape=(40, 48))
    _write(tmp_path, ["b"], shape=(40, 48), mask_shape=(40, 40))
    with pytest.raises(CellsegError, match=r"b.png: mask is 40x40 but image b.png is 40x48"):
        load_split(Config(), tmp_path)


def test_quadrants_and_crop():
    from cellseg.data.dataset import Sample

    s = Sample("x", np.arange(35, dtype=np.float32).reshape(5, 7), np.arange(35, dtype=np.int32).reshape(5, 7))
    q = quadrants(s)
    assert [a.labels.shape for a in q] == [(2, 3), (2, 4), (3, 3), (3, 4)]
    assert sum(a.labels.size for a in q) == 35
    img, lab = random_crop(s.image, s.labels, 16, np.random.default_rng(0))
    assert img.shape == lab.shape == (16, 16)


def _disk_grid(side: int):
    """A grid of identical disks (radius 5, ~80 px, one id each) and an image whose intensity
    inside each disk encodes its id (1 + id % 7): a shifted or mismatched label would show."""
    yy, xx = np.mgrid[:side, :side]
    disk = (yy % 20 - 10) ** 2 + (xx % 20 - 10) ** 2 <= 25
    labels = np.where(disk, (yy // 20) * 16 + xx // 20 + 1, 0).astype(np.int32)
    return np.where(disk, 1 + labels % 7, 0).astype(np.float32), labels


def _whole_object_area(lab):
    """Median area of the objects not cut by the crop border."""
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    ids = np.setdiff1d(np.unique(lab), np.concatenate([border, [0]]))
    return np.median(np.bincount(lab.ravel())[ids])


def test_random_scaled_crop_zooms_image_and_labels_together():
    from scipy import ndimage

    image, labels = _disk_grid(320)
    # scale 1 is random_crop itself, same draws
    a = random_scaled_crop(image, labels, 64, np.random.default_rng(5), 1.0)
    b = random_crop(image, labels, 64, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))

    areas, checked = [], 0
    for seed in range(30):
        img, lab = random_scaled_crop(image, labels, 64, np.random.default_rng(seed), 2.0)
        assert img.shape == lab.shape == (64, 64) and img.dtype == np.float32 and lab.dtype == np.int32
        assert set(np.unique(lab)) <= set(np.unique(labels))  # nearest neighbour: no new ids
        fg = random_scaled_crop((labels > 0).astype(np.float32), labels, 64, np.random.default_rng(seed), 2.0)[0]
        agree = ((fg > 0.5) == (lab > 0)).mean()
        assert agree > 0.95, f"seed {seed}: image and labels disagree on {1 - agree:.1%} of pixels"
        # inside each object (away from its edge) the image carries that object's code
        inner = (ndimage.minimum_filter(lab, 5) == ndimage.maximum_filter(lab, 5)) & (lab > 0)
        checked += int(inner.any())
        assert not inner.any() or np.abs(img[inner] - (1 + lab[inner] % 7)).max() < 0.3, f"seed {seed}: labels do not match the image"
        areas.append(_whole_object_area(lab))
    assert checked >= 20  # object interiors compared in most crops (deep zoom-outs leave none)
    unzoomed = _whole_object_area(b[1])
    # zoom log-uniform in [1/2, 2]: areas from ~1/4 to ~4 times the unzoomed one, both sides seen
    assert min(areas) < 0.6 * unzoomed and max(areas) > 1.7 * unzoomed, (unzoomed, sorted(areas))
    assert 0.2 * unzoomed < min(areas) and max(areas) < 4.8 * unzoomed

    # an image no larger than the crop is never zoomed out (padding would repeat cells under one id)
    small_img, small_lab = _disk_grid(64)
    small = [_whole_object_area(random_scaled_crop(small_img, small_lab, 64, np.random.default_rng(s), 2.0)[1])
             for s in range(30)]
    assert min(small) >= 0.9 * unzoomed and max(small) > 1.7 * unzoomed


def test_train_dataset_crops_with_the_configured_zoom(tmp_path):
    _write(tmp_path, [f"s{i}" for i in range(4)], shape=(96, 96))
    off = {f"augment.{k}": False for k in ("flips", "rot90", "rotate", "mirror_quarters", "elastic", "intensity")}
    cfg = apply_overrides(Config(), {"data.crop_size": 32, "augment.scale": 1.5, **off})
    train, _ = load_split(cfg, tmp_path)
    ds = TrainDataset(train, cfg, seed=3)
    ds.set_epoch(2)
    for idx in range(len(ds)):
        img, lab = ds.augmented_crop(idx)
        s = train[int(ds.order[idx])]
        want = random_scaled_crop(s.image, s.labels, 32, np.random.default_rng([3, 2, idx]), 1.5)
        assert np.array_equal(img, want[0]) and np.array_equal(lab, want[1])


def test_train_dataset_items_and_reproducibility(tmp_path):
    _write(tmp_path, [f"s{i}" for i in range(6)])
    cfg = apply_overrides(Config(), {"data.crop_size": 32})
    train, val = load_split(cfg, tmp_path)
    ds = TrainDataset(train, cfg, seed=3)
    ds.set_epoch(2, elastic=True, per_epoch=10)
    assert len(ds) == 10
    img, cls, w = ds[4]
    assert img.shape == (1, 32, 32) and cls.shape == w.shape == (32, 32)
    assert set(np.unique(cls.numpy())) <= {0, 1, 2} and (w > 0).all()
    again = TrainDataset(train, cfg, seed=3)
    again.set_epoch(2, elastic=True, per_epoch=10)
    assert np.array_equal(again[4][0].numpy(), img.numpy())


def test_a_one_image_dataset_is_refused_by_name(tmp_path):
    _write(tmp_path, ["only"])
    with pytest.raises(CellsegError, match=f"^{tmp_path}: need at least 2 images to hold out a validation split, found 1"):
        load_split(Config(), tmp_path)
    from cellseg.evaluate import select_pairs  # tune, quantize and evaluate --split val take this path

    with pytest.raises(CellsegError, match=f"^{tmp_path}: need at least 2 images"):
        select_pairs(tmp_path, "val")
    with pytest.raises(CellsegError, match=f"^{tmp_path / 'images' / 'only.png'}: is a file; expected a dataset folder"):
        list_pairs(tmp_path / "images" / "only.png")


def test_a_dataset_without_any_object_is_refused(tmp_path):
    _write(tmp_path, [f"s{i}" for i in range(6)])
    for m in (tmp_path / "masks").iterdir():
        cv2.imwrite(str(m), np.zeros((40, 48), np.uint16))
    with pytest.raises(CellsegError, match="every mask of the training split is empty"):
        load_split(Config(), tmp_path)


def test_bright_background_images_are_flagged_and_drawn_by_their_weight(tmp_path):
    """load_split flags bright-background images (inverted or not); data.bright_weight draws them
    that many times as often as the others, and leaves the draw as it was when 1."""
    from cellseg.data.dataset import Sample

    stems = [f"s{i}" for i in range(12)]
    _write(tmp_path, stems)
    dark, bright = np.full((40, 48), 20, np.uint8), np.full((40, 48), 230, np.uint8)
    dark[5:15, 5:15] = bright[5:15, 5:15] = 120
    dark[0, 0], bright[0, 0] = 0, 255  # the percentiles span both levels
    for i, s in enumerate(stems):
        cv2.imwrite(str(tmp_path / "images" / f"{s}.png"), bright if i % 3 == 0 else dark)
    for invert in (False, True):
        cfg = apply_overrides(Config(), {"data.path": str(tmp_path), "data.crop_size": 16, "data.invert_bright": invert})
        train, val = load_split(cfg, tmp_path)
        samples = train + val
        assert sorted(s.stem for s in samples if s.bright) == ["s0", "s3", "s6", "s9"]
        inverted = [s.image[0, 1] < 0.5 for s in samples if s.bright]  # background pixel
        assert all(inverted) if invert else not any(inverted)
    assert all(q.bright for q in quadrants(next(s for s in samples if s.bright)))

    img, lab = np.zeros((20, 20), np.float32), np.zeros((20, 20), np.int32)
    pool = [Sample("b", img, lab, bright=True)] + [Sample(f"d{i}", img, lab) for i in range(3)]
    cfg = Config()
    ds = TrainDataset(pool, cfg, seed=5)
    ds.set_epoch(2, per_epoch=8000)
    assert np.array_equal(ds.order, np.random.default_rng([5, 2, 7]).integers(0, 4, 8000))  # weight 1: as before
    assert abs(np.mean(ds.order == 0) - 0.25) < 0.02
    cfg = apply_overrides(cfg, {"data.bright_weight": 3.0})
    ds = TrainDataset(pool, cfg, seed=5)
    ds.set_epoch(2, per_epoch=8000)
    assert abs(np.mean(ds.order == 0) - 0.5) < 0.02  # 3 / (3 + 1 + 1 + 1)
    ds.set_epoch(3)  # a full pass: every image once, whatever the weight
    assert sorted(ds.order) == [0, 1, 2, 3]


def test_dataset_class_balance_is_fixed_from_the_training_split(tmp_path):
    """targets.class_balance "dataset": the training crops and the validation targets share one
    w_c per class, computed from the training split's labels."""
    from cellseg.data.targets import dataset_class_weights
    from cellseg.validate import prepare

    _write(tmp_path, [f"s{i}" for i in range(6)])
    cfg = apply_overrides(Config(), {"data.crop_size": 32, "targets.class_balance": "dataset", "targets.w0": 0.0})
    train, val = load_split(cfg, tmp_path)
    ds = TrainDataset(train, cfg, seed=1)
    assert ds.class_weights == dataset_class_weights([s.labels for s in train])
    ds.set_epoch(0, per_epoch=6)
    for i in range(6):
        _, cls, w = ds[i]
        np.testing.assert_allclose(w.numpy(), np.asarray(ds.class_weights, np.float32)[cls.numpy()])
    item = prepare(val, cfg.targets, ds.class_weights)[0]
    np.testing.assert_allclose(item.weights, np.asarray(ds.class_weights, np.float32)[item.classes])
    assert TrainDataset(train, Config(), seed=1).class_weights is None  # "crop", the default
    with pytest.raises(Exception, match="class_balance"):
        apply_overrides(Config(), {"targets.class_balance": "image"})


def test_a_broken_link_and_a_one_row_image_are_named_for_what_they_are(tmp_path):
    """A broken link in images/ was reported as 'masks without images'; a 1-row mask as '(128,)'."""
    import os

    import cv2

    from cellseg.data.dataset import list_pairs
    from cellseg.data.io import read_mask

    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    mask = np.zeros((1, 128), np.uint16)
    mask[0, 10:20] = 1
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), mask)
    assert read_mask(tmp_path / "masks" / "a.png").shape == (1, 128)
    os.symlink(tmp_path / "gone.png", tmp_path / "images" / "a.png")
    with pytest.raises(CellsegError, match=r"images/a.png: broken link \(to .*gone.png\)"):
        list_pairs(tmp_path)


def test_an_image_too_large_for_memory_is_named(tmp_path, monkeypatch):
    import cellseg.data.dataset as dataset
    from cellseg.config import DataConfig

    _write(tmp_path, ["a"])

    def no_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 488. MiB for an array with shape (8000, 8000) and data type int64")

    monkeypatch.setattr(dataset, "read_mask", no_memory)
    image, mask = tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png"
    with pytest.raises(CellsegError, match=rf"^{image}: not enough memory to load it for training \(Unable to allocate 488\. MiB .*\); cut large"):
        dataset.load_sample("a", image, mask, DataConfig())
