"""Dataset layout (`DIR/images/<stem>.*`, `DIR/masks/<stem>.*`), the split, and torch datasets."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cellseg.config import Config, DataConfig
from cellseg.data.augment import Augmenter
from cellseg.data.io import dataset_part, invert, is_bright, is_image_file, missing_reason, normalize_percentile, read_image, read_mask
from cellseg.data.targets import dataset_class_weights, make_targets
from cellseg.errors import CellsegError, in_cwd


@dataclass
class Sample:
    """One image with its instance labels: image (H, W) float32 normalised, labels (H, W) int32;
    bright: a bright-background image (brightfield, H&E), inverted or not."""

    stem: str
    image: np.ndarray
    labels: np.ndarray
    bright: bool = False


def _stems(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not p.exists() and is_image_file(p):  # not "an image without a mask" later
            raise CellsegError(f"{p}: {missing_reason(p)}")
        if p.is_file() and is_image_file(p) and not p.name.startswith("."):
            if p.stem in out:
                raise CellsegError(f"{p}: two files share the stem '{p.stem}' ({out[p.stem].name})")
            out[p.stem] = p
    return out


def list_pairs(root: str | Path) -> list[tuple[str, Path, Path]]:
    """(stem, image path, mask path) for every image of a dataset, sorted by stem.

    Raises CellsegError when the layout is wrong, the dataset is empty, or an image has no
    mask (or a mask no image), naming the files.
    """
    root = Path(root)
    if root.is_file():
        raise CellsegError(f"{root}: is a file; expected a dataset folder with images/ and masks/")
    if not root.is_dir():
        raise CellsegError(f"{root}: dataset folder not found{in_cwd(root)}")
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            part = dataset_part(root)
            hint = f"; {part[1]}/ is part of the dataset {part[0]}: pass that folder" if part else ""
            raise CellsegError(f"{root}: expected sub-folders images/ and masks/ (missing {d.name}/){hint}")
    images, masks = _stems(img_dir), _stems(mask_dir)
    if not images:
        raise CellsegError(f"{img_dir}: no images (.png, .tif, .tiff, .jpg, .jpeg) found")
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        more = f" and {len(no_mask) - 3} more" if len(no_mask) > 3 else ""
        raise CellsegError(f"{img_dir}: images without masks: {', '.join(images[s].name for s in no_mask[:3])}{more}")
    no_image = sorted(set(masks) - set(images))
    if no_image:
        more = f" and {len(no_image) - 3} more" if len(no_image) > 3 else ""
        raise CellsegError(f"{mask_dir}: masks without images: {', '.join(masks[s].name for s in no_image[:3])}{more}")
    return [(s, images[s], masks[s]) for s in sorted(images)]


def stem_fraction(stem: str) -> float:
    """A stable number in [0, 1) from the stem's SHA-1: the split never moves an image."""
    return int(hashlib.sha1(stem.encode()).hexdigest()[:12], 16) / 16**12


def split_stems(stems: list[str], val_fraction: float = 0.2, root: str | Path | None = None) -> tuple[list[str], list[str]]:
    """Deterministic (train, validation) split by stem hash; each side gets at least one stem.
    `root` (the dataset folder) is named in the error when there are fewer than 2 stems."""
    if len(stems) < 2:
        where = f"{root}: " if root is not None else ""
        raise CellsegError(f"{where}need at least 2 images to hold out a validation split, found {len(stems)}")
    val = [s for s in stems if stem_fraction(s) < val_fraction]
    if not val or len(val) == len(stems):
        ordered = sorted(stems, key=stem_fraction)
        val = ordered[:1] if not val else ordered[:-1]
    val_set = set(val)
    return [s for s in stems if s not in val_set], sorted(val_set)


def dataset_hash(root: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of every image and mask file's name and bytes."""
    h = hashlib.sha256()
    for stem, img, mask in list_pairs(root):
        for p in (img, mask):
            h.update(f"{p.parent.name}/{p.name}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def load_sample(stem: str, image_path: Path, mask_path: Path, cfg: DataConfig) -> Sample:
    """Read, check and normalise one image/mask pair."""
    try:
        image = read_image(image_path, channel=cfg.channel)
        labels = read_mask(mask_path, semantic=cfg.semantic_masks)
    except MemoryError as exc:  # training holds every pair in memory (about 13 bytes a pixel while loading)
        raise CellsegError(f"{image_path}: not enough memory to load it for training ({str(exc).splitlines()[0] if str(exc) else 'MemoryError'}); "
                           "cut large images and their masks into tiles of a few thousand pixels a side") from None
    if image.shape != labels.shape:
        raise CellsegError(
            f"{mask_path}: mask is {labels.shape[0]}x{labels.shape[1]} but image "
            f"{image_path.name} is {image.shape[0]}x{image.shape[1]}"
        )
    image = normalize_percentile(image, cfg.low_percentile, cfg.high_percentile)
    bright = is_bright(image)
    if bright and cfg.invert_bright:
        invert(image)
    return Sample(stem, image, labels, bright)


def split_pairs(cfg: Config, root: str | Path) -> tuple[list[tuple[str, Path, Path]], list[tuple[str, Path, Path]]]:
    """The (stem, image, mask) pairs of the training and validation splits that training uses (at
    most data.max_images, split by stem hash); reads no pixels, so a dataset can be checked cheaply."""
    pairs = list_pairs(root)
    if cfg.data.max_images is not None:
        pairs = pairs[: cfg.data.max_images]
    train_stems, val_stems = split_stems([p[0] for p in pairs], cfg.data.val_fraction, root)
    by_stem = {p[0]: p for p in pairs}
    return [by_stem[s] for s in train_stems], [by_stem[s] for s in val_stems]


def load_split(cfg: Config, root: str | Path) -> tuple[list[Sample], list[Sample]]:
    """Load the train and validation samples of a dataset folder."""
    train_pairs, val_pairs = split_pairs(cfg, root)
    train = [load_sample(*pair, cfg.data) for pair in train_pairs]
    if not any(t.labels.any() for t in train):
        raise CellsegError(f"{root}: every mask of the training split is empty (no objects): nothing to learn from")
    val = [load_sample(*pair, cfg.data) for pair in val_pairs]
    return train, val


def quadrants(sample: Sample) -> list[Sample]:
    """The 2x2 regions of a sample (tile training of the original method)."""
    h, w = sample.labels.shape
    ys, xs = (0, h // 2, h), (0, w // 2, w)
    out = []
    for i in range(2):
        for j in range(2):
            sl = (slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1]))
            out.append(Sample(f"{sample.stem}_q{2 * i + j}", sample.image[sl], sample.labels[sl], sample.bright))
    return out


def random_crop(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator):
    """A size x size crop at a random place; smaller images are reflect-padded first."""
    h, w = labels.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
        mode = "reflect" if (ph < h and pw < w) else "symmetric"
        image, labels = np.pad(image, pad, mode=mode), np.pad(labels, pad, mode=mode)
        h, w = labels.shape
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return image[y : y + size, x : x + size], labels[y : y + size, x : x + size]


def random_scaled_crop(image: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator, scale: float = 1.0):
    """`random_crop` of a size x size crop seen at a random zoom in [1/scale, scale] (log-uniform).

    A (size / zoom)-px crop is resized to size: the image by area averaging (zoom < 1) or
    linearly, the labels by nearest neighbour (instance ids stay valid). Zooming out stops where
    the window would exceed the image (padding would repeat cells under one id). With scale 1 it
    is `random_crop`, same random draws.
    """
    if scale <= 1.0:
        return random_crop(image, labels, size, rng)
    import cv2

    zoom = float(np.exp(rng.uniform(-np.log(scale), np.log(scale))))
    src = min(max(2, int(round(size / zoom))), max(size, min(labels.shape)))
    image, labels = random_crop(image, labels, src, rng)
    if src == size:
        return image, labels
    interp = cv2.INTER_AREA if src > size else cv2.INTER_LINEAR
    image = cv2.resize(np.ascontiguousarray(image, dtype=np.float32), (size, size), interpolation=interp)
    # NEAREST_EXACT samples pixel centres like INTER_LINEAR; plain INTER_NEAREST is off by half a pixel
    labels = cv2.resize(np.ascontiguousarray(labels, dtype=np.int32), (size, size), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, labels


def class_weights_for(samples: list[Sample], cfg: Config) -> tuple[float, float, float] | None:
    """The fixed class-balance weights of targets.class_balance "dataset" (from these training
    samples' labels); None for "crop" (each crop balanced on its own)."""
    if cfg.targets.class_balance != "dataset":
        return None
    return dataset_class_weights((s.labels for s in samples), cfg.targets.boundary_width)


class TrainDataset(Dataset):
    """Random crops, augmented, with targets and weight maps computed after augmentation.

    Item: (image (1, S, S) float32, classes (S, S) int64, weights (S, S) float32).
    Randomness comes from (seed, epoch, index), so a run is reproducible with any number
    of DataLoader workers. Call `set_epoch` before each epoch (workers are re-forked).
    """

    def __init__(self, samples: list[Sample], cfg: Config, seed: int = 0, class_weights: tuple[float, float, float] | None = None):
        """`class_weights`: targets.class_balance "dataset" weights already computed from these
        samples (`class_weights_for`); when None they are computed here (if that mode is on)."""
        self.samples = samples
        self.cfg = cfg
        self.seed = seed
        # draw probabilities under data.bright_weight; None when every image weighs the same
        weights = np.array([cfg.data.bright_weight if s.bright else 1.0 for s in samples])
        self.draw_p = weights / weights.sum() if len(set(weights.tolist())) > 1 else None
        self.class_weights = class_weights if class_weights is not None else class_weights_for(samples, cfg)
        self.set_epoch(0)

    def set_epoch(self, epoch: int, elastic: bool | None = None, per_epoch: int | None = None) -> None:
        """Fix the epoch's sample order (a permutation, or `per_epoch` draws) and augmentations."""
        self.epoch = epoch
        self.augmenter = Augmenter(self.cfg.augment, elastic=elastic)
        rng = np.random.default_rng([self.seed, epoch, 7])
        n = len(self.samples)
        if not per_epoch:
            self.order = rng.permutation(n)
        elif self.draw_p is None:
            self.order = rng.integers(0, n, per_epoch)
        else:  # data.bright_weight: bright-background images drawn more (or less) often
            self.order = rng.choice(n, per_epoch, p=self.draw_p)

    def __len__(self) -> int:
        return len(self.order)

    def augmented_crop(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Item `idx`'s (image, labels) crop after augmentation, before targets are computed."""
        rng = np.random.default_rng([self.seed, self.epoch, idx])
        s = self.samples[int(self.order[idx])]
        image, labels = random_scaled_crop(s.image, s.labels, self.cfg.data.crop_size, rng, self.cfg.augment.scale)
        return self.augmenter(image, labels, rng)

    def __getitem__(self, idx: int):
        image, labels = self.augmented_crop(idx)
        classes, weights = make_targets(labels, **self.cfg.targets.model_dump(), class_weights=self.class_weights)
        return (
            torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            torch.from_numpy(classes.astype(np.int64)),
            torch.from_numpy(weights.astype(np.float32)),
        )
