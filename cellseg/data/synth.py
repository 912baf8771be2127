"""Synthetic fluorescence-nuclei images: the embedded default dataset for demos and tests.

Each image holds elliptical nuclei of varied size, eccentricity, orientation and brightness,
with textured interiors (smoothed noise and a few bright chromocentre-like spots). Many are
placed against an earlier nucleus so that pairs touch: the later one is clipped by the earlier,
so labels never overlap and only the boundary class can separate them. The ideal signal is
blurred by a Gaussian PSF, put on an uneven background (smooth illumination gradient,
vignetting, autofluorescence, out-of-focus haze, camera offset) and given Poisson shot noise
plus Gaussian read noise, as 16-bit camera counts (roughly 100..4000).

Public API:

- :func:`synth_image` -- one (image uint16, labels int32) pair from a numpy Generator.
- :func:`write_dataset` -- ``out_dir/images/synth_0000.png`` + ``out_dir/masks/synth_0000.png``...
- :func:`cache_dir`, :func:`default_dataset_dir`, :func:`ensure_default_dataset` -- a cached
  dataset under ``~/.cache/cellseg`` (or ``$CELLSEG_CACHE_DIR``), generated once, atomically.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from cellseg.data.io import write_png
from cellseg.errors import CellsegError

#: nuclei per 256x256 image on average when `n_nuclei` is not given (scaled with the area)
NUCLEI_PER_256SQ = 25.0
#: no label is smaller than this many pixels
MIN_NUCLEUS_PX = 24
#: semi-axis range of the nuclei, px (before clipping by neighbours and the image border)
SEMI_AXIS_RANGE = (5.0, 16.0)
#: probability that a new nucleus is placed against an existing one (touching/clustered)
TOUCH_PROBABILITY = 0.45
#: a clipped nucleus must keep at least this fraction of its (in-image) ellipse
MIN_KEPT_FRACTION = 0.6

CACHE_ENV = "CELLSEG_CACHE_DIR"
_STEM_RE = re.compile(r"^synth_\d{4,}\.png$")
_STALE_TMP_S = 3600.0


def _hw(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(H, W) from an int (square) or a pair; CellsegError when too small or malformed."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise CellsegError(f"size {size!r}: expected an int or (height, width)") from None
    if h < 16 or w < 16:
        raise CellsegError(f"size {h}x{w}: synthetic images must be at least 16x16")
    return h, w


def _unit_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise smoothed by a Gaussian of `sigma` px, rescaled to zero mean, unit std."""
    field = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _radius_along(a: float, b: float, phi: float, theta: float) -> float:
    """Distance from the centre to the edge of an ellipse (semi-axes a, b, angle phi) along theta."""
    t = theta - phi
    return 1.0 / math.sqrt((math.cos(t) / a) ** 2 + (math.sin(t) / b) ** 2)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], grid: int = 4) -> np.ndarray:
    """A very smooth random field in about [-1, 1]: a coarse random grid, cubic-upsampled."""
    h, w = shape
    coarse = rng.uniform(-1.0, 1.0, size=(grid, grid)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)


def _place_nuclei(
    rng: np.random.Generator, shape: tuple[int, int], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw up to n non-overlapping nuclei; returns (labels int32, ideal signal float32)."""
    h, w = shape
    labels = np.zeros(shape, np.int32)
    signal = np.zeros(shape, np.float32)
    fine = _unit_noise(rng, shape, 1.0)
    coarse = _unit_noise(rng, shape, 3.0)
    placed: list[tuple[float, float, float, float, float]] = []  # cy, cx, a, b, phi
    attempts, max_attempts = 0, 40 * n + 50
    while len(placed) < n and attempts < max_attempts:
        attempts += 1
        a = rng.uniform(6.0, SEMI_AXIS_RANGE[1])
        b = max(SEMI_AXIS_RANGE[0], a * rng.uniform(0.55, 1.0))
        a = max(a, b)
        phi = rng.uniform(0.0, math.pi)
        if placed and rng.random() < TOUCH_PROBABILITY:
            # against an existing nucleus, slightly overlapping: clipping makes them touch
            pcy, pcx, pa, pb, pphi = placed[int(rng.integers(len(placed)))]
            theta = rng.uniform(0.0, 2.0 * math.pi)
            d = (_radius_along(pa, pb, pphi, theta) + _radius_along(a, b, phi, theta)) * rng.uniform(0.8, 0.97)
            cy, cx = pcy + d * math.sin(theta), pcx + d * math.cos(theta)
        else:
            cy, cx = rng.uniform(-0.3 * b, h - 1 + 0.3 * b), rng.uniform(-0.3 * b, w - 1 + 0.3 * b)
        # irregular outline: the radius wobbles a little with the polar angle
        wob = rng.uniform(0.0, 0.07, size=2)
        wph = rng.uniform(0.0, 2.0 * math.pi, size=2)

        r = a * (1.0 + wob.sum()) + 1.0
        y0, y1 = max(0, int(math.floor(cy - r))), min(h, int(math.ceil(cy + r)) + 1)
        x0, x1 = max(0, int(math.floor(cx - r))), min(w, int(math.ceil(cx + r)) + 1)
        if y1 - y0 < 3 or x1 - x0 < 3:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        u = dx * math.cos(phi) + dy * math.sin(phi)
        v = -dx * math.sin(phi) + dy * math.cos(phi)
        ang = np.arctan2(v, u)
        wobble = 1.0 + wob[0] * np.sin(2.0 * ang + wph[0]) + wob[1] * np.sin(3.0 * ang + wph[1])
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
        inside = rho <= 1.0
        full = int(inside.sum())
        if full < MIN_NUCLEUS_PX:
            continue
        free = inside & (labels[y0:y1, x0:x1] == 0)
        comp, ncomp = ndi.label(free)
        if ncomp == 0:
            continue
        if ncomp > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            free = comp == int(sizes.argmax())
        kept = int(free.sum())
        if kept < max(MIN_NUCLEUS_PX, MIN_KEPT_FRACTION * full):
            continue

        lab = len(placed) + 1
        labels[y0:y1, x0:x1][free] = lab
        placed.append((cy, cx, a, b, phi))

        # intensity: brightness x flat-topped dome x texture, plus a few bright spots
        bright = float(np.clip(rng.lognormal(0.0, 0.35), 0.35, 1.8))
        profile = 1.0 - 0.3 * np.clip(rho, 0.0, 1.0) ** 3
        tex = 1.0 + rng.uniform(0.05, 0.15) * fine[y0:y1, x0:x1] + rng.uniform(0.05, 0.2) * coarse[y0:y1, x0:x1]
        value = bright * profile * np.clip(tex, 0.2, None)
        ys, xs = np.nonzero(free)
        for _ in range(int(rng.integers(0, 5))):
            k = int(rng.integers(len(ys)))
            s = rng.uniform(0.8, 1.8)
            amp = bright * rng.uniform(0.25, 0.7)
            d2 = (np.arange(y1 - y0)[:, None] - ys[k]) ** 2 + (np.arange(x1 - x0)[None, :] - xs[k]) ** 2
            value = value + amp * np.exp(-d2 / (2.0 * s * s)).astype(np.float32)
        signal[y0:y1, x0:x1][free] = value[free]
    return labels, signal


def synth_image(
    rng: np.random.Generator,
    size: int | tuple[int, int] = (256, 256),
    n_nuclei: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic fluorescence-nuclei image and its instance labels.

    Returns ``(image, labels)``: image (H, W) uint16 camera counts, labels (H, W) int32 with
    ids 1..N contiguous (0 background), none smaller than MIN_NUCLEUS_PX pixels and none
    overlapping. `n_nuclei` is the number asked for (default: random, about 25 per 256x256
    area); fewer are returned when the image is too crowded to fit them all.
    """
    h, w = _hw(size)
    if n_nuclei is None:
        mean = NUCLEI_PER_256SQ * h * w / (256.0 * 256.0)
        n_nuclei = max(1, int(round(mean * rng.uniform(0.7, 1.3))))
    elif int(n_nuclei) < 0:
        raise CellsegError(f"n_nuclei {n_nuclei}: must be 0 or more")
    labels, signal = _place_nuclei(rng, (h, w), int(n_nuclei))
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise CellsegError(f"{labels.max()} nuclei: too many for 16-bit label masks")

    # optics: PSF blur of the in-focus signal plus a wide out-of-focus haze
    psf_sigma = rng.uniform(1.0, 2.0)
    blurred = cv2.GaussianBlur(signal, (0, 0), psf_sigma, borderType=cv2.BORDER_REFLECT)
    small = cv2.resize(signal, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), rng.uniform(2.0, 4.0), borderType=cv2.BORDER_REFLECT)
    haze = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)  # wide blur, sigma ~8-16 px
    optical = blurred + rng.uniform(0.05, 0.2) * haze

    # uneven illumination: linear gradient, vignetting and a smooth random component
    yy = (np.arange(h, dtype=np.float32)[:, None] - (h - 1) / 2.0) / max(h, w)
    xx = (np.arange(w, dtype=np.float32)[None, :] - (w - 1) / 2.0) / max(h, w)
    gy, gx = rng.uniform(-0.35, 0.35, size=2)
    illum = 1.0 + gy * yy + gx * xx - rng.uniform(0.0, 0.6) * (yy**2 + xx**2)
    illum = illum + rng.uniform(0.0, 0.12) * _smooth_field(rng, (h, w))
    illum = np.clip(illum, 0.4, None)

    amplitude = math.exp(rng.uniform(math.log(250.0), math.log(2000.0)))  # counts, brightness-1 nucleus
    autofluor = rng.uniform(40.0, 250.0) * (1.0 + 0.25 * _smooth_field(rng, (h, w), grid=5))
    expected = illum * (amplitude * optical + autofluor)
    offset = rng.uniform(90.0, 110.0)  # camera bias
    read_noise = rng.uniform(3.0, 12.0)
    counts = rng.poisson(np.clip(expected, 0.0, None).astype(np.float64)).astype(np.float32)
    counts += offset + read_noise * rng.standard_normal((h, w)).astype(np.float32)
    image = np.clip(np.rint(counts), 0, np.iinfo(np.uint16).max).astype(np.uint16)
    return image, labels


def _image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index`: independent of n, so image i is the same for any n."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def _visible_entries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []


def write_dataset(
    out_dir: str | Path,
    n: int = 32,
    size: int | tuple[int, int] = (256, 256),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write n synthetic pairs: ``out_dir/images/synth_0000.png`` (16-bit image) and
    ``out_dir/masks/synth_0000.png`` (16-bit instance labels).

    Deterministic: the same seed and size give byte-identical files, and image i does not
    depend on n. Refuses (CellsegError) to write into a non-empty images/ or masks/ folder
    unless `overwrite`; with `overwrite` the stale ``synth_*.png`` files of an earlier, larger
    run are removed too, and a folder holding other files (real data) is refused. Returns out_dir.
    """
    out_dir = Path(out_dir)
    h, w = _hw(size)
    if int(n) < 1:
        raise CellsegError(f"n {n}: need at least 1 image")
    n = int(n)
    if out_dir.exists() and not out_dir.is_dir():
        raise CellsegError(f"{out_dir}: exists and is not a folder")
    if (out_dir / "summary.json").is_file():  # an infer output or evaluate report folder: not a dataset's place
        raise CellsegError(f"{out_dir}: holds another command's summary.json (infer or evaluate output); choose another folder")
    img_dir, mask_dir = out_dir / "images", out_dir / "masks"
    for d in (img_dir, mask_dir):
        if d.exists() and not d.is_dir():
            raise CellsegError(f"{d}: exists and is not a folder")
        if not overwrite and _visible_entries(d):
            raise CellsegError(f"{d}: folder is not empty; --overwrite replaces an earlier synthetic dataset")
        foreign = [p for p in _visible_entries(d) if not _STEM_RE.match(p.name)] if d.is_dir() else []
        if foreign:
            raise CellsegError(f"{d}: holds files that are not synthetic ({foreign[0].name}); --overwrite replaces only "
                               "an earlier synthetic dataset, so choose another folder")
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)

    width = max(4, len(str(n - 1)))
    names = [f"synth_{i:0{width}d}.png" for i in range(n)]
    if overwrite:
        keep = set(names)
        for d in (img_dir, mask_dir):
            for p in _visible_entries(d):
                if p.is_file() and _STEM_RE.match(p.name) and p.name not in keep:
                    p.unlink()
    for i, name in enumerate(names):
        image, labels = synth_image(_image_rng(seed, i), (h, w))
        write_png(mask_dir / name, labels.astype(np.uint16))
        write_png(img_dir / name, image)
    return out_dir


def cache_dir() -> Path:
    """cellseg's cache folder: ``$CELLSEG_CACHE_DIR`` if set, else ``~/.cache/cellseg``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cellseg"


def _size_tag(size: int | tuple[int, int]) -> str:
    h, w = _hw(size)
    return str(h) if h == w else f"{h}x{w}"


def default_dataset_dir(n: int = 48, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """Where the cached synthetic dataset for (n, size, seed) lives (it may not exist yet)."""
    return cache_dir() / f"synth-n{int(n)}-s{_size_tag(size)}-seed{int(seed)}"


def _is_complete(root: Path, n: int) -> bool:
    """True when root holds exactly the n image/mask pairs write_dataset produces."""
    width = max(4, len(str(n - 1)))
    want = {f"synth_{i:0{width}d}.png" for i in range(n)}
    for d in (root / "images", root / "masks"):
        if not d.is_dir():
            return False
        if {p.name for p in _visible_entries(d)} != want:
            return False
    return True


def _remove_stale_tmp(parent: Path, prefix: str) -> None:
    """Delete temp folders of generations killed more than an hour ago."""
    now = time.time()
    for p in parent.glob(prefix + "*"):
        try:
            if p.is_dir() and now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def ensure_default_dataset(n: int = 48, size: int | tuple[int, int] = 256, seed: int = 0) -> Path:
    """The cached synthetic dataset for (n, size, seed), generated on first use; returns its folder.

    Generation writes into a temporary folder beside the final one and renames it into place,
    so an interrupted run never leaves a half dataset; an incomplete cached folder (files
    deleted by hand) is regenerated. Concurrent callers are safe: the first rename wins.
    """
    if int(n) < 1:
        raise CellsegError(f"n {n}: need at least 1 image")
    n = int(n)
    final = default_dataset_dir(n, size, seed)
    if _is_complete(final, n):
        return final
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CellsegError(f"{parent}: cannot create the cache folder ({exc}); set {CACHE_ENV} to a writable folder") from None
    prefix = f".{final.name}.tmp-"
    _remove_stale_tmp(parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cached dataset is ordinary data
        write_dataset(tmp, n=n, size=size, seed=seed)
        if final.exists() and not _is_complete(final, n):
            # broken leftover: move it aside first (rename is atomic), then delete it
            trash = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            try:
                os.replace(final, trash / "old")
            except FileNotFoundError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_complete(final, n):  # not a lost race with another process: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
