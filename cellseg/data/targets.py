"""Training targets from instance labels: 3-class maps and U-Net (Ronneberger 2015) weight maps.

Classes: 0 background, 1 cell interior, 2 cell boundary. The weight map is
``w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` with ``w_c`` the class-balance weight and
``d1``, ``d2`` the distances to the nearest and second-nearest cell; the border term is applied
to background pixels only, as in the paper, where it makes the thin gaps between touching
cells expensive to get wrong.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from cellseg.errors import CellsegError

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2

# The border term is dropped where it is below this; it bounds the fast map's error.
_TERM_EPS = 1e-6


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Validate an (H, W) label image and return it as a non-negative integer array."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise CellsegError(f"labels of shape {labels.shape}; expected a 2-D (H, W) label image")
    if labels.dtype == np.bool_:
        return labels.astype(np.int32)
    if not np.issubdtype(labels.dtype, np.integer):
        raise CellsegError(f"labels of dtype {labels.dtype}; expected integer instance labels")
    if labels.size and labels.min() < 0:
        raise CellsegError("labels has negative values; expected 0 background, positive instance ids")
    return labels


def _check_classes(classes: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Validate an (H, W) class map (values 0, 1, 2) of the given shape."""
    classes = np.asarray(classes)
    if classes.shape != tuple(shape):
        raise CellsegError(f"classes of shape {classes.shape} do not match labels of shape {tuple(shape)}")
    if classes.size and (classes.min() < 0 or classes.max() > BOUNDARY):
        raise CellsegError("classes must hold only 0 (background), 1 (interior) and 2 (boundary)")
    return classes


def _check_weight_params(w0: float, sigma: float) -> None:
    """Refuse weight-map parameters that would give a non-finite or negative map."""
    if not (math.isfinite(w0) and w0 >= 0):
        raise CellsegError(f"w0={w0}: must be a finite number >= 0")
    if not (math.isfinite(sigma) and sigma > 0):
        raise CellsegError(f"sigma={sigma}: must be a finite number > 0")


def instances_to_classes(labels: np.ndarray, boundary_width: int = 2) -> np.ndarray:
    """Instance labels to a 3-class map: 0 background, 1 interior, 2 boundary.

    labels: (H, W) integer, 0 background, any positive ids (need not be contiguous).
    Returns (H, W) uint8. A cell pixel is boundary when a pixel with a different label (another
    cell or background) lies within `boundary_width` px in chessboard distance, i.e. inside the
    (2w+1) x (2w+1) square around it (8-connected erosion steps). The image border is not a
    boundary: the window is clamped to the image (edge replication adds no new labels).
    """
    labels = _check_labels(labels)
    if boundary_width < 0:
        raise CellsegError(f"boundary_width={boundary_width}: must be >= 0")
    classes = (labels > 0).astype(np.uint8)
    if boundary_width == 0 or labels.size == 0:
        return classes
    size = 2 * int(boundary_width) + 1
    # any differing label in the window is either larger or smaller than the pixel's own
    hi = ndi.maximum_filter(labels, size=size, mode="nearest")
    lo = ndi.minimum_filter(labels, size=size, mode="nearest")
    classes[(labels > 0) & ((hi != labels) | (lo != labels))] = BOUNDARY
    return classes


def class_balance_weights(classes: np.ndarray, class_weights=None) -> np.ndarray:
    """Per-pixel class-balance weight w_c, one over the class frequency in this image.

    classes: (H, W) values 0/1/2. Returns (H, W) float32, scaled so that its pixel mean is 1;
    absent classes get no weight (they have no pixels). With `class_weights` (three numbers, e.g.
    from `dataset_class_weights`) each pixel gets its class's fixed weight instead.
    """
    classes = np.asarray(classes)
    if classes.ndim != 2:
        raise CellsegError(f"classes of shape {classes.shape}; expected a 2-D (H, W) class map")
    classes = _check_classes(classes, classes.shape)
    if class_weights is not None:
        per_class = np.asarray(class_weights, np.float32)
        if per_class.shape != (3,) or not np.all(np.isfinite(per_class)) or per_class.min() < 0:
            raise CellsegError(f"class_weights {class_weights!r}: expected three finite numbers >= 0")
        return per_class[classes]
    if classes.size == 0:
        return np.zeros(classes.shape, np.float32)
    counts = np.bincount(classes.ravel().astype(np.intp), minlength=3).astype(np.float64)
    present = counts > 0
    # w_c = N / (K n_c) makes sum_c n_c w_c = N, so the pixel mean is exactly 1
    per_class = np.zeros(counts.shape, np.float64)
    per_class[present] = classes.size / (present.sum() * counts[present])
    return per_class[classes].astype(np.float32)


def dataset_class_weights(label_images, boundary_width: int = 2) -> tuple[float, float, float]:
    """Class-balance weights N / (K n_c) from the class counts of all `label_images` together
    (K = classes present; an absent class gets 0): one fixed w_c per class for the whole training
    set, instead of per crop, where a sliver of a cell can weigh hundreds of times a pixel."""
    counts = np.zeros(3, np.float64)
    for labels in label_images:
        counts += np.bincount(instances_to_classes(labels, boundary_width).ravel(), minlength=3)[:3]
    present = counts > 0
    weights = np.zeros(3, np.float64)
    if present.any():
        weights[present] = counts.sum() / (present.sum() * counts[present])
    return tuple(float(w) for w in weights)


def _two_smallest_update(d1: np.ndarray, d2: np.ndarray, d: np.ndarray) -> None:
    """In place: fold distances `d` into the running smallest (d1) and second smallest (d2)."""
    np.minimum(d2, np.maximum(d1, d), out=d2)
    np.minimum(d1, d, out=d1)


def _border_term(d1: np.ndarray, d2: np.ndarray, w0: float, sigma: float, where: np.ndarray) -> np.ndarray:
    """w0 * exp(-(d1+d2)^2 / (2 sigma^2)) on the pixels `where` is True, 0 elsewhere; (H, W) float32."""
    s = d1.astype(np.float64) + d2  # inf where fewer than two cells are near: exp gives 0
    term = w0 * np.exp(-(s * s) / (2.0 * sigma * sigma))
    term[~where] = 0.0
    return term.astype(np.float32)


def _border_pixels(labels: np.ndarray, classes: np.ndarray, touching: bool) -> np.ndarray:
    """Where the border term applies: background pixels (the paper's gaps between cells) and,
    with `touching`, also boundary-class pixels. A boundary pixel of cell A has d1 = 0 and d2 the
    distance to the nearest other cell, so only boundaries that touch or nearly touch another cell
    gain weight: the pixels that separate cells whose masks share an edge, as in DSB-style labels."""
    if touching:
        return (labels == 0) | (classes == BOUNDARY)
    return labels == 0


def _prepare(labels, classes, w0, sigma, boundary_width):
    """Shared argument checks for both weight-map versions; returns (labels, classes)."""
    labels = _check_labels(labels)
    _check_weight_params(w0, sigma)
    if classes is None:
        classes = instances_to_classes(labels, boundary_width)
    else:
        classes = _check_classes(classes, labels.shape)
    return labels, classes


def unet_weight_map(
    labels: np.ndarray,
    classes: np.ndarray | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    boundary_width: int = 2,
    weight_touching: bool = False,
    class_weights=None,
) -> np.ndarray:
    """U-Net weight map w_c + w0 exp(-(d1+d2)^2 / (2 sigma^2)), fast version; (H, W) float32.

    labels: (H, W) integer instance labels; classes: (H, W) 0/1/2 map, computed from labels with
    `boundary_width` when None. d1, d2 (px) are Euclidean distances to the nearest and second
    nearest cell; the border term is applied to background pixels only (the gaps between cells),
    and with `weight_touching` also to boundary-class pixels (the edges where cells touch).

    Each cell's distance transform is computed only in its bounding box grown by
    R = ceil(sigma sqrt(2 ln(w0/eps))), eps = 1e-6: where d1 + d2 > R the term is below eps,
    and where d1 + d2 <= R both cells lie within R so both are measured exactly. The result
    therefore differs from `unet_weight_map_naive` by less than 1e-6 (plus float32 rounding).
    `class_weights`: fixed per-class w_c (see `class_balance_weights`); None balances this image.
    """
    labels, classes = _prepare(labels, classes, w0, sigma, boundary_width)
    weights = class_balance_weights(classes, class_weights)
    if w0 <= _TERM_EPS or labels.size == 0:
        return weights  # the border term is negligible everywhere
    radius = int(math.ceil(sigma * math.sqrt(2.0 * math.log(w0 / _TERM_EPS))))

    lab = labels
    if lab.max() > lab.size:
        # sparse huge ids would make find_objects allocate one slot per id
        _, inv = np.unique(lab, return_inverse=True)
        lab = inv.reshape(lab.shape)
    objects = ndi.find_objects(lab)
    if sum(sl is not None for sl in objects) < 2:
        return weights  # the term needs two cells

    h, w = lab.shape
    d1 = np.full(lab.shape, np.inf, np.float32)
    d2 = np.full(lab.shape, np.inf, np.float32)
    for idx, sl in enumerate(objects):
        if sl is None:
            continue
        ys, xs = sl
        crop = (
            slice(max(ys.start - radius, 0), min(ys.stop + radius, h)),
            slice(max(xs.start - radius, 0), min(xs.stop + radius, w)),
        )
        dist = ndi.distance_transform_edt(lab[crop] != idx + 1).astype(np.float32)
        _two_smallest_update(d1[crop], d2[crop], dist)
    return weights + _border_term(d1, d2, w0, sigma, _border_pixels(labels, classes, weight_touching))


def unet_weight_map_naive(
    labels: np.ndarray,
    classes: np.ndarray | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    boundary_width: int = 2,
    weight_touching: bool = False,
    class_weights=None,
) -> np.ndarray:
    """Reference U-Net weight map: one full-image distance transform per cell; (H, W) float32.

    Same arguments and result as `unet_weight_map`, without the distance cut-off. The two
    smallest distances are kept as running minima rather than by sorting an (N, H, W) stack,
    which gives the same values without holding N full images in memory.
    """
    labels, classes = _prepare(labels, classes, w0, sigma, boundary_width)
    weights = class_balance_weights(classes, class_weights)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if w0 == 0 or len(ids) < 2:
        return weights
    d1 = np.full(labels.shape, np.inf, np.float32)
    d2 = np.full(labels.shape, np.inf, np.float32)
    for i in ids:
        _two_smallest_update(d1, d2, ndi.distance_transform_edt(labels != i).astype(np.float32))
    return weights + _border_term(d1, d2, w0, sigma, _border_pixels(labels, classes, weight_touching))


def make_targets(
    labels: np.ndarray,
    boundary_width: int = 2,
    w0: float = 10.0,
    sigma: float = 5.0,
    weight_touching: bool = False,
    class_balance: str = "crop",
    class_weights=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Training targets from instance labels: (classes (H, W) uint8, weights (H, W) float32).

    class_balance "crop" balances the classes of this label image; "dataset" uses the fixed
    `class_weights` (`dataset_class_weights` of the training labels), which it then requires.
    """
    if class_balance not in ("crop", "dataset"):
        raise CellsegError(f"class_balance {class_balance!r}: expected 'crop' or 'dataset'")
    if class_balance == "dataset" and class_weights is None:
        raise CellsegError("class_balance 'dataset' needs class_weights (dataset_class_weights of the training labels)")
    classes = instances_to_classes(labels, boundary_width)
    weights = unet_weight_map(
        labels, classes, w0=w0, sigma=sigma, boundary_width=boundary_width, weight_touching=weight_touching,
        class_weights=class_weights if class_balance == "dataset" else None,
    )
    return classes, weights
