"""Folder-level segmentation (`cellseg infer`): images in, label TIFFs, overlays, object tables out.

`segment_folder(model, inp, out_dir, opts)` segments one image file or every image of a folder
(PNG/TIFF/JPEG; `recursive` descends into sub-folders) and returns an `InferSummary`, also
written as `summary.json` in the output folder. The caller (the CLI) decides the exit code from
`summary.failed`.

Layout. The output folder defaults to `default_output_dir(inp)`: `DIR_cellseg/` beside a folder
`DIR`, and `<stem>_cellseg/` beside a single file `<parent>/<stem>.png` (next to the file, not
next to its folder, so segmenting a file of the current folder never writes outside it). For each
image, with `<rel>` its folder relative to the input folder (recursive runs keep the structure):

    <out>/<rel>/<stem>_probs.tif     optional: (3, H, W) float16 probabilities [background, interior, boundary]
    <out>/<rel>/<stem>_objects.csv   label, area, centroid_y, centroid_x, bbox_y0, bbox_x0, bbox_y1, bbox_x1
                                     (y1/x1 exclusive, like slices), mean_intensity (raw image)
    <out>/<rel>/<stem>_overlay.png   object contours on the percentile-normalised image
    <out>/<rel>/<stem>_masks.tif     instance labels, uint16 (uint32 above 65535 objects); written LAST
    <out>/summary.json               the run's InferSummary

Every file is written atomically (temporary file + rename) and the masks TIFF last, so a masks
file's presence means its image is complete: `skip_existing` skips those images and redoes the
others. Without `overwrite`/`skip_existing`, any existing output of the run is refused before work.

Safety of names. Output paths are built from the image's path *relative to the input root*
(lexically, so symlinked files keep their link name); a path outside the root is refused, each
component is neutralised (path separators, NUL/control characters, "."/".." and leading dots
become "_", so no output is hidden or can be mistaken for a temporary file), and the real
location of each output folder is checked to lie inside the output folder before anything is
written (a symlinked sub-folder in the output cannot redirect writes). Two images that would share
outputs (`a.png` and `a.tif`) keep their extension in the output stem (`a.png_masks.tif`).

Inputs: hidden files/folders and files without an image extension are ignored; symlinked
folders are not descended (no loops); a file with an image extension that cannot be read
(corrupt, empty, NaN TIFF, 3-D stack, broken symlink) is reported in `failed` with the reason and
the others are processed. The output folder's own results (and other cellseg output folders,
recognised by their summary.json) are never taken as inputs.

Throughput: a background thread reads and normalises up to `prefetch` images ahead; tiles of
several images share model batches (`predict_many`); post-processing and writing run in a small
thread pool. Memory is bounded by the tile batch, the prefetch queue and the pool's backlog,
not by the number of images.
"""

from __future__ import annotations

import csv
import io
import json
import os
import queue
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

import numpy as np
import tifffile
from scipy import ndimage

from cellseg.data.io import (
    IMAGE_EXTENSIONS,
    atomic_write,
    dataset_part,
    is_dataset,
    inverted_if_bright,
    is_image_file,
    percentile_range,
    rescale_intensity,
    read_image,
    write_labels_tiff,
    write_png,
    make_writable_folder,
    image_shape,
    missing_reason,
    write_png_bands,
)
from cellseg.errors import CellsegError
from cellseg.resources import check_fits
from cellseg.defaults import DEFAULT_BATCH, DEFAULT_TILE

SUMMARY_NAME = "summary.json"
SUMMARY_FORMAT = "cellseg.infer/1"
OUTPUT_DIR_SUFFIX = "_cellseg"
SUFFIXES = {"masks": "_masks.tif", "probs": "_probs.tif", "overlay": "_overlay.png", "csv": "_objects.csv"}
CSV_COLUMNS = ("label", "area", "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "mean_intensity")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")  # separators (either OS) and control characters


@dataclass
class InferOptions:
    """Settings of a folder run (the `cellseg infer` options)."""

    tile: int = DEFAULT_TILE  # largest tile side in px (rounded up to the model's size multiple)
    overlap: float = 0.125  # fraction of a tile shared with its neighbours
    batch_size: int = DEFAULT_BATCH  # tiles per model call, across images
    recursive: bool = False  # descend into sub-folders (the structure is kept in the output)
    save_probs: bool = False  # also write <stem>_probs.tif
    overlay: bool = True  # write <stem>_overlay.png
    csv: bool = True  # write <stem>_objects.csv
    overwrite: bool = False  # replace existing outputs
    skip_existing: bool = False  # skip images whose <stem>_masks.tif exists
    prefetch: int = 2  # images decoded ahead in a background thread (0: read inline)
    workers: int = 2  # threads post-processing and writing results
    interior_threshold: float | None = None  # None: the model's tuned value (or 0.5)
    foreground_threshold: float | None = None  # None: the model's tuned value (or 0.5)
    min_size: int | None = None  # smallest object kept, px; None: the model's tuned value (or 10)
    min_score: float | None = None  # objects of lower mean foreground probability dropped; None: the model's tuned value (or 0)
    channel: int | None = None  # of multi-channel images, segment this one (None: the model's own, else RGB made grey and stain channels refused)

    def postprocess_for(self, model, bright: bool = False) -> dict:
        """Post-processing options: those stored in `model` (for a bright-background image with
        `bright`), then these options where given."""
        from cellseg.postprocess import model_postprocess

        overrides = {"interior_threshold": self.interior_threshold, "foreground_threshold": self.foreground_threshold,
                     "min_size": self.min_size, "min_score": self.min_score}
        return model_postprocess(model, overrides, bright=bright)

    def validate(self) -> None:
        """CellsegError naming the first option out of range."""
        if self.tile < 1:
            raise CellsegError(f"--tile {self.tile}: expected a positive number of pixels")
        if not 0.0 <= self.overlap < 1.0:
            raise CellsegError(f"--overlap {self.overlap}: expected 0 <= overlap < 1")
        if self.batch_size < 1:
            raise CellsegError(f"--batch-size {self.batch_size}: expected 1 or more")
        if self.prefetch < 0:
            raise CellsegError(f"--prefetch {self.prefetch}: expected 0 or more")
        for name in ("interior_threshold", "foreground_threshold", "min_score"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise CellsegError(f"--{name.replace('_', '-')} {value}: expected a number in [0, 1]")
        if self.min_size is not None and self.min_size < 0:
            raise CellsegError(f"--min-size {self.min_size}: expected 0 or more pixels")
        if self.channel is not None and self.channel < 0:
            raise CellsegError(f"--channel {self.channel}: expected 0 or more (the first channel is 0)")


@dataclass
class InferSummary:
    """What a run did; `to_dict()` is the content of summary.json."""

    processed: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input path, reason)
    objects: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    megapixels: float = 0.0
    megapixels_per_s: float = 0.0
    model: str = ""
    provider: str = ""
    run_id: str | None = None
    input: str = ""
    output: str = ""
    tile: int = DEFAULT_TILE  # image px (with scale != 1: the model's tile side / scale)
    overlap: float = 0.125
    batch_size: int = DEFAULT_BATCH
    recursive: bool = False
    tta: bool = False  # test-time flips (`--tta`)
    scale: float = 1.0  # zoom of the images for the model (`--scale`)
    channel: int | None = None  # the channel segmented of multi-channel images (`--channel`, else the one the model was trained on)
    postprocess: dict[str, Any] = field(default_factory=dict)  # the post-processing options used
    postprocess_bright: dict[str, Any] = field(default_factory=dict)  # those for images inverted as bright-background
    # per image with outputs here: input (absolute), masks (relative to output), height, width, objects (this run's; with
    # skip_existing also those of the images skipped: see `skipped_entry`)
    images: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no image failed."""
        return not self.failed

    def finalize(self, seconds: float) -> None:
        """Set the run time and the rates derived from it; sort images and failures for stable output."""
        self.seconds = round(seconds, 3)
        self.images.sort(key=lambda r: r["input"])
        self.failed.sort()
        secs = max(self.seconds, 1e-9)
        self.images_per_s = round(self.processed / secs, 3)
        self.megapixels_per_s = round(self.megapixels / secs, 3)
        self.megapixels = round(self.megapixels, 3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed"] = [{"path": str(_abs(p)), "reason": r} for p, r in self.failed]  # absolute, as the images' inputs
        return {"format": SUMMARY_FORMAT, "finished": True, **d}  # (False: the provisional one, see mark_output_folder)


# ------------------------------------------------------------------------------------------ inputs


def _abs(path: str | Path) -> Path:
    """Absolute, lexically normalised path (symlinks kept, '..' folded)."""
    return Path(os.path.abspath(path))


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _infer_summary(folder: Path) -> dict | None:
    """The cellseg infer summary.json of `folder` (None when absent, unreadable or another file)."""
    try:
        with open(folder / SUMMARY_NAME, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == SUMMARY_FORMAT else None


def _enclosing_output_folder(folder: Path) -> Path | None:
    """The nearest folder above `folder` that holds a cellseg infer summary.json, if any."""
    for parent in Path(os.path.abspath(folder)).parents:
        if _is_output_folder(parent):
            return parent
    return None


def _is_output_folder(path: Path) -> bool:
    """True for a folder holding a cellseg infer summary.json (a previous run's output)."""
    return _infer_summary(path) is not None


def _under(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([path, root]) == str(root)
    except ValueError:  # different drives
        return False


RAY_ONLY = "; globs and lists of paths are read by --engine ray, the local engine takes one image or a folder"


def missing_input(inp: str | Path) -> str:
    """The error for an input path that does not exist (a glob: say which engine reads globs)."""
    return f"{inp}: no such file or folder" + (RAY_ONLY if any(c in str(inp) for c in "*?[") else "")


def collect_inputs(inp: str | Path, recursive: bool = False, out_dir: str | Path | None = None,
                   unlisted: list[tuple[Path, str]] | None = None) -> list[Path]:
    """The image files to segment, sorted by path.

    inp: an image file (returned alone) or a folder. In a folder, hidden files and folders and
    files without an image extension are ignored; broken symlinks with an image extension are
    kept (they fail when read, and are reported). `recursive` descends into sub-folders (not
    through symlinked folders). Results (*_masks.tif, ...) in `out_dir` and in the output folders
    of earlier runs (those holding their summary.json) are excluded; other images there are
    kept. The masks/ folder of a dataset (beside its images/) holds labels, not images: not searched,
    and refused as `inp`. Raises CellsegError for a missing path, a non-image file, or a folder without images.
    A sub-folder that cannot be listed (e.g. a root-owned lost+found) is appended to `unlisted` as
    (folder, reason), to be reported as failed, or, without that list, raises CellsegError.
    """
    inp = Path(inp)
    if not os.path.lexists(inp):
        raise CellsegError(missing_input(inp))
    if not inp.is_dir():
        if not inp.exists():
            raise CellsegError(f"{inp}: {missing_reason(inp)}")
        if not is_image_file(inp):
            listing = inp.suffix.lower() in (".txt", ".lst", ".list", ".csv")
            raise CellsegError(f"{inp}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})" + (RAY_ONLY if listing else ""))
        return [inp]
    part = dataset_part(inp)
    if part is not None and part[1] == "masks":  # label images segmented as if they were micrographs
        raise CellsegError(f"{inp}: is the masks/ folder of the dataset {part[0]} (labels, not images); "
                           f"segment its images/ folder, or score the model on it with cellseg evaluate {part[0]}")
    out_real = Path(os.path.realpath(out_dir)) if out_dir is not None else None
    # folders whose *_masks.tif etc. are results, not inputs: the output folder, and those of
    # earlier runs (noted while searching; the input folder itself after `-o` the input folder)
    result_trees = [out_real] if out_real is not None else []

    def note_results(d: Path) -> None:
        """An earlier run's output folder is searched (it may be an image folder that was given
        as -o), but its results are not taken as inputs."""
        if _is_output_folder(d):
            result_trees.append(Path(os.path.realpath(d)))

    def keep_file(folder: Path, name: str) -> bool:
        if _is_hidden(name) or not is_image_file(name) or os.path.isdir(folder / name):
            return False
        # our own results, when the output folder is (inside) the input folder
        if any(name.endswith(s) for s in SUFFIXES.values()):
            real = Path(os.path.realpath(folder))
            if any(_under(real, t) for t in result_trees):
                return False
        return True

    found: list[Path] = []
    if recursive:
        def unlistable(exc: OSError) -> None:  # a sub-folder whose images would be silently missing
            reason = f"cannot list the folder ({exc.strerror or exc}); its images are left out"
            if unlisted is None or os.path.abspath(exc.filename) == os.path.abspath(inp):
                raise CellsegError(f"{exc.filename}: {reason}") from None
            unlisted.append((Path(exc.filename), reason))

        for root, dirs, files in os.walk(inp, onerror=unlistable, followlinks=False):
            rootp = Path(root)
            note_results(rootp)
            labels = "masks" if is_dataset(rootp) else None
            dirs[:] = sorted(d for d in dirs if not _is_hidden(d) and d != labels)
            found.extend(rootp / f for f in files if keep_file(rootp, f))
    else:
        note_results(inp)
        try:
            names = os.listdir(inp)
        except OSError as exc:
            raise CellsegError(f"{inp}: cannot list the folder ({exc.strerror or exc})") from None
        found = [inp / n for n in names if keep_file(inp, n)]
    if not found:
        hint = "; use --recursive to search its sub-folders" if not recursive and _has_subfolders(inp) else ""
        if not recursive and is_dataset(inp):
            hint = f"; it is a dataset: segment {inp / 'images'}, or score it with cellseg evaluate {inp}"
        raise CellsegError(f"{inp}: no images ({', '.join(IMAGE_EXTENSIONS)}) found{hint}")
    return sorted(found, key=lambda p: p.relative_to(inp).parts)


def _has_subfolders(d: Path) -> bool:
    try:
        return any(e.is_dir() and not _is_hidden(e.name) for e in os.scandir(d))
    except OSError:
        return False


def default_output_dir(inp: str | Path) -> Path:
    """Where results go when no output folder is given.

    A folder DIR -> DIR_cellseg/ beside it (never inside the input). A file <parent>/<stem>.ext ->
    <parent>/<stem>_cellseg/ beside the file. Returned absolute.
    """
    p = _abs(inp)
    if p.is_dir():
        return p.parent / f"{p.name or 'root'}{OUTPUT_DIR_SUFFIX}"
    return p.parent / f"{_safe_component(p.stem)}{OUTPUT_DIR_SUFFIX}"


# ----------------------------------------------------------------------------------------- outputs


def _safe_component(name: str) -> str:
    """One path component that cannot be '.', '..', hidden, empty or contain a separator."""
    name = _UNSAFE.sub("_", name)
    stripped = name.lstrip(".")
    name = "_" * (len(name) - len(stripped)) + stripped
    return name or "_"


def _relative_parts(inp_root: Path, image_path: Path) -> tuple[str, ...]:
    """The image's path components relative to the input root (its name alone for a file input)."""
    root, img = _abs(inp_root), _abs(image_path)
    if root == img:
        return (img.name,)
    rel = os.path.relpath(img, root)
    parts = Path(rel).parts
    if Path(rel).is_absolute() or not parts or parts[0] == os.pardir:
        raise CellsegError(f"{image_path}: not inside the input folder {inp_root}")
    return parts


def output_paths(inp_root: str | Path, image_path: str | Path, out_dir: str | Path, stem: str | None = None) -> dict[str, Path]:
    """The output files of one image: keys masks, probs, overlay, csv (see the module doc).

    inp_root: the input given to the run (folder, or the file itself). The image's folder
    relative to it is kept; `stem` (default: the image's stem) names the files. Every component is
    neutralised, and the result always lies lexically inside `out_dir`; an image outside
    `inp_root` raises CellsegError.
    """
    out = _abs(out_dir)
    parts = _relative_parts(Path(inp_root), Path(image_path))
    folder = out.joinpath(*(_safe_component(p) for p in parts[:-1]))
    base = _safe_component(stem if stem is not None else Path(parts[-1]).stem)
    paths = {k: folder / f"{base}{suffix}" for k, suffix in SUFFIXES.items()}
    for p in paths.values():  # defence in depth: cannot happen after _safe_component
        if not _under(_abs(p), out) or _abs(p) == out:
            raise CellsegError(f"{image_path}: output {p} would leave the output folder {out}")
    return paths


def plan_outputs(inp_root: str | Path, images: list[Path], out_dir: str | Path) -> list[dict[str, Path]]:
    """output_paths for every image, made unique: images whose outputs would coincide (a.png and
    a.tif, or names equal after neutralising or up to case) keep their extension in the stem
    (a.png_masks.tif), and a '~N' counter is added if that still collides."""
    rel = [_relative_parts(Path(inp_root), Path(p)) for p in images]

    def key(parts: tuple[str, ...], stem: str) -> tuple[str, ...]:
        return tuple(_safe_component(c).lower() for c in (*parts[:-1], stem))

    stems = [Path(r[-1]).stem for r in rel]
    counts: dict[tuple[str, ...], int] = {}
    for r, s in zip(rel, stems):
        counts[key(r, s)] = counts.get(key(r, s), 0) + 1
    stems = [r[-1] if counts[key(r, s)] > 1 else s for r, s in zip(rel, stems)]
    used: set[tuple[str, ...]] = set()
    plans = []
    for img, r, s in zip(images, rel, stems):
        stem, n = s, 1
        while key(r, stem) in used:
            n += 1
            stem = f"{s}~{n}"
        used.add(key(r, stem))
        plans.append(output_paths(inp_root, img, out_dir, stem=stem))
    return plans


def check_output_folder(out: Path, create: bool = True) -> None:
    """Create the output folder and write a temporary file in it, or raise CellsegError. With
    `create` False nothing is created: the folder, or the nearest existing parent that would hold
    it, must be a writable folder."""
    if out.exists() and not out.is_dir():
        raise CellsegError(f"{out}: is a file, not a folder; choose another output folder")
    part = dataset_part(out)
    if part is not None:  # a *_masks.tif there would be a mask without an image, an overlay an image without a mask
        raise CellsegError(f"{out}: is the {part[1]}/ folder of the dataset {part[0]}; outputs there would break its "
                           "images/ and masks/ pairs: choose another output folder")
    if not out.exists() and out.suffix.lower() in IMAGE_EXTENSIONS:
        raise CellsegError(f"{out}: the output is a folder (several files per image), not an image file; drop the {out.suffix}")
    if not create:
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise CellsegError(f"{out}: output folder is not writable ({existing} is {'a file' if not existing.is_dir() else 'read-only'})")
        return
    try:
        make_writable_folder(out)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CellsegError(f"{out}: output folder is not writable ({reason})") from None


@dataclass
class EarlierRun:
    """What an output folder's summary.json says of the run that wrote it (`earlier_run`)."""

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # masks path (relative to the folder): entry
    failed: set[str] = field(default_factory=set)  # real paths of the inputs that failed
    # a run that stopped (provisional summary): {masks path: input} of the images it set out to segment,
    # and when it started (the summary's mtime, ns); None for a finished run, no summary, or one that predates the list
    pending: dict[str, str] | None = None
    started_ns: int = 0
    finished: bool = False  # a finished run's summary: the masks it does not list are no result of it


def earlier_run(summary_path: Path, replace: bool = False) -> EarlierRun:
    """The earlier infer run of a folder, from its summary.json (empty when none). CellsegError when
    that file is another command's (e.g. an evaluate report's), or unreadable unless `replace`
    (--overwrite) is set."""
    if not summary_path.is_file():
        return EarlierRun()
    try:
        data = json.loads(summary_path.read_text(encoding="utf-8"))
        started_ns = summary_path.stat().st_mtime_ns
    except (OSError, ValueError) as exc:
        if replace:
            return EarlierRun()
        raise CellsegError(f"{summary_path}: unreadable summary.json ({type(exc).__name__}); use --overwrite to replace it") from None
    if not isinstance(data, dict) or data.get("format") != SUMMARY_FORMAT:
        raise CellsegError(f"{summary_path}: not a cellseg infer summary (an evaluate report?); choose another output folder")
    images, failed, pending = data.get("images"), data.get("failed"), data.get("pending")
    entries = {e["masks"]: e for e in (images if isinstance(images, list) else []) if isinstance(e, dict) and isinstance(e.get("masks"), str)}
    failed_inputs = {os.path.realpath(f["path"]) for f in (failed if isinstance(failed, list) else [])
                     if isinstance(f, dict) and isinstance(f.get("path"), str)}
    if data.get("finished") is not False:
        return EarlierRun(entries, failed_inputs, finished=True)
    if not isinstance(pending, list):
        return EarlierRun(entries, failed_inputs)
    todo = {e["masks"]: e["input"] for e in pending
            if isinstance(e, dict) and isinstance(e.get("masks"), str) and isinstance(e.get("input"), str)}
    return EarlierRun(entries, failed_inputs, todo, started_ns)


def skipped_entry(image: Path, masks: Path, out: Path, earlier: EarlierRun) -> dict[str, Any] | None:
    """The summary entry of an image skipped by --skip-existing: the earlier summary's; for a run
    that stopped, one read back from the label TIFF if that run wrote it (one of its images, made
    after it started); with no summary at all, one read back from the label TIFF. None when the
    file is not such a readable label image, or is one a finished run's summary does not list
    (left by an older run with other settings): the image is then segmented again."""
    rel = str(masks.relative_to(out))
    if rel in earlier.entries:  # trusted (label TIFFs are written atomically); input named as given now, absolute
        made_from = earlier.entries[rel].get("input")
        if not isinstance(made_from, str) or os.path.realpath(made_from) != os.path.realpath(image):
            return None  # made from another file of that name (another folder): segment this one
        return {**earlier.entries[rel], "input": str(_abs(image))}
    if earlier.finished:
        return None
    if earlier.pending is not None:  # a stopped run: only what it wrote (not what it was replacing) is its result
        made_from = earlier.pending.get(rel)
        if made_from is None or os.path.realpath(made_from) != os.path.realpath(image):
            return None
        try:
            if masks.stat().st_mtime_ns < earlier.started_ns:
                return None  # older than that run: an earlier run's result it had not replaced yet
        except OSError:
            return None
    try:
        labels = tifffile.imread(masks)
    except (OSError, ValueError):  # damaged (TiffFileError is a ValueError): segment it again
        return None
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        return None
    h, w = labels.shape
    return {"input": str(_abs(image)), "masks": rel, "height": h, "width": w, "objects": int(labels.max(initial=0))}


def plan_work(images: list[Path], plans: list[dict[str, Path]], out: Path, opts: InferOptions,
              extra_outputs: tuple[Path, ...] = ()) -> tuple[list[int], list[int], list[dict[str, Any]]]:
    """(indices of the images to segment, indices skipped, the skipped images' summary entries),
    for both engines. With --skip-existing an image with a readable result is skipped; without
    --overwrite or --skip-existing, any output to be written (or `extra_outputs`) that exists
    already is refused (CellsegError) before any work."""
    earlier = earlier_run(out / SUMMARY_NAME, replace=opts.overwrite)  # refuses another command's summary.json
    todo: list[int] = []
    skipped: list[int] = []
    kept: list[dict[str, Any]] = []
    for i, (img, paths) in enumerate(zip(images, plans)):
        # (an image that failed last time keeps the masks of an earlier success: they are stale, redo it)
        entry = None
        if opts.skip_existing and paths["masks"].is_file() and os.path.realpath(img) not in earlier.failed:
            entry = skipped_entry(img, paths["masks"], out, earlier)
        if entry is None:
            todo.append(i)
        else:
            skipped.append(i)
            kept.append(entry)
    if not opts.overwrite and not opts.skip_existing:
        candidates = [plans[i][k] for i in todo for k in _wanted(opts)] + summary_conflict(out) + list(extra_outputs)
        conflict = next((p for p in candidates if os.path.lexists(p)), None)
        if conflict is not None:
            raise CellsegError(
                f"{conflict}: output already exists; use --overwrite to replace existing outputs "
                "or --skip-existing to segment only the images without a _masks.tif"
            )
    return todo, skipped, kept


SETTING_KEYS = ("model", "run_id", "tta", "scale", "channel", "postprocess", "postprocess_bright")  # what makes the masks


def settings_of(summary: InferSummary) -> dict[str, Any]:
    """The settings of a run that decide its masks, as summary.json records them."""
    return json.loads(json.dumps({k: getattr(summary, k) for k in SETTING_KEYS}))


def check_same_settings(out: Path, settings: dict[str, Any], skipped: int) -> None:
    """--skip-existing keeps `skipped` earlier results: refuse (CellsegError, before anything is
    written) when the earlier run of this folder made them with other settings (another model,
    thresholds, flips or zoom), which one summary.json would then misreport."""
    earlier = _infer_summary(out) if skipped else None
    if earlier is None:
        if skipped and (outer := _enclosing_output_folder(out)) is not None:
            raise CellsegError(f"{out}: inside {outer}, the output folder of an earlier run, without a {SUMMARY_NAME} of its own: "
                               f"--skip-existing cannot tell how its masks were made; rerun with -o {outer} on that run's input, "
                               "or use --overwrite")
        return
    before = earlier.get("settings") if earlier.get("finished") is False else {k: earlier[k] for k in SETTING_KEYS if k in earlier}
    if not isinstance(before, dict):
        return
    from cellseg.postprocess import effective_postprocess

    def effective(values: dict) -> dict:  # an option left out and one given at its default make the same masks
        return {k: effective_postprocess(v) if k in ("postprocess", "postprocess_bright") and isinstance(v, dict) else v
                for k, v in values.items()}

    before, settings = effective(before), effective(settings)

    def same(key: str) -> bool:
        old, new = before[key], settings[key]
        if key == "model" and isinstance(old, str) and old != new:  # one file named two ways
            try:
                return Path(old).is_file() and Path(old).resolve() == Path(new).resolve()
            except OSError:
                return False
        return old == new

    def diffs(key: str) -> list[str]:
        old, new = before[key], settings[key]
        if isinstance(old, dict) and isinstance(new, dict):  # thresholds: name each one that changed
            return [f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
        return [f"{key} {old} -> {new}"]

    changed: list[str] = []
    for key in (k for k in SETTING_KEYS if k in before and not same(k)):
        changed += [d + (" (bright-background images)" if key == "postprocess_bright" else "") for d in diffs(key)
                    if key != "postprocess_bright" or d not in changed]
    if changed:
        raise CellsegError(f"{out / SUMMARY_NAME}: its images were segmented with other settings ({'; '.join(changed)}); "
                           "--skip-existing would mix both in one folder: use the same settings, --overwrite, or another output folder")


def mark_output_folder(out: Path, entries: list[dict[str, Any]], settings: dict[str, Any] | None = None,
                       pending: list[dict[str, str]] | None = None) -> None:
    """Before the first result is written: a provisional summary.json (`finished: false`) listing
    `entries`, the results known to stay valid (the skipped images'), this run's `settings`
    (`settings_of`) and the images it is to segment (`pending`: input and masks path, see
    `pending_entries`). The folder of a run that never finishes is so still known as an output folder
    (a later `infer PARENT -r` does not take its results as inputs), no earlier summary's
    entries outlive the results this run replaces, and a later --skip-existing keeps only the
    masks this run wrote, not older ones it had yet to replace. The final summary replaces it."""
    text = json.dumps({"format": SUMMARY_FORMAT, "finished": False, "images": entries,
                       **({"settings": settings} if settings is not None else {}),
                       **({"pending": pending} if pending is not None else {})}, indent=2)
    _remove_stale_temps(out / SUMMARY_NAME)
    atomic_write(out / SUMMARY_NAME, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def pending_entries(images: list[Path], plans: list[dict[str, Path]], out: Path, todo: list[int]) -> list[dict[str, str]]:
    """[{input (absolute), masks (relative to `out`)}] of the images a run is about to segment."""
    return [{"input": str(_abs(images[i])), "masks": str(plans[i]["masks"].relative_to(out))} for i in todo]


def summary_conflict(out: Path) -> list[Path]:
    """[out/summary.json] when it would be a conflict for a new run: any summary but a provisional
    one (a run that stopped; its results, if any, conflict on their own)."""
    path = out / SUMMARY_NAME
    if not os.path.lexists(path):
        return []
    provisional = (_infer_summary(out) or {}).get("finished") is False
    return [] if provisional else [path]


def _wanted(opts: InferOptions) -> list[str]:
    """Output kinds written, in writing order (masks last: its presence marks a complete image)."""
    kinds = ["probs"] if opts.save_probs else []
    kinds += ["csv"] if opts.csv else []
    kinds += ["overlay"] if opts.overlay else []
    return kinds + ["masks"]


def missing_outputs(summary: InferSummary, opts: InferOptions) -> list[str]:
    """Output kinds asked for (e.g. '_probs.tif') that some image listed in the summary lacks: with
    --skip-existing, images skipped from a run that wrote fewer kinds keep their results as they are."""
    out = Path(summary.output)
    wanted = [SUFFIXES[k] for k in _wanted(opts) if k != "masks"]
    stems = [str(e["masks"])[: -len(SUFFIXES["masks"])] for e in summary.images if str(e.get("masks", "")).endswith(SUFFIXES["masks"])]
    return [suffix for suffix in wanted if any(not (out / (stem + suffix)).exists() for stem in stems)]


def object_table(labels: np.ndarray, raw: np.ndarray) -> dict[str, np.ndarray]:
    """Per-object measurements of a label image, vectorised (bincount + find_objects).

    Returns columns CSV_COLUMNS for every label present (ids in increasing order): area (px),
    centroid (y, x) in px, bounding box [y0, y1) x [x0, x1), mean of `raw` over the object.
    """
    lab = np.asarray(labels)
    n = int(lab.max(initial=0))
    h, w = lab.shape
    raw = np.asarray(raw)
    area = np.zeros(n + 1, np.int64)
    sy, sx, si = (np.zeros(n + 1) for _ in range(3))
    step = max(1, (1 << 22) // max(w, 1))  # rows per chunk: coordinate arrays of ~4 M pixels
    xx = np.tile(np.arange(w, dtype=np.float64), step)
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        block = lab[r0:r1].ravel().astype(np.intp, copy=False)
        area += np.bincount(block, minlength=n + 1)
        sy += np.bincount(block, weights=np.repeat(np.arange(r0, r1, dtype=np.float64), w), minlength=n + 1)
        sx += np.bincount(block, weights=xx[: block.size], minlength=n + 1)
        si += np.bincount(block, weights=raw[r0:r1].ravel().astype(np.float64), minlength=n + 1)
    ids = np.flatnonzero(area[1:]) + 1
    boxes = ndimage.find_objects(lab, max_label=n)
    bbox = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in (boxes[i - 1] for i in ids)], np.int64).reshape(-1, 4)
    a = area[ids].astype(np.float64)
    return {
        "label": ids,
        "area": area[ids],
        "centroid_y": sy[ids] / a,
        "centroid_x": sx[ids] / a,
        "bbox_y0": bbox[:, 0],
        "bbox_x0": bbox[:, 1],
        "bbox_y1": bbox[:, 2],
        "bbox_x1": bbox[:, 3],
        "mean_intensity": si[ids] / a,
    }


def _write_csv(path: Path, table: dict[str, np.ndarray]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    cols = [
        table["label"].tolist(),
        table["area"].tolist(),
        [f"{v:.3f}" for v in table["centroid_y"]],
        [f"{v:.3f}" for v in table["centroid_x"]],
        *(table[k].tolist() for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")),
        [f"{v:.6g}" for v in table["mean_intensity"]],
    ]
    writer.writerows(zip(*cols))
    data = buf.getvalue().encode("utf-8")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _write_probs(path: Path, probs: np.ndarray) -> None:
    arr = np.ascontiguousarray(probs, dtype=np.float16)
    atomic_write(path, lambda tmp: tifffile.imwrite(tmp, arr, compression="zlib", photometric="minisblack"))


def _remove_stale_temps(path: Path) -> None:
    """Delete temporary files a killed earlier run left for `path` (atomic_write's naming)."""
    try:
        for tmp in path.parent.glob(f".{_glob_escape(path.name)}.*.tmp*"):
            try:
                tmp.unlink()
            except OSError:
                pass
    except OSError:
        pass


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# --------------------------------------------------------------------------------------- the run


@dataclass
class _Item:
    index: int
    path: Path
    raw: np.ndarray | None = None  # kept for the object table and the overlay
    norm: np.ndarray | None = None  # dropped once predicted
    lo: float = 0.0  # the normalisation's percentiles (the overlay re-normalises raw band by band)
    hi: float = 1.0
    probs: np.ndarray | None = None  # handed to the writer, which drops it as soon as it can
    error: str | None = None  # reason, for a file that could not be read
    bright: bool = False  # inverted as bright-background: post-processed with the model's bright-background options


def write_image_outputs(
    item: _Item, paths: dict[str, Path], kinds: list[str], out_real: Path, postprocess: dict | None = None,
    replace: bool = False,
) -> np.ndarray:
    """Post-process `item.probs` into labels and write the image's outputs, masks last; returns the labels.

    Takes `item.probs` over (sets it to None) so this frame holds the only reference and frees the
    probabilities as soon as no output needs them (a 100-megapixel image has 1.2 GB of them).
    Used by both engines, so their outputs are identical. `postprocess`: options of
    `probabilities_to_instances` (see `InferOptions.postprocess_for`). `replace` (--overwrite):
    also remove the image's existing outputs of the kinds not written.
    """
    from cellseg.postprocess import masks_to_instances, probabilities_to_instances

    probs, item.probs = item.probs, None
    pp = postprocess or {}
    if isinstance(probs, list):  # [seeds, foreground(, background)] from a MaskSink: thresholds already applied
        rest = {k: pp[k] for k in ("min_size", "min_seed_size", "min_score") if k in pp}
        background = probs.pop() if len(probs) == 3 else None
        labels = masks_to_instances(probs.pop(0), probs.pop(0), background=background, **rest)  # popped: freed as they are used
        del background
    else:
        labels = probabilities_to_instances(probs, **pp)
    if "probs" not in kinds:
        del probs
    folder = paths["masks"].parent
    folder.mkdir(parents=True, exist_ok=True)
    if not _under(Path(os.path.realpath(folder)), out_real):
        raise CellsegError(f"{item.path}: output folder {folder} leads outside {out_real} (symlink?)")
    for kind in kinds:
        _remove_stale_temps(paths[kind])
        if kind == "probs":
            _write_probs(paths[kind], probs)
            del probs
        elif kind == "csv":
            _write_csv(paths[kind], object_table(labels, item.raw))
        elif kind == "overlay":
            _write_overlay(paths[kind], item, labels)
        else:
            write_labels_tiff(paths[kind], labels)
    if replace:  # --overwrite: the replaced result's outputs of kinds not written now would be stale
        for kind in set(SUFFIXES) - set(kinds):
            if kind in paths:
                paths[kind].unlink(missing_ok=True)
    return labels


def result_sink(opts: InferOptions, postprocess_of: Callable[[Hashable], dict]):
    """What `predict_many` should collect per image: thresholded masks (1/6 of the memory of the
    probabilities), at the thresholds `postprocess_of(key)` gives for the image, unless the
    probabilities themselves are written (`--probs`)."""
    if opts.save_probs:
        return None
    from cellseg.inference import MaskSink
    from cellseg.postprocess import effective_postprocess

    def sink(key, h, w):
        pp = effective_postprocess(postprocess_of(key))
        return MaskSink(h, w, pp["interior_threshold"], pp["foreground_threshold"], keep_background=pp["min_score"] > 0)

    return sink


def _reason(exc: BaseException, path: Path) -> str:
    """The message of an error without the leading '<path>: ' (the summary names the file)."""
    msg = str(exc)
    for prefix in (f"{path}: ", f"{_abs(path)}: "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _load(index: int, path: Path, low: float, high: float, keep_raw: bool, invert: bool = False, probs: bool = False,
          channel: int | None = None) -> _Item:
    try:
        shape = image_shape(path)
        if shape:  # refused from its header, before its pixels take the memory
            check_fits(path, *shape, probs=probs)
        raw = read_image(path, keep_integer=True, channel=channel)  # 8/16-bit stays integer: kept for the CSV and overlay
        check_fits(path, *raw.shape, probs=probs)  # a huge image fails alone, not the whole run
        lo, hi = percentile_range(raw, low, high)
        norm = rescale_intensity(raw, lo, hi)
        bright = inverted_if_bright(norm, invert)  # with the line above: normalize_percentile(raw, low, high, invert)
    except CellsegError as exc:
        return _Item(index, path, error=_reason(exc, path))
    except OSError as exc:
        return _Item(index, path, error=f"cannot read ({exc.strerror or exc})")
    return _Item(index, path, raw=raw if keep_raw else None, norm=norm, lo=lo, hi=hi, bright=bright)


OVERLAY_COLOR = (255, 64, 0)  # RGB of the contours
STREAMED_PNG_PIXELS = 16_000_000  # overlays above this are compressed band by band


def _write_overlay(path: Path, item: _Item, labels: np.ndarray) -> None:
    """Contours on the normalised image, built band by band from the raw image; the same pixels
    as overlay_rgb on the whole image. Large images are compressed band by band as well
    (`write_png_bands`): no full-size RGB copy."""
    from cellseg.plots import overlay_rgb

    h, w = labels.shape
    band = max(1, (1 << 20) // max(w, 1))

    def bands(color):
        for r0 in range(0, h, band):
            r1 = min(h, r0 + band)
            a0, a1 = max(0, r0 - 1), min(h, r1 + 1)  # one row of context: contours look at 3x3 neighbourhoods
            norm = rescale_intensity(item.raw[a0:a1], item.lo, item.hi)
            yield overlay_rgb(np.clip(norm, 0, 1), labels[a0:a1], color=color)[r0 - a0 : r1 - a0]

    if h * w > STREAMED_PNG_PIXELS:
        write_png_bands(path, h, w, bands(OVERLAY_COLOR))
    else:  # OpenCV's encoder (filtered rows, smaller files); built in its BGR order, no converted copy
        write_png(path, np.concatenate(list(bands(OVERLAY_COLOR[::-1]))), bgr=True)


class _Prefetcher:
    """Reads and normalises images in a background thread, at most `depth` ahead of the consumer."""

    _END = object()

    def __init__(self, jobs: list[tuple[int, Path]], load: Callable[[int, Path], _Item], depth: int):
        self._jobs, self._load = jobs, load
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cellseg-prefetch", daemon=True)
        self._thread.start()

    def _put(self, obj) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for index, path in self._jobs:
                if self._stop.is_set() or not self._put(self._load(index, path)):
                    return
        except BaseException as exc:  # a bug or MemoryError: hand it to the consumer
            self._put(exc)
            return
        self._put(self._END)

    def __iter__(self) -> Iterator[_Item]:
        while True:
            obj = self._queue.get()
            if obj is self._END:
                return
            if isinstance(obj, BaseException):
                raise obj
            yield obj

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _make_progress(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from cellseg.progress import console

    return Progress(
        TextColumn("[bold]segment"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TextColumn("{task.fields[failed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def segment_folder(
    model,
    inp: str | Path,
    out_dir: str | Path | None = None,
    opts: InferOptions | None = None,
    progress: bool = True,
    model_name: str = "",
) -> InferSummary:
    """Segment an image file or a folder of images; write per-image outputs and summary.json.

    model: an `OnnxModel`/`TorchModel` (or any callable with the same attributes). out_dir:
    None -> default_output_dir(inp). Order of checks, all before any image is read: the input
    exists and holds images; the options are valid; the output folder can be created and written
    (CellsegError "{out}: output folder is not writable"); no output to be written exists unless
    opts.overwrite / opts.skip_existing. Unreadable images are listed in `summary.failed` and the
    run goes on; the summary is returned (exit code left to the caller). Interruptions (Ctrl-C,
    a crash) leave only complete files behind.
    """
    opts = opts or InferOptions()
    inp = Path(inp)
    out = _abs(out_dir) if out_dir is not None else default_output_dir(inp)
    unlisted: list[tuple[Path, str]] = []
    images = collect_inputs(inp, opts.recursive, out, unlisted)

    opts.validate()
    in_channels = int(getattr(model, "in_channels", 1) or 1)
    if in_channels != 1:
        raise CellsegError(f"the model expects {in_channels} input channels; cellseg infer feeds single-channel images")

    from cellseg.inference import read_channel, wrapper_settings

    channel = read_channel(model, opts.channel)  # --channel, else the one the model was trained on
    check_output_folder(out)
    plans = plan_outputs(inp, images, out)
    kinds = _wanted(opts)
    todo_idx, skipped_idx, kept = plan_work(images, plans, out, opts)
    todo = [(i, images[i]) for i in todo_idx]
    skipped = len(skipped_idx)

    summary = InferSummary(
        skipped=skipped,
        model=model_name or str(getattr(model, "path", "") or type(model).__name__),
        provider=str(getattr(model, "provider", "unknown")),
        run_id=getattr(model, "run_id", None),
        input=str(_abs(inp)),
        output=str(out),
        tile=opts.tile,
        overlap=opts.overlap,
        batch_size=opts.batch_size,
        recursive=opts.recursive,
        channel=channel,
        **wrapper_settings(model),
        postprocess=opts.postprocess_for(model),
        postprocess_bright=opts.postprocess_for(model, bright=True),
        images=kept,
        failed=[(str(d), reason) for d, reason in unlisted],  # sub-folders that could not be listed
    )
    check_same_settings(out, settings_of(summary), skipped)
    mark_output_folder(out, kept, settings_of(summary), pending_entries(images, plans, out, todo_idx))
    low = float(getattr(model, "low_percentile", 1.0))
    high = float(getattr(model, "high_percentile", 99.8))
    invert = bool(getattr(model, "invert_bright", False))
    postprocess, postprocess_bright = summary.postprocess, summary.postprocess_bright
    out_real = Path(os.path.realpath(out))

    def load(index: int, path: Path) -> _Item:
        return _load(index, path, low, high, keep_raw=opts.csv or opts.overlay, invert=invert, probs=opts.save_probs,
                     channel=channel)

    def finish(item: _Item) -> dict[str, Any]:
        """Post-process and write one image (worker thread); masks last."""
        paths = plans[item.index]
        pp = postprocess_bright if item.bright else postprocess
        labels = write_image_outputs(item, paths, kinds, out_real, pp, replace=opts.overwrite)
        h, w = labels.shape
        return {
            "input": str(_abs(item.path)),
            "masks": str(paths["masks"].relative_to(out)),
            "height": h,
            "width": w,
            "objects": int(labels.max(initial=0)),
        }

    from cellseg.inference import predict_many

    bar = _make_progress(progress, len(todo))
    task = None
    start = time.perf_counter()
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if bar is not None:
            rate = done / max(time.perf_counter() - start, 1e-9)
            failed = f"[red]{len(summary.failed)} failed" if summary.failed else ""
            bar.update(task, advance=1, rate=f"{rate:.2f}", failed=failed)

    def fail(path: Path, reason: str) -> None:
        summary.failed.append((str(path), reason))
        tick()

    pending: dict[int, _Item] = {}
    futures: dict[Future, _Item] = {}

    def collect(fs) -> None:
        for f in fs:
            item = futures.pop(f)
            try:
                record = f.result()  # re-raises anything that is not a per-image problem
            except (CellsegError, OSError) as exc:
                fail(item.path, f"cannot write outputs: {_reason(exc, item.path)}" if isinstance(exc, OSError) else _reason(exc, item.path))
                continue
            summary.processed += 1
            summary.objects += record["objects"]
            summary.megapixels += record["height"] * record["width"] / 1e6
            summary.images.append(record)
            tick()

    prefetcher = _Prefetcher(todo, load, opts.prefetch) if opts.prefetch > 0 and todo else None
    source = iter(prefetcher) if prefetcher is not None else (load(i, p) for i, p in todo)

    def feed() -> Iterator[tuple[int, np.ndarray]]:
        for item in source:
            if item.error is not None:
                fail(item.path, item.error)
                continue
            pending[item.index] = item
            yield item.index, item.norm

    workers = max(1, opts.workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cellseg-write")
    try:
        if bar is not None:
            bar.__enter__()
            task = bar.add_task("segment", total=len(todo), rate="-", failed="")
        sink = result_sink(opts, lambda index: postprocess_bright if pending[index].bright else postprocess)
        for index, probs in predict_many(model, feed(), opts.tile, opts.overlap, opts.batch_size, sink=sink):
            item = pending.pop(index)
            item.norm, item.probs = None, probs  # the overlay re-normalises item.raw
            del probs  # (the loop variable would keep a huge image's probabilities alive)
            futures[pool.submit(finish, item)] = item
            if len(futures) >= 2 * workers:  # bound the backlog (memory)
                finished, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                collect(finished)
        collect(wait(list(futures)).done)
    finally:
        if prefetcher is not None:
            prefetcher.close()
        # on an interruption: let running writes finish (each is atomic), drop queued ones
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.__exit__(None, None, None)

    summary.finalize(time.perf_counter() - start)
    text = json.dumps(summary.to_dict(), indent=2)
    _remove_stale_temps(out / SUMMARY_NAME)
    atomic_write(out / SUMMARY_NAME, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return summary
