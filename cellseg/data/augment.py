"""Training augmentations on (image, instance labels) pairs: flips, rotations, quarter mirroring,
elastic deformation and intensity jitter.

Images are (H, W) float32 (percentile-normalised, ~[0, 1]); labels are (H, W) int32 instance ids
(0 = background). Every random draw comes from the `rng` argument, so a seed reproduces a sample.
Labels are only ever resampled nearest-neighbour, so no blended ids appear.
"""

from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from cellseg.config import AugmentConfig

__all__ = [
    "Augmenter",
    "elastic_deform",
    "mirror_quarters",
    "random_flip_rot90",
    "random_intensity",
    "random_rotate",
]

# Reflecting the border (without repeating the edge pixel) keeps rotated/warped crops free of
# empty corners, which would otherwise teach the network that black wedges are background.
_BORDER = cv2.BORDER_REFLECT_101


def _check(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coerce to float32 image and int32 labels of the same 2-D shape."""
    image = np.asarray(image, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int32)
    if image.ndim != 2 or image.shape != labels.shape:
        raise ValueError(f"expected 2-D image and labels of one shape, got {image.shape} and {labels.shape}")
    return image, labels


def _contiguous(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Flips and rot90 return strided views; torch.from_numpy and cv2 want C order.
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels, dtype=np.int32)


def random_flip_rot90(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, flips: bool = True, rot90: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Random horizontal/vertical flip and rotation by k*90 degrees.

    (H, W) -> (H, W), or (W, H) after an odd k on a non-square input.
    """
    image, labels = _check(image, labels)
    if flips:
        if rng.random() < 0.5:
            image, labels = image[:, ::-1], labels[:, ::-1]
        if rng.random() < 0.5:
            image, labels = image[::-1, :], labels[::-1, :]
    if rot90:
        k = int(rng.integers(4))
        image, labels = np.rot90(image, k), np.rot90(labels, k)
    return _contiguous(image, labels)


def random_rotate(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, max_angle: float = 180.0
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate about the centre by an angle ~ U(-max_angle, max_angle) degrees, reflect padding.

    Image bilinear, labels nearest; output shape equals input shape.
    """
    image, labels = _check(image, labels)
    angle = float(rng.uniform(-max_angle, max_angle))
    return _rotate(image, labels, angle)


def _rotate(image: np.ndarray, labels: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate counter-clockwise by `angle` degrees about the pixel-grid centre."""
    h, w = image.shape
    # (w-1)/2, (h-1)/2 is the centre of the pixel grid, so 90 degrees on a square is exactly np.rot90.
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, 1.0)
    img = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=_BORDER)
    # cv2 resamples int32 exactly with INTER_NEAREST, so ids of any size survive.
    lab = cv2.warpAffine(labels, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=_BORDER)
    return _contiguous(img, lab)


def _quarter_slices(h: int, w: int) -> list[tuple[slice, slice]]:
    """The four quarters split at (h//2, w//2), in row-major order."""
    hs, ws = h // 2, w // 2
    return [
        (slice(0, hs), slice(0, ws)),
        (slice(0, hs), slice(ws, w)),
        (slice(hs, h), slice(0, ws)),
        (slice(hs, h), slice(ws, w)),
    ]


def mirror_quarters(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """With probability p, flip each quarter (split at H//2, W//2) on both axes in place.

    Pieces of one cell that land in different quarters get distinct ids; ids are then renumbered
    1..n in order of (quarter, original id), so the result is compact.
    """
    image, labels = _check(image, labels)
    if rng.random() >= p:
        return _contiguous(image.copy(), labels.copy())
    h, w = image.shape
    img = np.empty_like(image)
    keyed = np.zeros(labels.shape, dtype=np.int64)
    # int64 keys q*(max+1)+id cannot overflow even for ids near 2^31.
    stride = int(labels.max(initial=0)) + 1
    for q, (rs, cs) in enumerate(_quarter_slices(h, w)):
        img[rs, cs] = image[rs, cs][::-1, ::-1]
        part = labels[rs, cs][::-1, ::-1].astype(np.int64)
        keyed[rs, cs] = np.where(part > 0, part + q * stride, 0)
    # Sorted unique keys -> 0 (background) then 1..n; return_inverse does the renumbering.
    uniq, inv = np.unique(keyed, return_inverse=True)
    if uniq[0] != 0:
        inv = inv + 1
    return _contiguous(img, inv.reshape(h, w).astype(np.int32))


def elastic_deform(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, alpha: float, sigma: float
) -> tuple[np.ndarray, np.ndarray]:
    """Simard (2003) elastic deformation: U(-1, 1) displacement fields smoothed by a Gaussian.

    alpha scales the smoothed fields (px per unit); sigma is the Gaussian std (px).
    alpha = 0 returns an exact copy. Image bilinear, labels nearest, reflect padding.
    """
    image, labels = _check(image, labels)
    h, w = image.shape
    # Draw both fields even when alpha is 0 so the rng stream does not depend on alpha.
    raw = rng.uniform(-1.0, 1.0, size=(2, h, w)).astype(np.float32)
    if alpha == 0:
        return _contiguous(image.copy(), labels.copy())
    dx = cv2.GaussianBlur(raw[0], (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=_BORDER) * alpha
    dy = cv2.GaussianBlur(raw[1], (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=_BORDER) * alpha
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x = (gx + dx).astype(np.float32)
    map_y = (gy + dy).astype(np.float32)
    img = cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=_BORDER)
    lab = cv2.remap(labels, map_x, map_y, interpolation=cv2.INTER_NEAREST, borderMode=_BORDER)
    return _contiguous(img, lab)


def random_intensity(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild gamma, contrast/brightness jitter and additive Gaussian noise.

    (H, W) float32 -> (H, W) float32; gamma = exp(U(-0.3, 0.3)) on the image clipped at 0,
    contrast x U(0.8, 1.2), brightness + U(-0.1, 0.1), noise sd ~ U(0, 0.03).
    """
    image = np.asarray(image, dtype=np.float32)
    gamma = float(np.exp(rng.uniform(-0.3, 0.3)))
    contrast = float(rng.uniform(0.8, 1.2))
    brightness = float(rng.uniform(-0.1, 0.1))
    noise_sd = float(rng.uniform(0.0, 0.03))
    # Clip before the power: negative values (below the low percentile) have no real gamma.
    out = np.power(np.maximum(image, 0.0), gamma, dtype=np.float32)
    out = out * contrast + brightness
    out = out + rng.normal(0.0, noise_sd, size=image.shape).astype(np.float32)
    return np.ascontiguousarray(out, dtype=np.float32)


class Augmenter:
    """The training augmentation pipeline for one AugmentConfig.

    `elastic` overrides cfg.elastic (curriculum stage 2 switches it on); None keeps cfg.elastic.
    """

    rotate_p = 0.5
    mirror_p = 0.5

    def __init__(self, cfg: Optional[AugmentConfig] = None, elastic: Optional[bool] = None) -> None:
        self.cfg = cfg if cfg is not None else AugmentConfig()
        self.elastic = bool(self.cfg.elastic if elastic is None else elastic)

    def __call__(
        self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augment one pair: (H, W) float32, (H, W) int32 -> same dtypes (shape may transpose)."""
        cfg = self.cfg
        image, labels = _check(image, labels)
        if cfg.flips or cfg.rot90:
            image, labels = random_flip_rot90(image, labels, rng, flips=cfg.flips, rot90=cfg.rot90)
        if cfg.rotate and rng.random() < self.rotate_p:
            image, labels = random_rotate(image, labels, rng)
        if cfg.mirror_quarters:
            image, labels = mirror_quarters(image, labels, rng, p=self.mirror_p)
        if self.elastic:
            alpha = float(rng.uniform(0.0, cfg.elastic_alpha_max))
            image, labels = elastic_deform(image, labels, rng, alpha, cfg.elastic_sigma)
        if cfg.intensity:
            image = random_intensity(image, rng)
        return _contiguous(image, labels)

    def describe(self) -> str:
        """Comma-separated active augmentations, e.g. 'flips, rot90, elastic(alpha<=50, sigma=4)'."""
        cfg = self.cfg
        parts = []
        if cfg.flips:
            parts.append("flips")
        if cfg.rot90:
            parts.append("rot90")
        if cfg.rotate:
            parts.append(f"rotate(p={self.rotate_p:g})")
        if cfg.mirror_quarters:
            parts.append(f"mirror_quarters(p={self.mirror_p:g})")
        if self.elastic:
            parts.append(f"elastic(alpha<={cfg.elastic_alpha_max:g}, sigma={cfg.elastic_sigma:g})")
        if cfg.intensity:
            parts.append("intensity")
        if cfg.scale > 1.0:
            parts.append(f"zoom(1/{cfg.scale:g}..{cfg.scale:g}, at cropping)")
        return ", ".join(parts) if parts else "none"

    def __repr__(self) -> str:
        return f"Augmenter({self.describe()})"
