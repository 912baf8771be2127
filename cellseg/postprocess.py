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


POSTPROCESS_KEYS = ("interior_threshold", "foreground_threshold", "min_size", "min_seed_size", "min_score")
DEFAULT_SIZES = {"min_size": 10, "min_seed_size": 3}  # px; the defaults of probabilities_to_instances
DEFAULTS = {"interior_threshold": 0.5, "foreground_threshold": 0.5, **DEFAULT_SIZES, "min_score": 0.0}  # all of them


def effective_postprocess(params: dict) -> dict:
    """`params` with every option it leaves out at its default: what probabilities_to_instances applies."""
    return {**DEFAULTS, **params}


def check_postprocess(params: dict | None, source: str = "postprocess") -> dict:
    """A copy of `probabilities_to_instances` options after checking names and ranges (CellsegError naming `source`)."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(POSTPROCESS_KEYS))
    if unknown:
        raise CellsegError(f"{source}: unknown option(s) {', '.join(unknown)}; expected {', '.join(POSTPROCESS_KEYS)}")
    for key in ("interior_threshold", "foreground_threshold", "min_score"):
        if key in params and not (isinstance(params[key], (int, float)) and 0.0 <= params[key] <= 1.0):
            raise CellsegError(f"{source}: {key} {params[key]!r}: expected a number in [0, 1]")
    for key in ("min_size", "min_seed_size"):
        if key in params and not (isinstance(params[key], int) and not isinstance(params[key], bool) and params[key] >= 0):
            raise CellsegError(f"{source}: {key} {params[key]!r}: expected a whole number >= 0")
    return params


def model_postprocess(model, overrides: dict | None = None, bright: bool = False) -> dict:
    """The post-processing options for `model`: those stored with it (tuned on validation data),
    then `overrides` (None values ignored) on top. `bright`: for an image the model inverted as
    bright-background (brightfield, H&E); the model's `postprocess_bright` operating point when
    it has one (`cellseg tune` stores it), else its usual one."""
    stored = getattr(model, "postprocess_bright", None) if bright else None
    params = dict(stored or getattr(model, "postprocess", None) or {})
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


def _lookup_inplace(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """labels[...] = lut[labels], band by band (no full-size temporary); returns labels."""
    for rows in _bands(labels):
        labels[rows] = lut[labels[rows]]
    return labels


def _bands(arr: np.ndarray):
    """Row slices of ~4 M pixels covering arr (for per-pixel work without full-size temporaries)."""
    band = max(1, (1 << 22) // max(arr[0].size, 1)) if arr.ndim > 1 else max(arr.size, 1)
    return (slice(r0, r0 + band) for r0 in range(0, arr.shape[0], band))


def _count_labels(labels: np.ndarray) -> np.ndarray:
    """np.bincount(labels.ravel()) computed band by band (np.bincount makes an int64 copy of its input)."""
    counts = np.zeros(int(labels.max(initial=0)) + 1, np.int64)
    for rows in _bands(labels):
        counts += np.bincount(labels[rows].ravel(), minlength=counts.size)
    return counts


def _filter_and_relabel(labels: np.ndarray, min_size: int, background: np.ndarray | None = None,
                        min_score: float = 0.0) -> np.ndarray:
    """Drop objects below min_size (and, with min_score > 0, those whose `object_scores` from
    `background` are below it) and renumber the rest 1..N, in place, in one pass (labels: compact
    non-negative int32 ids); returns labels."""
    if min_score > 0:
        counts, scores = _areas_and_scores(labels, background)
        keep = (counts >= max(min_size, 1)) & (scores >= min_score)
    else:
        keep = _count_labels(labels) >= max(min_size, 1)
    keep[0] = False
    lut = np.cumsum(keep).astype(np.int32)
    lut[~keep] = 0
    return _lookup_inplace(labels, lut)


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


def threshold_probabilities(probs, interior_threshold: float = 0.5, foreground_threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(seed mask, foreground mask), both (H, W) bool, from (3, H, W) probabilities [background, interior, boundary].

    Foreground: p_interior + p_boundary > foreground_threshold; seeds: p_interior >
    interior_threshold inside the foreground. Works on any band of rows, so a huge image's
    probabilities can be thresholded as they are produced (`inference.MaskSink`).
    """
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[0] != 3:
        raise CellsegError(f"probs must have shape (3, H, W) [background, interior, boundary], not {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float32)
    foreground = (p[1] + p[2]) > foreground_threshold
    seed_mask = p[1] > interior_threshold
    seed_mask &= foreground
    return seed_mask, foreground


def probabilities_to_instances(
    probs,
    interior_threshold: float = 0.5,
    foreground_threshold: float = 0.5,
    min_size: int = DEFAULT_SIZES["min_size"],
    min_seed_size: int = DEFAULT_SIZES["min_seed_size"],
    min_score: float = 0.0,
) -> np.ndarray:
    """Instance labels from per-pixel class probabilities [background, interior, boundary].

    Seeds: 4-connected components of p_interior > interior_threshold (inside the foreground),
    those smaller than min_seed_size pixels dropped. Foreground: p_interior + p_boundary >
    foreground_threshold. Seeds grow over their own 4-connected foreground component in order of
    geodesic distance (Euclidean beyond 32 px); seedless foreground components become instances
    of their own. Objects smaller than min_size pixels, and those whose mean foreground
    probability (1 - p_background) is below min_score (`object_scores`), are removed and the rest
    numbered 1..N.

    Args:
        probs: (3, H, W) float, classes [background, interior, boundary], summing to 1 per pixel.
        min_score: 0 keeps every object (the default).
    Returns:
        (H, W) int32 labels, 0 = background.
    """
    if min_size < 0 or min_seed_size < 0:
        raise CellsegError(f"min_size and min_seed_size must be >= 0, got {min_size} and {min_seed_size}")
    seed_mask, foreground = threshold_probabilities(probs, interior_threshold, foreground_threshold)
    return masks_to_instances(seed_mask, foreground, min_size, min_seed_size,
                              background=np.asarray(probs)[0] if min_score > 0 else None, min_score=min_score)


def object_scores(labels: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Each object's mean foreground probability, 1 - mean p(background) over its pixels: how sure
    the network is of the whole object (StarDist's object probability, Cellpose's cell probability).

    p(background) is read as float16 (what infer's `MaskSink` keeps of it, 2 bytes a pixel), so
    every path scores an object alike.

    Args:
        labels: (H, W) non-negative integer labels.
        background: (H, W) p(background), the first of the three class probabilities.
    Returns:
        float64 array indexed by label id (0..labels.max()); ids with no pixels score 0.
    """
    if background.shape != labels.shape:
        raise CellsegError(f"background probabilities {background.shape} and labels {labels.shape} differ in shape")
    return _areas_and_scores(labels, background)[1]


def _areas_and_scores(labels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixel count, `object_scores`) of every label id, band by band."""
    n = int(labels.max(initial=0)) + 1
    area, total = np.zeros(n, np.int64), np.zeros(n, np.float64)
    for rows in _bands(labels):
        ids = labels[rows].ravel()
        area += np.bincount(ids, minlength=n)
        total += np.bincount(ids, weights=background[rows].astype(np.float16, copy=False).ravel(), minlength=n)
    return area, np.where(area > 0, 1.0 - total / np.maximum(area, 1), 0.0)


def masks_to_instances(
    seed_mask: np.ndarray,
    foreground: np.ndarray,
    min_size: int = DEFAULT_SIZES["min_size"],
    min_seed_size: int = DEFAULT_SIZES["min_seed_size"],
    background: np.ndarray | None = None,
    min_score: float = 0.0,
) -> np.ndarray:
    """Instance labels from a seed mask and a foreground mask ((H, W) bool, seeds inside the
    foreground): the second half of `probabilities_to_instances`. Both masks are consumed
    (modified or freed by the caller's choice: pass copies to keep them). `min_score` > 0 needs
    `background`, the (H, W) p(background) the masks were thresholded from."""
    if min_size < 0 or min_seed_size < 0:
        raise CellsegError(f"min_size and min_seed_size must be >= 0, got {min_size} and {min_seed_size}")
    if not 0.0 <= min_score <= 1.0:
        raise CellsegError(f"min_score must be in [0, 1], got {min_score}")
    if min_score > 0 and background is None:
        raise CellsegError("min_score needs the background probabilities")
    if seed_mask.shape != foreground.shape or seed_mask.ndim != 2:
        raise CellsegError(f"seed and foreground masks must be (H, W) of one shape, not {seed_mask.shape} and {foreground.shape}")
    if not foreground.any():
        return np.zeros(foreground.shape, np.int32)

    # written to keep per-pixel temporaries few and small: a 100-megapixel image is a normal input
    seeds, n_seeds = ndimage.label(seed_mask, structure=_CROSS)
    del seed_mask
    if n_seeds and min_seed_size > 1:
        seeds = _filter_and_relabel(seeds, min_seed_size)
        n_seeds = int(seeds.max(initial=0))
    components, n_components = ndimage.label(foreground, structure=_CROSS)
    del foreground

    # Each seed lies in one foreground component; count the seeds of every component.
    seed_component = np.zeros(n_seeds + 1, np.int64)
    for rows in _bands(seeds):  # all pixels of a seed share one component
        seed_component[seeds[rows].ravel()] = components[rows].ravel()
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
    shared = (n_seeds_in >= 2)[components]  # components with several seeds: grow them in geodesic order
    labels = _lookup_inplace(components, only_seed.astype(np.int32))  # the components array becomes the labels
    del components
    np.copyto(labels, seeds, where=shared)
    del seeds
    if shared.any():
        _grow_components(labels, shared)
    return _filter_and_relabel(labels, min_size, background, min_score)


def _grow_components(labels: np.ndarray, shared: np.ndarray, max_rows: int = 1024) -> None:
    """Grow the seeds in `labels` over the foreground components that make up `shared`, in place.

    Components are independent (growth never leaves one), so they are grown in groups whose rows
    span at most about `max_rows`: temporaries stay the size of a band, not of the whole image.
    """
    components, _ = ndimage.label(shared, structure=_CROSS)  # the components with several seeds only
    boxes = ndimage.find_objects(components)
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0].start)
    group: list[int] = []
    r0 = r1 = c0 = c1 = 0

    def flush() -> None:
        if not group:
            return
        box = (slice(r0, r1), slice(c0, c1))
        comp = components[box]
        member = np.zeros(len(boxes) + 1, bool)
        member[np.asarray(group) + 1] = True
        mask = member[comp]
        grown = _grow(np.where(mask, labels[box], 0), mask, comp)
        np.copyto(labels[box], grown, where=mask)

    for i in order:
        rs, cs = boxes[i]
        if group and max(r1, rs.stop) - r0 > max_rows:
            flush()
            group = []
        if not group:
            r0, r1, c0, c1 = rs.start, rs.stop, cs.start, cs.stop
        else:
            r1, c0, c1 = max(r1, rs.stop), min(c0, cs.start), max(c1, cs.stop)
        group.append(i)
    flush()
