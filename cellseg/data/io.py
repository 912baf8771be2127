"""Reading microscopy images and masks, percentile normalisation, atomic writes."""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import tempfile
import threading
from contextlib import contextmanager, suppress
from pathlib import Path

import cv2
import numpy as np
import tifffile

from cellseg.errors import CellsegError

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


DATASET_PARTS = ("images", "masks")  # a training / evaluation dataset: DIR/images/<stem>.*, DIR/masks/<stem>.*


def is_dataset(folder: Path) -> bool:
    """True for a folder holding both images/ and masks/."""
    return all(os.path.isdir(folder / d) for d in DATASET_PARTS)


def dataset_part(folder: str | Path) -> tuple[Path, str] | None:
    """(dataset folder, 'images' or 'masks') when `folder` is the images/ or masks/ folder of a
    dataset (one beside the other), else None."""
    real = Path(os.path.realpath(folder))
    return (real.parent, real.name) if real.name in DATASET_PARTS and is_dataset(real.parent) else None


def is_image_file(path: str | Path) -> bool:
    """True when the file name has one of the extensions cellseg reads."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


_quiet_lock = threading.Lock()
_quiet_users = 0
_quiet_previous = None
_reading_tiff = threading.local()


class _QuietWhileReading(logging.Filter):
    """Drops tifffile's log records in a thread that is inside `_read_tiff`: a corrupt file is
    reported once, by cellseg, in one line (tifffile logs elsewhere are left alone)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_reading_tiff, "active", False)


logging.getLogger("tifffile").addFilter(_QuietWhileReading())


@contextmanager
def _opencv_quiet():
    """OpenCV's own warnings and errors off stderr: cellseg reports a bad file once, in one line.

    OpenCV's log level is process-wide: it is lowered while any thread is inside and put back
    by the last one out, so concurrent readers cannot leave it silenced.
    """
    global _quiet_users, _quiet_previous
    logging = cv2.utils.logging
    with _quiet_lock:
        if _quiet_users == 0:
            _quiet_previous = logging.getLogLevel()
            logging.setLogLevel(logging.LOG_LEVEL_SILENT)
        _quiet_users += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_users -= 1
            if _quiet_users == 0:
                logging.setLogLevel(_quiet_previous)


@contextmanager
def _tiff_quiet():
    """tifffile's log records dropped in this thread meanwhile (`_QuietWhileReading`)."""
    _reading_tiff.active = True
    try:
        yield
    finally:
        _reading_tiff.active = False


CHANNEL_HINT = "pick the nuclear stain with --channel K (or train with it: the model then reads it), or save it as its own 2-D image"


def _check_channel(channel: int, n: int, name) -> None:
    """CellsegError naming the file when an image of `n` channels has no channel `channel`."""
    if not 0 <= channel < n:
        raise CellsegError(f"{name}: channel {channel} (--channel, or the one the model was trained on): "
                           f"the image has {n} channels (0 to {n - 1})")


def pick_channel(arr: np.ndarray, axis: int, channel: int, name) -> np.ndarray:
    """Channel `channel` of `arr` along `axis` (`_check_channel` first)."""
    _check_channel(channel, arr.shape[axis], name)
    return np.take(arr, channel, axis=axis)


def _read_tiff(path: Path, channel: int | None = None, stains: bool = True) -> np.ndarray:
    """The TIFF's image. Refused: several images of different shapes (not cut to the first one), and
    stacks whose axes say planes (Z, T, ...), even 3 or 4 of them, which would look like colours.
    Channels (axis C of ImageJ / OME files, or the samples of a grey page: stains, not colours) are
    not averaged: `channel` picks one. A grey page's alpha samples are dropped (channels are then
    counted among the stains alone). `stains` False (masks):
    a grey page's samples are returned as stored."""
    with _tiff_quiet():
        return _read_tiff_series(path, channel, stains)


def _read_tiff_series(path: Path, channel: int | None = None, stains: bool = True) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series
        if not series:
            raise ValueError("no image data")
        if len(series) > 1:
            shapes = ", ".join("x".join(map(str, s.shape)) for s in series[:3]) + (", ..." if len(series) > 3 else "")
            raise CellsegError(
                f"{path}: multi-page TIFF holding {len(series)} images ({shapes}); save one 2-D image per file"
            )
        shape, axes = tuple(series[0].shape), series[0].axes
        # refused from the header, before a huge stack's pixels are read: planes of a stack (Z, T,
        # generic Q/I, ...) are never colours, even 3 or 4 of them
        if len(shape) == 3 and shape[0] > 1 and axes[0] not in "SC" and axes[-1] not in "SC":
            raise CellsegError(
                f"{path}: {shape[0]} planes of {shape[1]}x{shape[2]} "
                "(a stack or 3-D image); split it into single 2-D images first"
            )
        if len(shape) > 3:
            raise CellsegError(f"{path}: {len(shape)}-D image of shape {shape}; expected a 2-D grey or RGB image")
        c = axes.find("C")
        alpha = _grey_alpha_samples(series[0])
        if alpha is not None:  # a grey page with samples: stains (the grey one and extra ones), and any alpha
            s = axes.find("S")
            if alpha:  # transparency is no stain: dropped (grey + alpha is grey, as for a grey+alpha PNG)
                arr = np.delete(series[0].asarray(), alpha, axis=s)
                if arr.shape[s] == 1:
                    return arr.squeeze(axis=s)
                return _stain(path, arr, s, axes, channel) if stains else arr
            if stains and c < 0:
                c = s
        if len(shape) == 3 and c >= 0 and shape[c] > 1:
            return _stain(path, series[0], c, axes, channel)
        return series[0].asarray()


def _stain(path: Path, image, axis: int, axes: str, channel: int | None) -> np.ndarray:
    """Channel `channel` along `axis` of `image` (an array, or a tifffile series read only once the
    channel is known to exist); CellsegError naming the file when none or a missing one is asked for."""
    n = image.shape[axis]
    if channel is None:
        h, w = (side for i, side in enumerate(image.shape) if i != axis)
        raise CellsegError(f"{path}: {h}x{w} image with {n} channels ({axes}); {CHANNEL_HINT}")
    _check_channel(channel, n, path)  # from the header, before a series' pixels are read
    return np.take(image if isinstance(image, np.ndarray) else image.asarray(), channel, axis=axis)


def _grey_alpha_samples(series) -> list[int] | None:
    """For a grey (min-is-black/white) TIFF page with several samples, the positions of its alpha
    samples (often none: the samples are then stains, not colours); None for any other page."""
    page = series.keyframe
    if "S" not in series.axes or page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE):
        return None
    alpha = (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA)
    first_extra = page.samplesperpixel - len(page.extrasamples)  # extra samples come last
    return [first_extra + i for i, kind in enumerate(page.extrasamples) if kind in alpha]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_shape(source: str | Path | bytes) -> tuple[int, int] | None:
    """(height, width) of an image file (a path, or its bytes) read from its header alone, for
    checking that a huge image fits in memory before its pixels are decoded. TIFF and PNG only;
    None for other types and unreadable headers (reading the pixels then says what is wrong)."""
    data = None if isinstance(source, (str, os.PathLike)) else source
    try:
        if data is None:
            if not stat.S_ISREG(os.stat(source).st_mode):  # a FIFO or device would block the open
                return None
            with open(source, "rb") as f:
                head = f.read(24)
        else:
            head = bytes(data[:24])
        if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
            return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
        if head[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return None
        with _tiff_quiet(), tifffile.TiffFile(io.BytesIO(bytes(data)) if data is not None else source) as tif:
            series = tif.series
            if len(series) != 1:
                return None
            shape, axes = series[0].shape, series[0].axes
        if "Y" in axes and "X" in axes:
            return int(shape[axes.index("Y")]), int(shape[axes.index("X")])
    except Exception:  # noqa: BLE001  (a bad header is reported by the read that follows)
        return None
    return None


class _NamedBytes(io.BytesIO):
    """In-memory file bytes that format as the file's name (in the decoders' error messages)."""

    def __init__(self, data: bytes, name: str):
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


def _check_suffix(name: str | Path) -> str:
    suffix = Path(name).suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise CellsegError(
            f"{name}: unsupported file type '{suffix}' (expected one of {', '.join(IMAGE_EXTENSIONS)})"
        )
    return suffix


def _decode(source, suffix: str, name, channel: int | None = None, stains: bool = True) -> np.ndarray:
    """Pixels as stored from a path or a _NamedBytes, by file type (a TIFF's `channel` only, when it
    has stain channels); CellsegError on corrupt data."""
    try:
        if suffix in (".tif", ".tiff"):
            arr = _read_tiff(source, channel, stains)
        else:
            data = np.fromfile(source, dtype=np.uint8) if isinstance(source, Path) else np.frombuffer(source.getbuffer(), np.uint8)
            with _opencv_quiet():
                arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ValueError("not a decodable image")
            if arr.ndim == 3 and arr.shape[2] == 3:
                arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
            elif arr.ndim == 3 and arr.shape[2] == 4:
                arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    except CellsegError:
        raise
    except PermissionError:
        raise CellsegError(f"{name}: permission denied (cannot read the file)") from None
    except Exception as exc:  # decoders raise many types on corrupt files
        raise CellsegError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr)
    if arr.size == 0:
        raise CellsegError(f"{name}: image has no pixels")
    return arr


def read_pixels(path: str | Path, channel: int | None = None, stains: bool = True) -> np.ndarray:
    """Read pixels as stored (any dtype; colour channels kept; of a TIFF with stain channels, only
    `channel`; `stains` False: a grey TIFF page's samples as stored), raising CellsegError naming
    the file on failure."""
    path = Path(path)
    if not path.exists():
        raise CellsegError(f"{path}: {missing_reason(path)}")
    if path.is_dir():
        raise CellsegError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise CellsegError(f"{path}: empty file (0 bytes)")
    return _decode(path, _check_suffix(path), path, channel, stains)


def missing_reason(path: Path) -> str:
    """Why `path` does not exist as a file: 'no such file', 'broken link (to TARGET)', 'symbolic link
    loop' or 'permission denied' (a folder on its path cannot be searched)."""
    try:
        if not stat.S_ISLNK(os.lstat(path).st_mode):
            return "no such file"
    except PermissionError:
        return "permission denied (a folder on its path cannot be searched)"
    except OSError:
        return "no such file"
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
    return f"broken link (to {os.readlink(path)})"


def as_image(arr: np.ndarray, name, keep_integer: bool = False, channel: int | None = None) -> np.ndarray:
    """Pixels as stored (a decoded file, or an array) as `read_image` returns them: one (H, W) channel
    (`to_single_channel`), float32 unless `keep_integer`; CellsegError naming `name` for complex or
    non-finite values."""
    if np.iscomplexobj(arr):  # a cast to float would silently drop the imaginary part
        raise CellsegError(f"{name}: complex-valued image ({arr.dtype}); expected real intensities")
    img = to_single_channel(arr, name, channel)
    if keep_integer and img.dtype.kind in "ub" and img.dtype.itemsize <= 2:
        return img.astype(np.uint16 if img.dtype.itemsize == 2 else np.uint8, copy=False)
    with np.errstate(over="ignore"):  # float64 past float32's range turns infinite: named below
        small = img.astype(np.float32, copy=False)
    if not np.isfinite(small).all():
        if np.isfinite(img).all():
            raise CellsegError(f"{name}: values up to {np.abs(img).max():.3g}, beyond float32's range; rescale the image")
        raise CellsegError(f"{name}: image contains NaN or infinite values")
    return small


def decode_image(data: bytes, name: str | Path, channel: int | None = None, suffix: str | None = None) -> np.ndarray:
    """An image file's bytes as `read_image` reads the file; its type from `suffix` (".tif", ".png", ...)
    or else from the extension of `name`."""
    if len(data) == 0:
        raise CellsegError(f"{name}: empty file (0 bytes)")
    suffix = suffix or _check_suffix(name)
    return as_image(_decode(_NamedBytes(bytes(data), str(name)), suffix, name, channel), name, channel=channel)


def to_single_channel(arr: np.ndarray, path: str | Path = "<array>", channel: int | None = None) -> np.ndarray:
    """Reduce an image to (H, W).

    Grey images pass through; RGB(A) images (channels last, or channels first with 3/4 planes)
    become one plane by `colour_to_grey`, alpha dropped. With `channel`, a multi-channel image
    gives that channel instead (e.g. 2, the blue of an RGB image, for DAPI); grey images pass
    through. Other shapes are refused.
    """
    if channel is not None and arr.ndim == 3:
        if arr.shape[-1] < min(arr.shape[:2]):
            return pick_channel(arr, -1, channel, path)
        if arr.shape[0] < min(arr.shape[1:]):
            return pick_channel(arr, 0, channel, path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return colour_to_grey(arr[..., :3])
    # drop singleton plane axes ((1, H, W), (H, W, 1)) but never the image's own H or W
    while arr.ndim > 2 and (arr.shape[0] == 1 or arr.shape[-1] == 1):
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim == 2:
        return arr
    if arr.ndim == 3:
        if arr.shape[0] in (3, 4) and arr.shape[-1] > 4:
            return colour_to_grey(np.moveaxis(arr[:3], 0, -1))
        if arr.shape[-1] <= 4 < min(arr.shape[:2]):  # channels last, not colour: e.g. a 2-channel fluorescence TIFF
            raise CellsegError(
                f"{path}: {arr.shape[0]}x{arr.shape[1]} image with {arr.shape[-1]} channels; {CHANNEL_HINT}"
            )
        raise CellsegError(
            f"{path}: {arr.shape[0]} planes of {arr.shape[1]}x{arr.shape[2]} "
            "(a stack or 3-D image); split it into single 2-D images first"
        )
    raise CellsegError(f"{path}: {arr.ndim}-D image of shape {arr.shape}; expected a 2-D grey or RGB image")


def colour_to_grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W) plane of an (H, W, 3) colour image.

    Dark background (fluorescence): the mean of the channels, so a stain of any colour (pure blue
    DAPI) stays visible. Bright background (transmitted light: H&E, other stained tissue,
    brightfield): the darkest channel of each pixel, its largest absorbance whatever the stain's
    colour (the green of H&E's purple nuclei), where a mean dilutes the contrast with the channels
    the stain does not absorb. A grey image stored as RGB comes out the same either way.
    """
    if rgb.size and is_bright(normalize_percentile(_strided(rgb).astype(np.float32).mean(axis=-1))):
        return rgb.min(axis=-1)
    return rgb.astype(np.float32).mean(axis=-1)


def _strided(img: np.ndarray) -> np.ndarray:
    """A view of about 250 k pixels of `img`, evenly spaced (cheap statistics of huge images)."""
    step = max(1, int(np.sqrt(img.shape[0] * img.shape[1] / 250_000)))
    return img[::step, ::step]


def read_image(path: str | Path, keep_integer: bool = False, channel: int | None = None) -> np.ndarray:
    """Read an image file as one (H, W) channel, float32, raw intensities (not normalised).

    PNG/JPEG through OpenCV, TIFF (8/16/32-bit integer or float) through tifffile. With
    `keep_integer`, a grey 8/16-bit image stays uint8/uint16 (half or a quarter of the memory of
    float32: what `infer` keeps for the object table and the overlay of a huge image).
    Raises CellsegError naming the file when it is missing, empty, corrupt, not 2-D, or
    holds NaN/inf values.
    """
    path = Path(path)
    return as_image(read_pixels(path, channel), path, keep_integer, channel)


def normalize_percentile(img: np.ndarray, low: float = 1.0, high: float = 99.8, invert_bright: bool = False) -> np.ndarray:
    """Scale (H, W) intensities so the `low`/`high` percentiles map to 0/1; float32, not clipped.

    A flat image (high == low) becomes all zeros rather than dividing by zero. With
    `invert_bright`, a bright-background image is then inverted (`inverted_if_bright`).
    """
    return normalize_flagged(img, low, high, invert_bright)[0]


def normalize_flagged(img: np.ndarray, low: float = 1.0, high: float = 99.8, invert_bright: bool = False) -> tuple[np.ndarray, bool]:
    """(`normalize_percentile`'s image, whether it was inverted as bright-background)."""
    img = np.asarray(img, dtype=np.float32)
    lo, hi = percentile_range(img, low, high)
    norm = rescale_intensity(img, lo, hi)
    return norm, inverted_if_bright(norm, invert_bright)


def inverted_if_bright(norm: np.ndarray, enabled: bool = True) -> bool:
    """Turn a bright-background image (brightfield, H&E) into a dark-background one, in place.

    `norm` is a percentile-normalised image (background near 0 or near 1). When `enabled` and
    its median (taken on a strided sample, cheap on huge images) is above 0.5, it becomes
    1 - norm, so objects are always brighter than the background. Returns whether it inverted
    `norm`: inference picks the bright-background thresholds by it."""
    if enabled and is_bright(norm):
        invert(norm)
        return True
    return False


def invert(norm: np.ndarray) -> np.ndarray:
    """1 - norm, in place (a normalised bright-background image made dark-background); returns `norm`."""
    return np.subtract(1.0, norm, out=norm)


def is_bright(norm: np.ndarray) -> bool:
    """True for a bright-background image: the median of the percentile-normalised `norm` (taken
    on a strided sample, cheap on huge images) is above 0.5."""
    if norm.size == 0:
        return False
    return float(np.median(_strided(norm))) > 0.5


def percentile_range(img: np.ndarray, low: float = 1.0, high: float = 99.8) -> tuple[np.float64, np.float64]:
    """The `low`/`high` intensity percentiles that `normalize_percentile` maps to 0/1.

    8/16-bit images: from a histogram built band by band (the values of np.percentile's linear
    interpolation, with no full-size float copy); other images: np.percentile.
    """
    img = np.asarray(img)
    if img.dtype.kind not in "ub" or img.dtype.itemsize > 2 or img.size == 0:
        lo, hi = np.percentile(np.asarray(img, dtype=np.float32), [low, high])
        return lo, hi
    counts = np.zeros(1 << (8 * img.dtype.itemsize), np.int64)
    flat = img.reshape(-1)
    for i in range(0, flat.size, 1 << 22):
        counts += np.bincount(flat[i : i + (1 << 22)], minlength=counts.size)
    cum = np.cumsum(counts)
    out = []
    n = flat.size
    for q in (low, high):
        qq = np.float64(q) / 100
        pos = n * qq + (1 + qq * -1) - 1  # np.percentile's "linear" virtual index, in its operation order
        k = min(int(np.floor(pos)), n - 1)
        t = pos - k
        v0, v1 = (float(v) for v in np.searchsorted(cum, [k + 1, min(k + 2, n)]))  # values at sorted ranks k, k + 1
        d = v1 - v0
        out.append(np.float64(v1 - d * (1 - t) if t >= 0.5 else v0 + d * t))  # numpy's lerp
    return out[0], out[1]


def rescale_intensity(img: np.ndarray, lo, hi) -> np.ndarray:
    """(img - lo) / (hi - lo) as float32, zeros when hi - lo < 1e-6 (the second half of `normalize_percentile`).

    Computed in bands of rows, so a huge image costs its float32 result and no full-size
    float64 temporary (the values are those of the one-shot expression).
    """
    img = np.asarray(img)
    out = np.zeros(img.shape, np.float32)
    if hi - lo < 1e-6:  # a flat image (and any 0-d input)
        return out
    band = max(1, (1 << 21) // max(1, img[0].size))  # rows per band: ~2 M pixels
    for r0 in range(0, img.shape[0], band):
        out[r0 : r0 + band] = (img[r0 : r0 + band].astype(np.float32, copy=False) - lo) / (hi - lo)
    return out


def semantic_to_instances(mask: np.ndarray) -> np.ndarray:
    """3-class semantic mask (0 background, 1 cell, 2 edge) to instance labels (int32).

    Instances are the 4-connected components of the cell class; edge pixels are then given
    to the nearest instance so objects keep their full extent.
    """
    from scipy import ndimage as ndi

    interior = mask == 1
    labels, _ = ndi.label(interior)
    edge = mask == 2
    if edge.any() and labels.max() > 0:
        _, (iy, ix) = ndi.distance_transform_edt(labels == 0, return_indices=True)
        nearest = labels[iy, ix]
        labels = np.where(edge, nearest, labels)
    return labels.astype(np.int32)


def read_mask(path: str | Path, semantic: bool = False) -> np.ndarray:
    """Read a mask file as (H, W) int32 instance labels (0 background, 1..N objects).

    Instance masks may have any integer dtype. With `semantic=True` the file holds the
    3-class masks of the original method and is converted by connected components.
    Raises CellsegError for non-integer values, multi-channel masks or JPEG files (lossy).
    """
    path = Path(path)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        raise CellsegError(f"{path}: a JPEG mask: JPEG compression changes the labels (objects merge, split or appear); "
                           "save masks as PNG or TIFF")
    arr = read_pixels(path, stains=False)  # (a grey TIFF page with equal samples is a mask like an RGB one)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        # masks saved as RGB with identical channels are common; anything else is ambiguous
        if np.all(arr[..., 0:1] == arr[..., :3]):
            arr = arr[..., 0]
        else:
            raise CellsegError(f"{path}: colour mask; save instance labels as a single-channel image")
    while arr.ndim > 2 and (arr.shape[0] == 1 or arr.shape[-1] == 1):  # singleton planes, never H or W
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2:
        raise CellsegError(f"{path}: mask of shape {arr.shape}; expected a 2-D label image")
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
        if not np.isfinite(arr).all() or not np.all(arr == np.round(arr)):
            raise CellsegError(f"{path}: mask has non-integer values; expected integer instance labels")
    if arr.min() < 0:
        raise CellsegError(f"{path}: mask has negative labels")
    if arr.max() > np.iinfo(np.int32).max:  # ids past int32 (uint32/64 hashes): renumbered 1..N, not wrapped negative
        ids, inverse = np.unique(arr, return_inverse=True)
        arr = inverse.reshape(arr.shape) + (0 if ids[0] == 0 else 1)
    labels = arr.astype(np.int64)
    if semantic:
        if labels.max() > 2:
            raise CellsegError(f"{path}: semantic mask has values above 2 (expected 0 background, 1 cell, 2 edge)")
        return semantic_to_instances(labels)
    _refuse_binary(labels, path)
    _refuse_intensities(labels, path)
    return labels.astype(np.int32)


def _refuse_intensities(labels: np.ndarray, path) -> None:
    """CellsegError when the 'mask' is a micrograph: over 1% of its labelled pixels share their value
    with none of their 8 neighbours though other pixels have it (an object is a connected patch of one
    label, a diagonal line included, or a single pixel: none of DSB 2018's masks has such a pixel,
    while its images read as masks have 2% to 96%), as when the images/ and masks/ folders are swapped."""
    fg = labels > 0
    n_fg = int(np.count_nonzero(fg))
    if n_fg < 100:
        return
    same = np.zeros(labels.shape, bool)
    h, w = labels.shape
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # each pair of neighbours once, marked on both pixels
        first = (slice(0, h - dy), slice(0, w - dx) if dx >= 0 else slice(-dx, w))
        second = (slice(dy, h), slice(dx, w) if dx >= 0 else slice(0, w + dx))
        eq = labels[first] == labels[second]
        same[first] |= eq
        same[second] |= eq
    lonely = fg & ~same
    if np.count_nonzero(lonely) <= 0.01 * n_fg:
        return
    # a lonely pixel of a one-pixel object is that whole object (dots, masks downscaled a lot): only
    # those of labels with more pixels elsewhere are scattered grey values
    ids, areas = np.unique(labels[fg], return_counts=True)
    lonely = int(np.count_nonzero(areas[np.searchsorted(ids, labels[lonely])] > 1))
    if lonely > 0.01 * n_fg:
        raise CellsegError(
            f"{path}: {100 * lonely / n_fg:.0f}% of its labelled pixels have no neighbour of the same label: "
            "an intensity image, not instance labels (images/ and masks/ swapped?)"
        )


def _refuse_binary(labels: np.ndarray, path) -> None:
    """CellsegError when one label value covers three or more separate objects: a binary (0/255
    or 0/1) foreground mask, which would be read as a single object and score every image ~0, or
    a 3-class mask (0 background, 1 cell, 2 edge) read without --semantic-masks."""
    top = int(labels.max(initial=0))
    if top == 0:
        return
    low = int(labels[labels > 0].min())
    if low != top and (low, top) != (1, 2):  # several instance ids
        return
    from scipy import ndimage

    # 8-connected pieces of 16 px or more: an object cut by a thin line, or touching itself at a
    # corner, is at most 2 pieces; a binary mask of a field of nuclei has many
    blobs, _ = ndimage.label(labels == low, structure=np.ones((3, 3), bool))
    n = int(np.sum(np.bincount(blobs.ravel())[1:] >= 16))
    if n < 3:
        return
    if low != top:
        raise CellsegError(
            f"{path}: label 1 covers {n} separate objects and the only other label is 2: a 3-class mask "
            "(0 background, 1 cell, 2 edge), not instance labels; train on it with data.semantic_masks: true in the "
            "--config file, evaluate it with --semantic-masks"
        )
    raise CellsegError(
        f"{path}: one label ({top}) covers {n} separate objects: a binary mask, not instance labels; "
        "give each object its own value 1..N (e.g. scipy.ndimage.label)"
    )


def _file_mode() -> int:
    """Permissions of a newly created ordinary file: 0o666 less the process umask."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and put it back at once)
    os.umask(mask)
    return 0o666 & ~mask


def make_writable_folder(folder: str | Path) -> None:
    """Create `folder` (and its parents) and write a temporary file in it; OSError when either fails."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".cellseg-write-test.", dir=folder)
    os.close(fd)
    os.remove(probe)


def replaceable(path: str | Path) -> tuple[Path, int]:
    """(file to write, its mode) for replacing `path`: a symbolic link's target, with the existing
    file's permissions (new file: umask applied); CellsegError when the file is read-only."""
    given = Path(path)
    path = Path(os.path.realpath(given)) if given.is_symlink() else given
    mode = _file_mode()
    with suppress(FileNotFoundError):
        st = os.stat(path)
        if not st.st_mode & stat.S_IWUSR:
            raise CellsegError(f"{given}: is read-only (mode {stat.filemode(st.st_mode)}); not replaced")
        mode = stat.S_IMODE(st.st_mode)
    return path, mode


def atomic_write(path: str | Path, write_fn, in_place: bool = False) -> None:
    """Write a file by calling `write_fn(tmp_path)` then renaming, so no partial file is ever seen.

    The file gets the permissions of an ordinary new file (umask applied), not the owner-only
    mode of the temporary file; a symbolic link at `path` is replaced by the file (outputs never
    land outside their folder). With `in_place` (a model file the user names: tune, export,
    quantize), the file is updated as an editor would: a link's target is written, the file
    keeps its permissions, and a read-only file is refused (CellsegError, nothing written).
    """
    if in_place:
        path, mode = replaceable(path)
    else:
        path, mode = Path(path), _file_mode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_labels_tiff(path: str | Path, labels: np.ndarray) -> None:
    """Write instance labels as a compressed TIFF: uint16, or uint32 above 65535 objects."""
    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, labels.astype(dtype), compression="zlib"))


def write_png_bands(path: str | Path, height: int, width: int, bands, level: int = 1) -> None:
    """Write an 8-bit RGB PNG from an iterable of (rows, width, 3) uint8 bands, top to bottom,
    compressing as they come (memory: one band, however large the image), atomically.

    A plain PNG writer (zlib stream, filter type 0 on every row) for huge overlays; small images
    go through `write_png` (OpenCV).
    """
    import struct
    import zlib

    def chunk(f, kind: bytes, data: bytes) -> None:
        f.write(struct.pack(">I", len(data)) + kind + data)
        f.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    def _write(tmp: str) -> None:
        rows = 0
        comp = zlib.compressobj(level)
        with open(tmp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
            chunk(f, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            for band in bands:
                band = np.ascontiguousarray(band, dtype=np.uint8)
                if band.ndim != 3 or band.shape[1:] != (width, 3):
                    raise CellsegError(f"{path}: PNG band of shape {band.shape}, expected (rows, {width}, 3)")
                raw = np.zeros((band.shape[0], 1 + 3 * width), np.uint8)  # a leading 0: no filter
                raw[:, 1:] = band.reshape(band.shape[0], -1)
                data = comp.compress(raw.tobytes())
                if data:
                    chunk(f, b"IDAT", data)
                rows += band.shape[0]
            if rows != height:
                raise CellsegError(f"{path}: {rows} PNG rows written, expected {height}")
            chunk(f, b"IDAT", comp.flush())
            chunk(f, b"IEND", b"")

    atomic_write(path, _write)


def write_png(path: str | Path, img: np.ndarray, bgr: bool = False) -> None:
    """Write a uint8/uint16 grey or colour (channels-last, RGB order; BGR with `bgr`) image as PNG, atomically.

    A BGR input is encoded as is (no converted copy: a 100-megapixel overlay is 300 MB).
    """
    arr = img
    if arr.ndim == 3 and arr.shape[2] == 3 and not bgr:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)

    def _write(tmp: str) -> None:
        with _opencv_quiet():
            ok, buf = cv2.imencode(".png", arr)
        if not ok:
            raise CellsegError(f"{path}: could not encode PNG")
        buf.tofile(tmp)

    atomic_write(path, _write)
