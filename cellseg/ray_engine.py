"""Distributed folder segmentation on Ray Data (`cellseg infer --engine ray`).

`segment_with_ray(onnx_path, inp, out_dir, opts)` does what `cellseg.batch.segment_folder` does
-- same inputs, same output files (label TIFFs, object CSVs, overlays, probabilities, summary.json),
same skip/overwrite rules -- but spreads the images over a pool of Ray actors, on this machine or
on a Ray cluster, and also writes ``manifest.parquet`` (one row per input: path, status ok /
failed / skipped, error, n_objects, seconds, worker).

Pipeline::

    driver: collect inputs, plan outputs, apply --skip-existing/--overwrite, check the folder
    ray.data.read_binary_files(paths, include_paths=True)       # read tasks, a fraction of a CPU each
      .map_batches(_Segmenter, compute=ActorPoolStrategy(size=N), num_cpus=c, [num_gpus=1])
    driver: stream the per-image rows back (progress bar), write summary.json and the manifest

Each actor loads the ONNX model once (onnxruntime with floor(c) threads, at least 1; CUDA when
it holds a GPU), decodes the image bytes itself (`decode_bytes`: the same decoders and
single-channel rule as `cellseg.data.io.read_image`), runs the same tiled inference
(`predict_many`) and post-processing, and writes the image's outputs with the local engine's
writers (atomic files, masks last). Images that cannot be decoded or written are rows with
status "failed" and a reason; they never stop the job.

Inputs: an image file, a folder (as the local engine, `recursive` included), a glob pattern
(``'data/**/*.tif'``; ``**`` spans folders) or a list file (a text file of image paths, one a
line; blank lines and lines starting with '#' ignored; relative paths are relative to the list
file's folder). For a glob or a list the output layout is relative to the deepest folder holding
every image, and the default output folder is ``<that folder>_cellseg`` (glob) or
``<list stem>_cellseg`` beside the list file. Listed files that are missing, folders, or not
images are reported as failed.

Cluster. `address=None` starts a private local Ray (all CPUs of this machine, no dashboard,
logs in a temporary folder deleted at the end) and shuts it down afterwards; "auto" or
"ray://HOST:PORT" joins an existing cluster (left running). On a multi-node cluster the input and
output folders must be on a filesystem mounted at the same path on every node; the model is
shipped to the actors by value. The actors together never reserve all CPUs: read tasks need a
share (`READ_CPUS`), or the job would wait forever.

Timing. summary.json's `seconds` (and images_per_s) run from the moment Ray is up to the last
result: actor start-up (process, imports, model load) included, Ray's own start excluded. Its
extra "engine" entry tells the rest: actors, CPUs/GPUs/threads per actor, init_seconds (Ray's
start), first_result_seconds, first/last_image_done_s (actor clocks), the workers used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob as _glob
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from cellseg.batch import (
    SUFFIXES,
    SUMMARY_NAME,
    InferOptions,
    _Item,
    InferSummary,
    _abs,
    check_same_settings,
    mark_output_folder,
    pending_entries,
    plan_work,
    settings_of,
    check_output_folder,
    _is_output_folder,
    _make_progress,
    _reason,
    _under,
    _wanted,
    collect_inputs,
    default_output_dir,
    output_paths,
    plan_outputs,
    result_sink,
    write_image_outputs,
)
from cellseg.data.io import (
    IMAGE_EXTENSIONS,
    atomic_write,
    inverted_if_bright,
    is_image_file,
    image_shape,
    missing_reason,
    percentile_range,
    rescale_intensity,
)
from cellseg.errors import CellsegError
from cellseg.resources import check_fits

MANIFEST_NAME = "manifest.parquet"
MANIFEST_COLUMNS = ("path", "status", "error", "n_objects", "seconds", "worker")
NEED_RAY = "--engine ray needs Ray: pip install 'cellseg-unet[ray]'"
READ_CPUS = 0.25  # CPU reserved by each read task (reading bytes is I/O bound)
READ_HEADROOM = 0.5  # CPUs the actors leave free for read tasks (two at a time)
MAX_IMAGES_PER_CALL = 4  # images per actor call (tiles of these share model batches)

log = logging.getLogger(__name__)


@dataclass
class RayInferSummary(InferSummary):
    """An InferSummary plus how the Ray job ran (the "engine" entry of summary.json)."""

    engine: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- ray


def _import_ray():
    """The ray module, or CellsegError naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CellsegError(NEED_RAY) from None
    return ray


def _short_tmp_root() -> str:
    """A short folder for Ray's sockets (AF_UNIX paths are limited to ~107 bytes)."""
    return "/tmp" if os.name == "posix" and os.path.isdir("/tmp") else tempfile.gettempdir()


@contextmanager
def _quiet_ray_data():
    """Silence Ray Data's console logs and progress bars for the duration; restored afterwards."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved_ctx = {}
    for name, value in (
        ("enable_progress_bars", False),
        ("enable_operator_progress_bars", False),
        ("print_on_execution_start", False),
        ("verbose_stats_logs", False),
        ("enable_auto_log_stats", False),
    ):
        if hasattr(ctx, name):
            saved_ctx[name] = getattr(ctx, name)
            setattr(ctx, name, value)
    saved_levels = []
    for name in ("ray.data", "ray"):
        for h in logging.getLogger(name).handlers:
            # the console handlers only; Ray Data's session log file keeps everything
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                saved_levels.append((h, h.level))
                h.setLevel(max(h.level, logging.ERROR))
    try:
        yield
    finally:
        for name, value in saved_ctx.items():
            setattr(ctx, name, value)
        for h, level in saved_levels:
            h.setLevel(level)


class _RaySession:
    """Connects to Ray (`address`) or starts a private local instance, and undoes that on close."""

    def __init__(self, ray, address: str | None, temp_dir: str | None, use_gpu_locally: bool):
        self.ray = ray
        self.started = False
        self.own_temp: str | None = None
        self.temp_root: str | None = None
        self._saved_env: dict[str, str | None] = {}
        t0 = time.perf_counter()
        if ray.is_initialized():  # the caller's Ray: use it, leave it running
            self.init_seconds = 0.0
            return
        common = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
        try:
            if address is None:
                # a private single-user instance on this machine: no token to manage
                self._setenv("RAY_AUTH_MODE", os.environ.get("RAY_AUTH_MODE", "disabled"))
                if temp_dir is None and "RAY_TMPDIR" not in os.environ:
                    temp_dir = self.own_temp = tempfile.mkdtemp(prefix="cs-ray-", dir=_short_tmp_root())
                self.temp_root = temp_dir or os.path.join(os.environ["RAY_TMPDIR"], "ray")
                # address="local": a new instance even when RAY_ADDRESS points at a cluster
                kwargs: dict[str, Any] = dict(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, **common)
                if not use_gpu_locally:
                    kwargs["num_gpus"] = 0
                if temp_dir is not None:
                    kwargs["_temp_dir"] = str(temp_dir)
                ray.init(**kwargs)
            else:
                ray.init(address=address, **common)
        except Exception as exc:
            if ray.is_initialized():
                ray.shutdown()
            self._restore()
            where = "start a local Ray instance" if address is None else f"connect to the Ray cluster at {address}"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise CellsegError(f"cannot {where} ({first})") from None
        except BaseException:  # Ctrl-C while Ray starts: shut down what started, remove the temporary folder
            try:
                if ray.is_initialized():
                    ray.shutdown()
            finally:
                self._restore()
            raise
        self.started = True
        self.init_seconds = time.perf_counter() - t0

    def _setenv(self, key: str, value: str) -> None:
        self._saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def _restore(self, remove_temp: bool = True) -> None:
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}
        if remove_temp and self.own_temp is not None:
            for _ in range(50):  # processes may take a moment to let go of their files
                shutil.rmtree(self.own_temp, ignore_errors=True)
                if not os.path.exists(self.own_temp):
                    break
                time.sleep(0.1)
            self.own_temp = None

    def resources(self) -> tuple[float, float]:
        """(CPUs, GPUs) of the cluster."""
        res = self.ray.cluster_resources()
        return float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))

    def close(self, keep_logs: bool = False) -> None:
        """Shut down the Ray this session started (and delete its temporary folder unless keep_logs)."""
        if not self.started:
            return
        self.started = False
        try:
            self.ray.shutdown()
        finally:
            self._restore(remove_temp=not keep_logs)


def check_pool_options(num_actors: int | None, cpus_per_actor: float | None) -> None:
    """CellsegError naming --actors or --cpus-per-actor when out of range (checked before any output)."""
    if num_actors is not None and num_actors < 1:
        raise CellsegError(f"--actors {num_actors}: expected 1 or more")
    if cpus_per_actor is not None and not cpus_per_actor > 0:
        raise CellsegError(f"--cpus-per-actor {cpus_per_actor}: expected a positive number")


def plan_resources(
    cluster_cpus: float,
    cluster_gpus: float,
    use_gpu: bool,
    num_actors: int | None = None,
    cpus_per_actor: float | None = None,
) -> tuple[int, float, int]:
    """(actors, CPUs per actor, onnxruntime threads per actor), defaults filled in and checked.

    By default one CPU actor per CPU, or one GPU actor per GPU; the actors share the cluster's
    CPUs less READ_HEADROOM (at most 4 each for GPU actors), so read tasks always find CPUs.
    onnxruntime threads: the floor of an actor's CPUs, at least 1. Raises CellsegError when the actors would take the CPUs the read tasks need (the
    job would never finish) or more GPUs than the cluster has.
    """
    check_pool_options(num_actors, cpus_per_actor)
    free = cluster_cpus - READ_HEADROOM
    if free < 0.05:
        raise CellsegError(f"the Ray cluster has {cluster_cpus:g} CPU(s); at least 1 is needed")
    if use_gpu:
        gpus = int(cluster_gpus)
        n = num_actors if num_actors is not None else max(1, gpus)
        if n > gpus:
            raise CellsegError(f"--actors {n}: the Ray cluster has {gpus} GPU(s), one per actor")
    else:
        n = num_actors if num_actors is not None else max(1, int(cluster_cpus))
    if cpus_per_actor is not None:
        c = float(cpus_per_actor)
    else:  # share the free CPUs (a GPU actor needs a few for decoding and writing)
        c = math.floor(min(free / n, 4.0 if use_gpu else free) * 100) / 100
    if c <= 0 or n * c > free + 1e-9:
        raise CellsegError(
            f"{n} actor(s) x {c:g} CPU would leave less than {READ_HEADROOM:g} of the cluster's "
            f"{cluster_cpus:g} CPUs to the read tasks and the job would stall; use fewer actors "
            "or a smaller --cpus-per-actor"
        )
    return n, c, max(1, int(math.floor(c + 1e-9)))


# ---------------------------------------------------------------------------------------- inputs


def decode_bytes(data: bytes, name: str | Path, channel: int | None = None) -> np.ndarray:
    """Decode an image file's bytes in a worker exactly as `cellseg.data.io.read_image` reads the file."""
    from cellseg.data.io import decode_image

    return decode_image(data, name, channel)


@dataclass
class Inputs:
    """What `resolve_inputs` found: the images to segment and the entries already known bad."""

    kind: str  # file, folder, glob, list
    root: Path  # output paths are relative to this (a folder, or the file of a file input)
    images: list[Path]
    bad: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason): listed but unusable
    default_out: Path | None = None


def _looks_like_glob(s: str) -> bool:
    return _glob.has_magic(s)


def _is_result_file(path: Path, out_real: Path | None, root: Path) -> bool:
    """A result of ours: a *_masks.tif etc. inside the output folder or an earlier run's folder."""
    if not any(path.name.endswith(s) for s in SUFFIXES.values()):
        return False
    real = Path(os.path.realpath(path.parent))
    if out_real is not None and _under(real, out_real):
        return True
    d, top = _abs(path.parent), _abs(root)
    while True:
        if _is_output_folder(d):
            return True
        if d == top or d.parent == d or not _under(d, top):
            return False
        d = d.parent


def _common_root(paths: Sequence[Path]) -> Path:
    parents = {str(_abs(p).parent) for p in paths}
    return Path(os.path.commonpath(sorted(parents)))


def _read_list_file(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise CellsegError(f"{path}: cannot read the list file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise CellsegError(
            f"{path}: not an image file ({', '.join(IMAGE_EXTENSIONS)}) nor a text list of image paths"
        ) from None
    if "\x00" in text:
        raise CellsegError(f"{path}: not an image file ({', '.join(IMAGE_EXTENSIONS)}) nor a text list of image paths")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _from_entries(entries: Iterable[str | Path], base: Path, origin: str, out_dir: Path | None, kind: str) -> Inputs:
    images: list[Path] = []
    bad: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for e in entries:
        p = Path(e).expanduser()
        p = p if p.is_absolute() else base / p
        p = _abs(p)
        if str(p) in seen:
            continue
        seen.add(str(p))
        if not os.path.exists(p):  # (never raises, unlike Path.exists on an unreadable folder)
            bad.append((p, missing_reason(p)))
        elif os.path.isdir(p):
            bad.append((p, "is a folder, not an image"))
        elif not is_image_file(p):
            bad.append((p, f"not an image file (expected {', '.join(IMAGE_EXTENSIONS)})"))
        else:
            images.append(p)
    if not images and not bad:
        raise CellsegError(f"{origin}: no image paths listed")
    root = _common_root(images or [b for b, _ in bad])
    out_real = Path(os.path.realpath(out_dir)) if out_dir is not None else None
    images = [p for p in images if not _is_result_file(p, out_real, root)]
    if not images and not bad:
        raise CellsegError(f"{origin}: only results of earlier cellseg runs, no images")
    images.sort(key=lambda q: q.relative_to(root).parts)
    return Inputs(kind, root, images, sorted(bad), None)


def resolve_inputs(inp: str | Path | Sequence[str | Path], recursive: bool = False, out_dir: str | Path | None = None) -> Inputs:
    """The images of `inp`: an image file, a folder, a glob pattern, a list file, or a list of paths.

    File and folder inputs follow `collect_inputs` exactly. A glob matches with `**` spanning
    folders (hidden files only when the pattern names them); a list file holds one path a line.
    For globs and lists, the root is the deepest folder holding every image, results of cellseg
    runs are left out, and entries that are missing, folders or not images come back in `bad`.
    Raises CellsegError when nothing usable is found.
    """
    out = _abs(out_dir) if out_dir is not None else None
    if isinstance(inp, (list, tuple)):
        res = _from_entries(inp, Path.cwd(), "the list of inputs", out, "list")
        res.default_out = default_output_dir(res.root)
        return res
    s = os.fspath(inp)
    p = Path(s)
    if os.path.lexists(p) and (p.is_dir() or is_image_file(p) or not p.exists()):
        unlisted: list[tuple[Path, str]] = []
        images = collect_inputs(p, recursive, out, unlisted)
        # a broken link fails alone, as in the local engine (Ray's file reader would fail the whole job)
        broken = {q for q in images if not os.path.exists(q)}
        unlisted += [(q, missing_reason(q)) for q in sorted(broken)]
        images = [q for q in images if q not in broken]
        return Inputs("folder" if p.is_dir() else "file", p, images, sorted(unlisted), default_output_dir(p))
    if os.path.lexists(p):  # an existing non-image file: a list of paths
        res = _from_entries(_read_list_file(p), _abs(p).parent, str(p), out, "list")
        res.default_out = default_output_dir(p)
        return res
    if _looks_like_glob(s):
        # glob's wildcards skip hidden names (files and folders) unless the pattern spells them
        matches = [m for m in _glob.glob(os.path.expanduser(s), recursive=True) if is_image_file(m) and not os.path.isdir(m)]
        if not matches:
            raise CellsegError(f"{s}: no images ({', '.join(IMAGE_EXTENSIONS)}) match the pattern")
        res = _from_entries(matches, Path.cwd(), s, out, "glob")
        if not res.images:
            raise CellsegError(f"{s}: the pattern matches only results of earlier cellseg runs")
        res.default_out = default_output_dir(res.root)
        return res
    raise CellsegError(f"{s}: no such file or folder")


# --------------------------------------------------------------------------------------- actors


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Segmenter:
    """A Ray Data actor: loads the model once, then segments batches of (path, bytes) rows."""

    def __init__(self, model_bytes: bytes, model_name: str, device: str, threads: int, root: str, out: str,
                 stems: dict[str, str], opts: InferOptions, tta: bool = False, scale: float = 1.0):
        import cv2

        from cellseg.inference import OnnxModel, with_settings

        cv2.setNumThreads(threads)
        fd, tmp = tempfile.mkstemp(prefix="cellseg-model-", suffix=".onnx")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model_bytes)
            model = OnnxModel(tmp, device=device, threads=threads)
        finally:
            os.remove(tmp)
        model.path = Path(model_name)
        self.model = with_settings(model, tta, scale)
        self.root, self.out, self.stems, self.opts = Path(root), Path(out), stems, opts
        self.kinds = _wanted(opts)
        self.postprocess = opts.postprocess_for(self.model)
        self.postprocess_bright = opts.postprocess_for(self.model, bright=True)
        self.worker = _worker_id()

    def _postprocess(self, item: _Item) -> dict:
        return self.postprocess_bright if item.bright else self.postprocess

    @staticmethod
    def _norms(good: list[tuple[dict[str, Any], _Item]]):
        """(index, normalised image) for predict_many, each image's copy dropped once handed over."""
        for i, (_, item) in enumerate(good):
            norm, item.norm = item.norm, None
            yield i, norm

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from cellseg.inference import predict_many

        opts, model = self.opts, self.model
        rows: list[dict[str, Any]] = []
        good: list[tuple[dict[str, Any], _Item]] = []  # (row, decoded image) of the readable images
        for path, data in zip(batch["path"], batch["bytes"]):
            path = str(path)
            row = {"path": path, "status": "failed", "error": "", "objects": 0, "seconds": 0.0, "height": 0, "width": 0}
            rows.append(row)
            t0 = time.perf_counter()
            try:
                shape = image_shape(data)
                if shape:  # refused from its header, before decoding
                    check_fits(path, *shape, probs=opts.save_probs)
                raw = decode_bytes(bytes(data), path, opts.channel)
                check_fits(path, *raw.shape, probs=opts.save_probs)
                lo, hi = percentile_range(raw, model.low_percentile, model.high_percentile)
                norm = rescale_intensity(raw, lo, hi)
                bright = inverted_if_bright(norm, getattr(model, "invert_bright", False))
            except CellsegError as exc:
                row["error"] = _reason(exc, Path(path))
            except Exception as exc:
                row["error"] = f"cannot decode image ({type(exc).__name__}: {exc})"
            else:
                row["height"], row["width"] = (int(d) for d in raw.shape)
                keep_raw = opts.csv or opts.overlay
                good.append((row, _Item(len(good), Path(path), raw=raw if keep_raw else None, norm=norm, lo=lo, hi=hi, bright=bright)))
            row["seconds"] += time.perf_counter() - t0
        if good:
            t_last = time.perf_counter()
            pending = set(range(len(good)))
            try:
                sink = result_sink(opts, lambda i: self._postprocess(good[i][1]))
                for i, probs in predict_many(model, self._norms(good), opts.tile, opts.overlap, opts.batch_size, sink=sink):
                    row, item = good[i]
                    pending.discard(i)
                    try:
                        paths = output_paths(self.root, row["path"], self.out, stem=self.stems.get(row["path"]))
                        item.probs = probs
                        row["objects"] = int(write_image_outputs(item, paths, self.kinds, Path(os.path.realpath(self.out)), self._postprocess(item), replace=self.opts.overwrite).max(initial=0))
                        row["status"] = "ok"
                    except CellsegError as exc:
                        row["error"] = _reason(exc, Path(row["path"]))
                    except OSError as exc:
                        row["error"] = f"cannot write outputs: {_reason(exc, Path(row['path']))}"  # as the local engine
                    except Exception as exc:
                        row["error"] = f"post-processing failed ({type(exc).__name__}: {exc})"
                    del probs
                    item.raw = None  # this image is done: free it before the next one
                    row["done_at"] = time.time()
                    now = time.perf_counter()
                    row["seconds"] += now - t_last
                    t_last = now
            except Exception as exc:  # the model failed on a batch: its images fail, the job goes on
                reason = _reason(exc, Path(self.root)) if isinstance(exc, CellsegError) else f"inference failed ({type(exc).__name__}: {exc})"
                for i in pending:
                    good[i][0]["error"] = reason
        n = len(rows)
        good.clear()
        return {
            "path": np.array([r["path"] for r in rows], dtype=object),
            "status": np.array([r["status"] for r in rows], dtype=object),
            "error": np.array([r["error"] for r in rows], dtype=object),
            "objects": np.array([r["objects"] for r in rows], dtype=np.int64),
            "seconds": np.array([round(r["seconds"], 4) for r in rows], dtype=np.float64),
            "height": np.array([r["height"] for r in rows], dtype=np.int64),
            "width": np.array([r["width"] for r in rows], dtype=np.int64),
            "done_at": np.array([r.get("done_at", time.time()) for r in rows], dtype=np.float64),
            "worker": np.array([self.worker] * n, dtype=object),
            "provider": np.array([str(model.provider)] * n, dtype=object),
        }


# ------------------------------------------------------------------------------------------ run


def _read_files(ray, paths: list[str], blocks: int):
    """read_binary_files(paths) in `blocks` blocks, each read task reserving READ_CPUS.

    Ray >= 2.4x takes num_cpus directly (its ray_remote_args is deprecated); older releases
    only through ray_remote_args.
    """
    try:
        return ray.data.read_binary_files(paths, include_paths=True, num_cpus=READ_CPUS, override_num_blocks=blocks)
    except TypeError:
        return ray.data.read_binary_files(paths, include_paths=True, ray_remote_args={"num_cpus": READ_CPUS}, override_num_blocks=blocks)


def _map_segmenter(ds, ray, local: bool, **kwargs):
    """ds.map_batches(_Segmenter, **kwargs); on a local Ray without actor restarts.

    Ray Data restarts dead actors and retries their tasks forever by default: right for a cluster
    that loses nodes, wrong on one machine where an actor killed by an image (out of memory)
    would be killed again by the same image. Local runs pass max_restarts=0 (fail fast; rerun
    with --skip-existing), which also spares the console Ray's warning about restartable actors.
    That keyword goes through Ray's deprecated **ray_remote_args; without it when Ray drops it.
    """
    import warnings

    if local:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
                return ds.map_batches(_Segmenter, max_restarts=0, **kwargs)
        except TypeError:
            pass
    return ds.map_batches(_Segmenter, **kwargs)


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("path", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("n_objects", pa.int64()), ("seconds", pa.float64()), ("worker", pa.string()),
    ])
    table = pa.Table.from_pylist([{k: r.get(k) for k in MANIFEST_COLUMNS} for r in rows], schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def segment_with_ray(
    onnx_path: str | Path,
    inp: str | Path | Sequence[str | Path],
    out_dir: str | Path | None = None,
    opts: InferOptions | None = None,
    address: str | None = None,
    num_actors: int | None = None,
    cpus_per_actor: float | None = None,
    progress: bool = True,
    *,
    device: str = "auto",
    model_name: str = "",
    temp_dir: str | Path | None = None,
    images_per_call: int | None = None,
    tta: bool = False,
    scale: float = 1.0,
) -> RayInferSummary:
    """Segment an image file, a folder, a glob or a list file on Ray; same outputs as `segment_folder`.

    onnx_path: an exported cellseg model (validated here before Ray starts). out_dir: None ->
    the input's default output folder. address: None starts a local Ray (shut down at the end);
    "auto" / "ray://HOST:PORT" uses an existing cluster. num_actors / cpus_per_actor: the actor
    pool (defaults: `plan_resources`). device: "auto" (a GPU per actor when the cluster has GPUs),
    "cpu" or "cuda". temp_dir: Ray's temporary folder for a local start (default: a fresh short
    folder, deleted afterwards). images_per_call: images per actor call (default: up to 4, fewer
    for small runs so that each actor gets at least 4 calls: balance, and results stream back).
    tta, scale: test-time flips and zoom, as `--tta` / `--scale` of the local engine
    (`inference.with_settings`; opts.tile is already in image px).

    Writes each image's outputs (by the actors), summary.json and manifest.parquet; returns the
    summary (failed images in `failed`; the exit code is the caller's choice). Raises
    CellsegError for what the local engine refuses (missing input, existing outputs without
    --overwrite/--skip-existing, bad options or model), when Ray is missing, or when the Ray job
    itself fails.
    """
    opts = opts or InferOptions()
    if device not in ("auto", "cpu", "cuda"):
        raise CellsegError(f"--device {device}: expected auto, cpu or cuda with --engine ray (each actor gets its own GPU)")
    onnx_path = Path(onnx_path)
    ray = _import_ray()

    inputs = resolve_inputs(inp, opts.recursive, out_dir)
    out = _abs(out_dir) if out_dir is not None else _abs(inputs.default_out)
    opts.validate()
    if images_per_call is not None and images_per_call < 1:
        raise CellsegError(f"images per call {images_per_call}: expected 1 or more")
    check_pool_options(num_actors, cpus_per_actor)

    from cellseg.inference import OnnxModel, check_scale, read_channel, with_settings, wrapper_settings

    check_scale(scale)
    probe = with_settings(OnnxModel(onnx_path, device="cpu", threads=1), tta, scale)  # validates the file before anything starts
    if probe.in_channels != 1:
        raise CellsegError(f"the model expects {probe.in_channels} input channels; cellseg infer feeds single-channel images")
    opts = dataclasses.replace(opts, channel=read_channel(probe, opts.channel))  # the actors read this channel
    model_bytes = onnx_path.read_bytes()

    created = not out.exists()
    check_output_folder(out)
    plans = plan_outputs(inputs.root, inputs.images, out)
    todo, skipped, kept = plan_work(inputs.images, plans, out, opts, extra_outputs=(out / MANIFEST_NAME,))

    # display paths as the local engine reports them; Ray gets absolute ones
    display = [str(p) for p in inputs.images]
    abs_paths = [str(_abs(p)) for p in inputs.images]
    index_of = {a: i for i, a in enumerate(abs_paths)}
    stems = {}
    for i in todo:
        default = output_paths(inputs.root, inputs.images[i], out)["masks"]
        if plans[i]["masks"] != default:
            stems[abs_paths[i]] = plans[i]["masks"].name[: -len(SUFFIXES["masks"])]

    summary = RayInferSummary(
        skipped=len(skipped),
        model=model_name or str(onnx_path),
        provider=str(probe.provider),
        run_id=probe.run_id,
        input=str(_abs(inp)) if not isinstance(inp, (list, tuple)) else str(inputs.root),
        output=str(out),
        tile=opts.tile,
        overlap=opts.overlap,
        batch_size=opts.batch_size,
        recursive=opts.recursive,
        channel=opts.channel,  # (the model's when --channel is not given)
        **wrapper_settings(probe),
        postprocess=opts.postprocess_for(probe),
        postprocess_bright=opts.postprocess_for(probe, bright=True),
        images=kept,
    )
    del probe
    check_same_settings(out, settings_of(summary), len(skipped))
    mark_output_folder(out, kept, settings_of(summary), pending_entries(inputs.images, plans, out, todo))
    manifest: list[dict[str, Any]] = [
        {"path": abs_paths[i], "status": "skipped", "error": None, "n_objects": None, "seconds": None, "worker": None} for i in skipped
    ]
    for p, reason in inputs.bad:
        summary.failed.append((str(p), reason))
        manifest.append({"path": str(_abs(p)), "status": "failed", "error": reason, "n_objects": None, "seconds": None, "worker": "driver"})

    engine: dict[str, Any] = {"name": "ray", "ray_version": ray.__version__, "address": address or "local"}
    bar = _make_progress(progress, len(todo))
    seen: set[int] = set()
    session = None
    keep_logs = False
    start = time.perf_counter()
    first_result: float | None = None
    workers: set[str] = set()
    done_at: list[float] = []  # when each image was finished by its actor, s after the pipeline started
    launched = False
    try:
        if todo:
            if bar is not None:  # shown while Ray starts: the elapsed time tells the wait
                bar.__enter__()
                task = bar.add_task("segment", total=len(todo), rate="-", failed="")
            t_init = time.perf_counter()
            session = _RaySession(ray, address, None if temp_dir is None else str(temp_dir), use_gpu_locally=_cuda_usable() and device != "cpu")
            cpus, gpus = session.resources()
            use_gpu = device != "cpu" and gpus >= 1 and (address is not None or _cuda_usable())
            if device == "cuda" and not use_gpu:
                raise CellsegError("--device cuda: the Ray cluster has no usable GPU; use --device cpu or auto")
            n_act, c_act, threads = plan_resources(cpus, gpus, use_gpu, num_actors, cpus_per_actor)
            per_call = images_per_call or max(1, min(MAX_IMAGES_PER_CALL, math.ceil(len(todo) / (4 * n_act))))
            blocks = max(1, math.ceil(len(todo) / per_call))
            n_act = min(n_act, blocks)  # an actor with no block would sit idle (and Ray warns about it)
            engine.update(
                actors=n_act, cpus_per_actor=c_act, gpus_per_actor=1 if use_gpu else 0, threads_per_actor=threads,
                images_per_call=per_call, cluster_cpus=cpus, cluster_gpus=gpus,
                init_seconds=round(time.perf_counter() - t_init, 3),
            )
            start, start_wall = time.perf_counter(), time.time()
            launched = True  # from here on actors may write outputs
            with _quiet_ray_data():
                paths = [abs_paths[i] for i in todo]
                ds = _read_files(ray, paths, blocks=blocks)
                ds = _map_segmenter(
                    ds, ray, local=address is None,
                    fn_constructor_kwargs=dict(
                        model_bytes=model_bytes, model_name=str(onnx_path), device="cuda" if use_gpu else "cpu",
                        threads=threads, root=str(_abs(inputs.root)), out=str(out), stems=stems, opts=opts,
                        tta=tta, scale=scale,
                    ),
                    compute=ray.data.ActorPoolStrategy(size=n_act, max_tasks_in_flight_per_actor=2),
                    num_cpus=c_act,
                    num_gpus=1 if use_gpu else None,
                    batch_size=per_call,
                    batch_format="numpy",
                )
                for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    if first_result is None:
                        first_result = time.perf_counter() - start
                        engine["first_result_images"] = len(b["path"])
                    for j in range(len(b["path"])):
                        i = index_of.get(str(b["path"][j]), index_of.get(str(_abs(str(b["path"][j])))))
                        if i is None or i in seen:
                            continue
                        seen.add(i)
                        worker = str(b["worker"][j])
                        workers.add(worker)
                        secs = float(b["seconds"][j])
                        done_at.append(float(b["done_at"][j]) - start_wall)
                        if b["status"][j] == "ok":
                            objects = int(b["objects"][j])
                            h, w = int(b["height"][j]), int(b["width"][j])
                            summary.processed += 1
                            summary.objects += objects
                            summary.megapixels += h * w / 1e6
                            summary.provider = str(b["provider"][j])
                            summary.images.append({
                                "input": abs_paths[i], "masks": str(plans[i]["masks"].relative_to(out)),
                                "height": h, "width": w, "objects": objects,
                            })
                            manifest.append({"path": abs_paths[i], "status": "ok", "error": None, "n_objects": objects, "seconds": secs, "worker": worker})
                        else:
                            reason = str(b["error"][j]) or "failed"
                            summary.failed.append((display[i], reason))
                            manifest.append({"path": abs_paths[i], "status": "failed", "error": reason, "n_objects": None, "seconds": secs, "worker": worker})
                        if bar is not None:
                            rate = len(seen) / max(time.perf_counter() - start, 1e-9)
                            n_failed = len(summary.failed)
                            bar.update(task, advance=1, rate=f"{rate:.2f}", failed=f"[red]{n_failed} failed" if n_failed else "")
    except BaseException as exc:
        # e.g. no cluster at --address: leave no folder that holds nothing (once actors were
        # launched they may write outputs: then the provisional summary stays, marking them)
        with contextlib.suppress(OSError):
            if created and not launched and {p.name for p in out.iterdir()} <= {SUMMARY_NAME}:
                (out / SUMMARY_NAME).unlink(missing_ok=True)
                out.rmdir()
        if isinstance(exc, (CellsegError, KeyboardInterrupt)) or not isinstance(exc, Exception):
            raise
        keep_logs = True
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        logs = f"; Ray logs in {session.temp_root}" if session is not None and session.temp_root else ""
        raise CellsegError(f"the Ray job failed ({type(exc).__name__}: {first}){logs}") from None
    finally:
        if bar is not None and todo:
            bar.__exit__(None, None, None)
        if session is not None:
            session.close(keep_logs=keep_logs)

    for i in todo:  # defensive: a row Ray never returned
        if i not in seen:
            summary.failed.append((display[i], "not processed (no result from the Ray job)"))
            manifest.append({"path": abs_paths[i], "status": "failed", "error": "not processed (no result from the Ray job)", "n_objects": None, "seconds": None, "worker": None})

    summary.finalize(time.perf_counter() - start if todo else 0.0)
    engine["first_result_seconds"] = None if first_result is None else round(first_result, 3)
    engine["first_image_done_s"] = round(min(done_at), 3) if done_at else None
    engine["last_image_done_s"] = round(max(done_at), 3) if done_at else None
    engine["workers"] = sorted(workers)
    summary.engine = engine
    manifest.sort(key=lambda r: r["path"])
    _write_manifest(out / MANIFEST_NAME, manifest)
    text = json.dumps(summary.to_dict(), indent=2)
    atomic_write(out / SUMMARY_NAME, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return summary


def _cuda_usable() -> bool:
    from cellseg.inference import cuda_usable

    return cuda_usable()


def read_manifest(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of `out_dir/manifest.parquet` as dicts (path, status, error, n_objects, seconds, worker)."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(out_dir) / MANIFEST_NAME).to_pylist()


__all__ = [
    "MANIFEST_NAME",
    "NEED_RAY",
    "Inputs",
    "RayInferSummary",
    "decode_bytes",
    "plan_resources",
    "read_manifest",
    "resolve_inputs",
    "segment_with_ray",
]
