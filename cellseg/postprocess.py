"""From 3-class probabilities (background, interior, boundary) to an instance label image.

Seeds are the 4-connected components of confident interior; they grow over the foreground
(interior + boundary) in order of geodesic distance (4-connected steps; beyond 32 steps, nearest
in Euclidean distance), never leaving their own foreground component. Foreground components
that hold no seed are kept as instances of their own, so a small cell predicted as boundary only
is not lost.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np
from scipy import ndimage

from cellseg.errors import CellsegError

_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity
_CROSS_U8 = _CROSS.astype(np.uint8)
_FLOAT32_EXACT = 2**24  # float32 holds every integer label below this exactly


POSTPROCESS_KEYS = ("interior_threshold", "foreground_threshold", "min_size", "min_seed_size")


def check_postprocess(params: dict | None, source: str = "postprocess") -> dict:
    """A copy of `probabilities_to_instances` options after checking names and ranges (CellsegError naming `source`)."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(POSTPROCESS_KEYS))
    if unknown:
        raise CellsegError(f"{source}: unknown option(s) {', '.join(unknown)}; expected {', '.join(POSTPROCESS_KEYS)}")
    for key in ("interior_threshold", "foreground_threshold"):
        if key in params and not (isinstance(params[key], (int, float)) and 0.0 <= params[key] <= 1.0):
            raise CellsegError(f"{source}: {key} {params[key]!r}: expected a number in [0, 1]")
    for key in ("min_size", "min_seed_size"):
        if key in params and not (isinstance(params[key], int) and not isinstance(params[key], bool) and params[key] >= 0):
            raise CellsegError(f"{source}: {key} {params[key]!r}: expected a whole number >= 0")
    return params


def model_postprocess(model, overrides: dict | None = None) -> dict:
    """The post-processing options for `model`: those stored with it (tuned on validation data),
    then `overrides` (None values ignored) on top."""
    params = dict(getattr(model, "postprocess", None) or {})
    params.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return check_postprocess(params)


def _check_labels(labels, name: str = "labels") -> np.ndarray:
    """Return labels as an array after checking it is an integer (or bool) image with no negative ids."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise CellsegError(f"{name}: expected an integer label image, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise CellsegError(f"{name}: label ids must be >= 0 (0 is background), found {arr.min()}")
    return arr


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map ids to 0..n keeping their order (0 stays background).

    Args:
        labels: checked label image (non-negative integers), any shape.
    Returns:
        (int64 array of the same shape, n = number of objects).
    """
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(labels.shape, np.int64), 0
    top = int(flat.max())
    if top <= 4 * flat.size + 1024:  # a lookup table is cheaper than sorting
        present = np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1) > 0
        present[0] = False
        lut = np.cumsum(present)
        n = int(lut[-1])
        lut[~present] = 0
        out = lut[flat]
    else:  # huge ids (e.g. hashes): sort instead of allocating a table of size max id
        uniq, inv = np.unique(flat, return_inverse=True)
        if uniq[0] == 0:
            out, n = inv.astype(np.int64), len(uniq) - 1
        else:
            out, n = inv.astype(np.int64) + 1, len(uniq)
    return out.reshape(labels.shape), n


def relabel_sequential(labels) -> np.ndarray:
    """Renumber object ids to 1..N in the order of the original ids; 0 stays background.

    Args:
        labels: integer or bool label image, any shape, ids >= 0 (may be non-contiguous).
    Returns:
        int32 array of the same shape (int64 if there are more than 2**31 - 1 objects).
    """
    out, n = _compact(_check_labels(labels))
    return out.astype(np.int32 if n < 2**31 else np.int64)


def remove_small_objects(labels, min_size: int) -> np.ndarray:
    """Set objects with fewer than min_size pixels to 0; other ids are kept unchanged.

    Args:
        labels: integer or bool label image, any shape, ids >= 0.
        min_size: smallest area (pixels) that is kept.
    Returns:
        New array with the dtype and shape of labels.
    """
    if min_size < 0:
        raise CellsegError(f"min_size must be >= 0, got {min_size}")
    arr = np.asarray(labels)
    checked = _check_labels(arr)
    out = arr.copy()
    if min_size <= 1 or out.size == 0:
        return out
    compact, n = _compact(checked)
    small = np.bincount(compact.ravel(), minlength=n + 1) < min_size
    small[0] = False
    out[small[compact]] = 0
    return out


def _filter_and_relabel(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects below min_size and renumber the rest 1..N (labels: compact non-negative ints)."""
    counts = np.bincount(labels.ravel())
    keep = counts >= max(min_size, 1)
    keep[0] = False
    lut = np.cumsum(keep).astype(np.int32)
    lut[~keep] = 0
    return lut[labels]


def _grow(seeds: np.ndarray, mask: np.ndarray, components: np.ndarray, max_steps: int = 32) -> np.ndarray:
    """Grow seed labels over mask one 4-neighbour step at a time (geodesic distance order).

    After max_steps steps, pixels still unreached take the label of the Euclidean-nearest labelled
    pixel of their own component (keeps big, sparsely seeded regions fast); any left then keep growing.

    Args:
        seeds: (H, W) int32 ids (0 = none); every mask component to fill holds at least one seed.
        mask: (H, W) bool region to fill.
        components: (H, W) int ids of the 4-connected components of the foreground.
    Returns:
        (H, W) int32; where two seeds reach a pixel in the same step, the larger id wins.
    """
    if seeds.max(initial=0) < _FLOAT32_EXACT:
        labels = seeds.astype(np.float32)
        dilate = lambda a: cv2.dilate(a, _CROSS_U8)  # noqa: E731  (fast path, exact below 2**24)
    else:
        labels = seeds.copy()
        dilate = lambda a: ndimage.grey_dilation(a, footprint=_CROSS)  # noqa: E731
    todo = mask & (labels == 0)
    for step in itertools.count():
        if not todo.any():
            break
        if step == max_steps:
            unlabelled = labels == 0
            nearest = tuple(
                ndimage.distance_transform_edt(unlabelled, return_distances=False, return_indices=True)
            )
            take = todo & (components[nearest] == components)
            labels[take] = labels[nearest][take]
            todo &= ~take
            continue
        grown = dilate(labels)
        new = todo & (grown > 0)
        if not new.any():
            break
        labels[new] = grown[new]
        todo &= ~new
    return labels.astype(np.int32)


def probabilities_to_instances(
    probs,
    interior_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_size: int = 10,
    min_seed_size: int = 3,
) -> np.ndarray:
    """Instance labels from per-pixel class probabilities [background, interior, boundary].

    Seeds: 4-connected components of p_interior > interior_threshold (inside the foreground),
    those smaller than min_seed_size pixels dropped. Foreground: p_interior + p_boundary >
    foreground_threshold. Seeds grow over their own 4-connected foreground component in order of
    geodesic distance (Euclidean beyond 32 px); seedless foreground components become instances
    of their own. Objects smaller than min_size pixels are removed and the rest numbered 1..N.

    Args:
        probs: (3, H, W) float, classes [background, interior, boundary], summing to 1 per pixel.
    Returns:
        (H, W) int32 labels, 0 = background.
    """
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[0] != 3:
        raise CellsegError(f"probs must have shape (3, H, W) [background, interior, boundary], not {p.shape}")
    if min_size < 0 or min_seed_size < 0:
        raise CellsegError(f"min_size and min_seed_size must be >= 0, got {min_size} and {min_seed_size}")
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float32)
    interior, boundary = p[1], p[2]
    foreground = (interior + boundary) > foreground_threshold
    if not foreground.any():
        return np.zeros(p.shape[1:], np.int32)

    # written to keep per-pixel temporaries few and small: a 100-megapixel image is a normal input
    seed_mask = interior > interior_threshold
    seed_mask &= foreground
    seeds, n_seeds = ndimage.label(seed_mask, structure=_CROSS)
    del seed_mask
    if n_seeds and min_seed_size > 1:
        seeds = _filter_and_relabel(seeds, min_seed_size)
        n_seeds = int(seeds.max(initial=0))
    components, n_components = ndimage.label(foreground, structure=_CROSS)
    del foreground

    # Each seed lies in one foreground component; count the seeds of every component.
    seed_component = np.zeros(n_seeds + 1, np.int64)
    seed_component[seeds.ravel()] = components.ravel()  # all pixels of a seed share one component
    seed_component[0] = 0
    n_seeds_in = np.bincount(seed_component[1:], minlength=n_components + 1)
    n_seeds_in[0] = -1  # background

    # One seed: growth would fill its whole component. No seed: the component is its own instance.
    only_seed = np.zeros(n_components + 1, np.int64)
    single = n_seeds_in[seed_component] == 1
    single[0] = False
    only_seed[seed_component[single]] = np.flatnonzero(single)
    seedless = n_seeds_in == 0
    only_seed[seedless] = n_seeds + np.cumsum(seedless)[seedless]
    labels = only_seed.astype(np.int32)[components]
    shared = (n_seeds_in >= 2)[components]  # components with several seeds: grow them in geodesic order
    np.copyto(labels, seeds, where=shared)
    del seeds
    if shared.any():
        rows, cols = np.flatnonzero(shared.any(axis=1)), np.flatnonzero(shared.any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        labels[box] = _grow(labels[box], shared[box], components[box])
    del shared, components
    return _filter_and_relabel(labels, min_size)
