"""Tiled inference over whole images: onnxruntime or PyTorch models, Gaussian-blended tiles.

Plain functions over numpy arrays; the model is passed in. A model is any callable
(N, C, h, w) float32 -> (N, 3, h, w) float32 logits with a `size_multiple` attribute
(`OnnxModel`, `TorchModel`, or a test double). The tiling follows MONAI's
`sliding_window_inference` and nnU-Net's Gaussian importance map (sigma = tile/8):

* the normalised image is mirror-padded (reflect, as in the U-Net paper) by `margin` pixels
  on every side, so border pixels get mirrored context rather than the network's zero padding,
  and further at the bottom/right up to the network's size multiple;
* tiles of the (multiple-rounded) tile size start at multiples of the size multiple, so every
  tile sees the same pooling grid as a whole-image pass would;
* each tile's softmax probabilities are weighted by the Gaussian window and summed into one
  (3, H, W) float32 accumulator per image, then divided by the summed weights. Probabilities,
  not logits, are blended: each tile then contributes a bounded vote, and one over-confident
  tile edge cannot dominate its neighbours;
* tiles of several images share batches (`TileBatcher`, `predict_many`).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

import numpy as np

from cellseg.defaults import DEFAULT_BATCH, DEFAULT_TILE
from cellseg.errors import CellsegError
from cellseg.postprocess import check_postprocess

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
DEFAULT_MARGIN = 32  # px of mirrored context around the image; rounded up to the size multiple

_MIN_WEIGHT = 1e-3  # floor of the Gaussian window, relative to its centre

_GRAPH_OPT = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# the `cellseg.format` tag of exported models; equal to cellseg.export.FORMAT, repeated here because
# cellseg.export imports torch (~190 MB of RSS and seconds of start-up an ONNX-only run does not need)
ONNX_FORMAT = "cellseg-unet-onnx/1"
MIN_SCALE, MAX_SCALE = 0.1, 10.0  # range of Rescaled's zoom factor (`--scale`)
POSTPROCESS_KEY = "cellseg.postprocess"  # metadata: JSON post-processing options tuned for the model
POSTPROCESS_BRIGHT_KEY = "cellseg.postprocess_bright"  # metadata: the same, for images inverted as bright-background


# ----------------------------------------------------------------------------------------- devices


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when the NVIDIA driver loads and reports a GPU.

    onnxruntime-gpu lists CUDAExecutionProvider whether or not a GPU or CUDA is present, and
    asking it for CUDA on a machine without one prints errors. The driver is asked directly
    through ctypes instead: silent, and no torch CUDA build needed.
    """
    import ctypes

    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        try:
            if lib.cuInit(0) != 0:
                return False
            count = ctypes.c_int(0)
            return lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
        except AttributeError:
            return False
    return False


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once); the `threads=0` default.

    onnxruntime's own default (intra_op_num_threads = 0) is the same count, but it also pins its
    threads to cores; with other work on the machine a pinned thread waits for its busy core and
    the session runs at one thread's speed (2-vCPU KVM guest, bench/infer.py: CPU time = wall time,
    1.45x slower than 2 explicit threads; on the idle machine both are equal). An explicit count is
    not pinned. The CPUs of the affinity mask are grouped by /sys/.../topology/thread_siblings_list
    (each CPU its own core where that file is missing).
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(f"cpu{cpu}")
    return max(1, len(cores))


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise CellsegError(f"--device {device}: expected auto, cpu, cuda or cuda:N")


def available_providers(device: str = "auto", tensorrt: bool = False) -> list[str]:
    """onnxruntime execution providers to use, best first (always ending with the CPU provider).

    device: "cpu" -> CPU only; "auto" -> CUDA first when a GPU is really usable; "cuda"/"cuda:N"
    -> CUDA, CellsegError when it is not usable. `tensorrt` puts TensorRT before CUDA
    (CellsegError when TensorRT or a GPU is missing).
    """
    import onnxruntime as ort

    _check_device(device)
    listed = ort.get_available_providers()
    gpu = CUDA in listed and cuda_usable()
    if device == "cpu":
        if tensorrt:
            raise CellsegError("--tensorrt needs a GPU; drop --device cpu")
        return [CPU]
    if device.startswith("cuda") and not gpu:
        why = "onnxruntime has no CUDA provider (install onnxruntime-gpu)" if CUDA not in listed else "no usable NVIDIA GPU/driver found"
        raise CellsegError(f"--device {device}: {why}; use --device cpu or auto")
    providers = [CUDA, CPU] if gpu else [CPU]
    if tensorrt:
        if not gpu or TENSORRT not in listed:
            raise CellsegError("--tensorrt: onnxruntime's TensorRT provider or a usable GPU is missing")
        providers.insert(0, TENSORRT)
    return providers


# ------------------------------------------------------------------------------------------ models


def _pad_batch(batch: np.ndarray, multiple: int) -> tuple[np.ndarray, int, int]:
    """Reflect-pad (N, C, h, w) at the bottom/right to multiples of `multiple`; returns (padded, h, w)."""
    h, w = batch.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        batch = np.pad(batch, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")
    return batch, h, w


def _check_batch(batch: np.ndarray, in_channels: int) -> np.ndarray:
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if batch.ndim != 4 or batch.shape[1] != in_channels:
        raise CellsegError(f"model input of shape {batch.shape}; expected (N, {in_channels}, H, W)")
    return batch


def _existing_file(path: str | Path) -> Path:
    """`path` as a Path; CellsegError when it is missing or a folder."""
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"{path}: no such file" if not path.exists() else f"{path}: is a folder, not an ONNX model")
    return path


def read_cellseg_onnx(path: str | Path, load_external_data: bool = True):
    """(onnx ModelProto, its metadata dict) of an exported cellseg model; CellsegError naming the
    file when it is missing, not ONNX, not a cellseg export, or of another export format."""
    import onnx

    path = _existing_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=load_external_data)
    except OSError as exc:  # unreadable file
        raise CellsegError(f"{path}: cannot read the model ({type(exc).__name__}: {exc.strerror or exc})") from None
    except onnx.checker.ValidationError as exc:  # e.g. its external weight data is missing
        raise CellsegError(f"{path}: ONNX model with unreadable weights ({str(exc).splitlines()[0]})") from None
    except Exception:  # noqa: BLE001  (protobuf raises several types for a bad file)
        proto = None
    if proto is None or proto.ir_version == 0 or not proto.graph.node:
        raise CellsegError(f"{path}: not an ONNX model")
    meta = {p.key: p.value for p in proto.metadata_props}
    check_cellseg_metadata(path, meta)
    return proto, meta


def check_cellseg_metadata(path: Path, meta: dict) -> None:
    """CellsegError naming the file unless `meta` (an ONNX file's metadata) is a cellseg export of this format."""
    if "cellseg.format" not in meta:
        raise CellsegError(f"{path}: not a cellseg model (missing cellseg metadata)")
    if meta["cellseg.format"] != ONNX_FORMAT:
        raise CellsegError(
            f"{path}: model format '{meta['cellseg.format']}' is not '{ONNX_FORMAT}'; "
            "export it with this version of cellseg (cellseg export)"
        )


class OnnxModel:
    """An exported cellseg model run by onnxruntime: (N, C, h, w) float32 -> (N, 3, h, w) float32 logits.

    The file is validated when constructed (before any image is read). Attributes:
    size_multiple, low_percentile, high_percentile, invert_bright, in_channels, channel (of
    multi-channel images, the one it was trained on; None: colours averaged), provider (actually
    used), postprocess (options tuned for the model, `cellseg tune`), postprocess_bright (those
    for images inverted as bright-background; {} when none are stored), run_id (None if not
    recorded), metadata (all metadata_props).

    Session defaults (bench/infer.py measures each): graph optimisation "all" (NCHWc layouts and
    fusions: ~1.4x the throughput of "basic" on x86); `threads` 0 = one per physical core
    (`physical_cores()`, passed explicitly: onnxruntime's own default pins its threads to cores and
    ran at one thread's speed while other work used a core);
    `mem_pattern` off: onnxruntime's memory pattern pre-plans one block per input shape for every
    activation and about doubles the resident memory of a batch of tiles (1.3 GB vs 0.6 GB for 8
    tiles of 512x512, depth 3, base 16) for no speed gain; `spinning` off: idle intra-op threads
    sleep instead of busy-waiting, leaving the cores to the image reading and post-processing
    threads that run beside the model (and to other processes on a shared machine);
    `mem_arena` (onnxruntime's CPU arena, which keeps the largest batch's activations for the
    session's lifetime) on.
    """

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        threads: int = 0,
        graph_opt: str = "all",
        tensorrt: bool = False,
        *,
        mem_pattern: bool = False,
        spinning: bool = False,
        mem_arena: bool = True,
    ):
        import onnxruntime as ort

        self.path = path = Path(path)
        if graph_opt not in _GRAPH_OPT:
            raise CellsegError(f"--graph-opt {graph_opt}: expected one of {', '.join(_GRAPH_OPT)}")
        check_threads(threads)
        _existing_file(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _GRAPH_OPT[graph_opt])
        opts.intra_op_num_threads = threads or physical_cores()  # 0: all physical cores (see physical_cores)
        opts.log_severity_level = 3  # errors only: no per-node placement warnings
        opts.enable_mem_pattern = mem_pattern
        opts.enable_cpu_mem_arena = mem_arena
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        providers: list[Any] = available_providers(device, tensorrt)
        if device.startswith("cuda:"):
            providers = [(p, {"device_id": int(device[5:])}) if p in (CUDA, TENSORRT) else p for p in providers]
        # the file is checked from onnxruntime's own view of it: the onnx package (0.6 s to import)
        # is loaded only to say what is wrong with a file onnxruntime refuses
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as exc:
            read_cellseg_onnx(path, load_external_data=False)  # not ONNX / not cellseg / other format: says so
            raise CellsegError(f"{path}: onnxruntime cannot load the model ({str(exc).splitlines()[0][:200]})") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        check_cellseg_metadata(path, meta)
        self._check_signature()
        try:
            self.size_multiple = int(meta["cellseg.size_multiple"])
            self.low_percentile = float(meta["cellseg.low_percentile"])
            self.high_percentile = float(meta["cellseg.high_percentile"])
            self.invert_bright = meta.get("cellseg.invert_bright", "0") == "1"
            self.postprocess = check_postprocess(json.loads(meta.get(POSTPROCESS_KEY) or "{}"), f"{path}: {POSTPROCESS_KEY}")
            self.postprocess_bright = check_postprocess(json.loads(meta.get(POSTPROCESS_BRIGHT_KEY) or "{}"),
                                                        f"{path}: {POSTPROCESS_BRIGHT_KEY}")
            self.in_channels = int(meta["cellseg.in_channels"])
            self.channel = int(meta["cellseg.channel"]) if meta.get("cellseg.channel") else None
        except (KeyError, ValueError, AttributeError) as exc:
            raise CellsegError(f"{path}: incomplete cellseg metadata ({exc}); re-export the model") from None
        self.run_id = meta.get("cellseg.run_id") or None
        self.metadata = meta
        self.provider = self.session.get_providers()[0]
        if device.startswith("cuda") and self.provider not in (CUDA, TENSORRT):
            raise CellsegError(f"--device {device}: onnxruntime could not start CUDA (missing CUDA/cuDNN libraries?); use --device cpu")
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def _check_signature(self) -> None:
        def dims(arg):
            return [d if isinstance(d, int) else None for d in arg.shape]

        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()  # initializers are not inputs here
        ok = (
            len(inputs) == 1
            and len(outputs) == 1
            and len(dims(inputs[0])) == 4
            and inputs[0].type == "tensor(float)"
            and len(dims(outputs[0])) == 4
            and dims(outputs[0])[1] == 3
        )
        if not ok:
            raise CellsegError(
                f"{self.path}: unexpected model signature (expected one float32 (N, C, H, W) input "
                "and one (N, 3, H, W) output); re-export it with cellseg export"
            )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, h, w) float32 -> (N, 3, h, w) float32 logits; h, w padded to the size multiple inside."""
        x, h, w = _pad_batch(_check_batch(batch, self.in_channels), self.size_multiple)
        out = self.session.run([self._output], {self._input: x})[0]
        return out[..., :h, :w]

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, provider={self.provider!r})"


class TorchModel:
    """A PyTorch U-Net behind the OnnxModel interface (eval mode, no grad), for comparisons.

    The network is moved to `device` and put in eval mode (in place). `cfg` supplies the
    percentiles (defaults when None).
    """

    def __init__(self, net, cfg=None, run_id: str | None = None, device: str = "auto"):
        import torch

        from cellseg.config import Config
        from cellseg.export import first_conv_in_channels, model_metadata

        _check_device(device)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise CellsegError(f"--device {device}: this PyTorch build sees no CUDA GPU; use --device cpu")
        self.device = torch.device(device)
        self.net = getattr(net, "module", net).to(self.device).eval()
        cfg = cfg if cfg is not None else Config()
        self.size_multiple = int(getattr(self.net, "size_multiple", 1))
        self.in_channels = first_conv_in_channels(self.net)
        self.low_percentile = float(cfg.data.low_percentile)
        self.high_percentile = float(cfg.data.high_percentile)
        self.invert_bright = bool(cfg.data.invert_bright)
        self.channel = cfg.data.channel
        self.postprocess: dict = {}  # the thresholds' defaults; tuned ones live in exported models
        self.postprocess_bright: dict = {}
        self.run_id = run_id
        self.path: Path | None = None  # the checkpoint file, when loaded from one
        self.provider = f"torch:{self.device}"
        self.metadata = model_metadata(cfg, self.size_multiple, run_id, dataset_hash=getattr(self.net, "dataset_hash", None))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "TorchModel":
        """Build from a cellseg training checkpoint (weights + config + run id)."""
        from cellseg.export import load_net_from_checkpoint

        net, cfg, run_id = load_net_from_checkpoint(path)
        model = cls(net, cfg, run_id, device)
        model.path = Path(path)  # what reports name it by (`evaluate.model_name`)
        return model

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, h, w) float32 -> (N, 3, h, w) float32 logits; h, w padded to the size multiple inside."""
        import torch

        x, h, w = _pad_batch(_check_batch(batch, self.in_channels), self.size_multiple)
        with torch.inference_mode():
            out = self.net(torch.from_numpy(x).to(self.device))
        return out[..., :h, :w].float().cpu().numpy()

    def __repr__(self) -> str:
        return f"TorchModel(provider={self.provider!r})"


# -------------------------------------------------------------------------------------------- tiling


class FlipAverage:
    """Test-time augmentation: the model's logits averaged over the tile and its horizontal,
    vertical and double flips (4 passes: 4x the compute). Other attributes are the model's."""

    FLIPS = ((), (-1,), (-2,), (-2, -1))

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        total = None
        for axes in self.FLIPS:
            x = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
            out = np.asarray(self.model(x), dtype=np.float32)
            out = np.flip(out, axes) if axes else out
            total = out.copy() if total is None else total + out
        return total / len(self.FLIPS)

    def __repr__(self) -> str:
        return f"FlipAverage({self.model!r})"


def check_threads(threads: int) -> int:
    """`threads` (`--threads`: 0 = one per physical core) when usable, else CellsegError. Each thread is an OS
    thread, so a count far past the CPUs (100000) would exhaust the process table, not run faster."""
    if threads < 0:
        raise CellsegError(f"--threads {threads}: expected 0 (all cores) or a positive number")
    if threads > (most := 4 * (os.cpu_count() or 1)):
        raise CellsegError(f"--threads {threads}: this machine has {os.cpu_count()} CPUs; use at most {most} (0 = one per physical core)")
    return threads


def check_scale(scale: float, name: str = "--scale") -> float:
    """`scale` as a float when it is a usable zoom factor (`--scale`), else CellsegError naming `name`."""
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise CellsegError(f"{name} {scale:g}: expected a zoom factor between {MIN_SCALE:g} and {MAX_SCALE:g}")
    return float(scale)


class Rescaled:
    """The model run on tiles zoomed by `scale` (its logits zoomed back to the tile's size), for
    images whose objects are 1/scale times the size of those the model was trained on: 0.5 for
    nuclei twice as large, 2 for half as large. Outputs stay at the image's resolution; the
    minimum object and seed sizes (the model's tuned values, else the defaults), in the model's
    pixels, become size / scale² image pixels. `zoom` tells the tiler to widen its mirrored margin
    to margin / scale image pixels. Other attributes are the model's."""

    def __init__(self, model, scale: float):
        self.model, self.scale = model, check_scale(scale)

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    @property
    def zoom(self) -> float:
        return self.scale * float(getattr(self.model, "zoom", 1.0))

    @property
    def postprocess(self) -> dict:
        return self._zoomed(getattr(self.model, "postprocess", None) or {})

    @property
    def postprocess_bright(self) -> dict:
        stored = getattr(self.model, "postprocess_bright", None)
        return self._zoomed(stored) if stored else {}

    def _zoomed(self, stored: dict) -> dict:
        from cellseg.postprocess import DEFAULT_SIZES

        params = {**DEFAULT_SIZES, **stored}
        for key in DEFAULT_SIZES:  # a filter that was on stays on (at least 1 px)
            params[key] = max(int(params[key] > 0), int(round(params[key] / self.scale**2)))
        return params

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import cv2

        n, c, h, w = batch.shape
        m = int(getattr(self.model, "size_multiple", 1) or 1)
        # the exact zoom (the model pads to its size multiple); at least one multiple, so padding can reflect
        zh, zw = (max(m, int(round(side * self.scale))) for side in (h, w))
        down, up = cv2.INTER_AREA, cv2.INTER_LINEAR  # area-average when shrinking, linear when enlarging
        zoomed = np.stack([np.stack([cv2.resize(t, (zw, zh), interpolation=down if self.scale < 1 else up) for t in tile]) for tile in batch])
        out = np.asarray(self.model(zoomed), dtype=np.float32)
        return np.stack([np.stack([cv2.resize(t, (w, h), interpolation=up if self.scale < 1 else down) for t in tile]) for tile in out])

    def __repr__(self) -> str:
        return f"Rescaled({self.model!r}, {self.scale:g})"


def read_channel(model, channel: int | None = None) -> int | None:
    """The channel of multi-channel images to segment: `channel` (`--channel`) when given, else the
    one the model was trained on (None: colours averaged, stain channels refused)."""
    return channel if channel is not None else getattr(model, "channel", None)


def with_settings(model, tta: bool = False, scale: float = 1.0):
    """`model` behind the test-time wrappers that `--tta` and `--scale` ask for (flips inside the zoom)."""
    if tta:
        model = FlipAverage(model)
    if scale != 1:
        model = Rescaled(model, scale)
    return model


def image_tile(tile: int, scale: float) -> int:
    """Tile side in image px whose zoom by `scale` is `tile` model px (the model sees the usual tile
    and overlap whatever the zoom)."""
    return max(16, round(tile / scale))


def wrapper_settings(model) -> dict:
    """{'tta': flips averaged, 'scale': zoom} of a model behind FlipAverage / Rescaled wrappers."""
    tta, scale = False, 1.0
    while model is not None:
        if isinstance(model, FlipAverage):
            tta = True
        elif isinstance(model, Rescaled):
            scale *= model.scale
        model = model.__dict__.get("model") if isinstance(model, (FlipAverage, Rescaled)) else None
    return {"tta": tta, "scale": scale}


@functools.lru_cache(maxsize=16)
def gaussian_window(tile: tuple[int, int], sigma_scale: float = 1 / 8) -> np.ndarray:
    """nnU-Net importance map for a (th, tw) tile: Gaussian, sigma = side * sigma_scale.

    (th, tw) float32, 1 at the centre, floored at 1e-3 so no pixel of a tile has zero weight
    (image corners covered by one tile corner still get a finite average). Cached per tile
    size and read-only: do not modify it.
    """
    axes = []
    for n in tile:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2
        axes.append(np.exp(-0.5 * (x / max(n * sigma_scale, 1e-6)) ** 2))
    w = np.outer(axes[0], axes[1])
    w = np.maximum(w / w.max(), _MIN_WEIGHT).astype(np.float32)
    w.setflags(write=False)
    return w


def tile_positions(size: int, tile: int, overlap: float, align: int = 1) -> list[int]:
    """Start offsets of tiles of side `tile` covering [0, size); the last tile ends at `size`.

    Tiles are spread evenly (nnU-Net style) with steps of at most tile * (1 - overlap), rounded
    down to a multiple of `align` (at least `align`, at least 1). Offsets are multiples of `align`
    when `size` and `tile` are (and tile >= align). size <= tile gives [0] (one tile, cropped or padded by the caller).
    """
    if not 0.0 <= overlap < 1.0:
        raise CellsegError(f"overlap {overlap}: expected 0 <= overlap < 1")
    if size <= 0 or tile <= 0 or align <= 0:
        raise CellsegError(f"tile_positions: size {size}, tile {tile}, align {align} must be positive")
    if size <= tile:
        return [0]
    span = size - tile
    if tile < align:  # a step of `align` would leave gaps
        align = 1
    step = max(align, int(tile * (1.0 - overlap)) // align * align, 1)
    n = math.ceil(span / step) + 1
    if span % align:  # unaligned sizes: spread by pixels, the last start is still exact
        align = 1
    units = span // align
    # round(i * units / (n - 1)) in integers; consecutive gaps stay <= step
    return [((2 * i * units + (n - 1)) // (2 * (n - 1))) * align for i in range(n)]


def balanced_tile(size: int, tile: int, overlap: float, align: int = 1) -> int:
    """The smallest tile side (a multiple of `align`, at most `tile`) that covers `size` with as
    few tiles as side `tile` would need.

    A 584 px axis needs two 512 px tiles (1024 px computed); two 312 px tiles cover it too
    (624 px): the same tile count, about half the pixels. size <= tile gives size itself.
    """
    if size <= tile:
        return size
    n = len(tile_positions(size, tile, overlap, align))
    side = min(tile, _round_up(math.ceil(size / (n - (n - 1) * overlap)), align))
    while side < tile and len(tile_positions(size, side, overlap, align)) > n:
        side += align
    return side


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _as_tile(tile: int | tuple[int, int]) -> tuple[int, int]:
    th, tw = (tile, tile) if isinstance(tile, (int, np.integer)) else tuple(tile)
    if th < 1 or tw < 1:
        raise CellsegError(f"tile {tile}: tile sides must be positive")
    return int(th), int(tw)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of (N, K, h, w), in place when possible."""
    if not logits.flags.writeable or logits.dtype != np.float32:
        logits = np.array(logits, dtype=np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def _reflect_index(n: int, before: int, total: int) -> np.ndarray:
    """Source index of each of `total` positions of an axis of length `n` mirror-padded by `before`
    in front: numpy's "reflect" (edge not repeated, reflections repeated when the pad exceeds n)."""
    if n == 1:
        return np.zeros(total, np.intp)
    period = 2 * (n - 1)
    i = np.mod(np.arange(-before, total - before), period)
    return np.where(i >= n, period - i, i).astype(np.intp)


def _span(start: int, length: int, lo: int, hi: int) -> tuple[int, int]:
    """The part [a, b) of [start, start + length) inside [lo, hi), relative to start."""
    return max(lo - start, 0), min(hi - start, length)


class ProbabilitySink:
    """Collects an image's (3, H, W) float32 probabilities as bands of finished rows arrive.

    The default sink of `predict_many`: its result is the whole probability array. A sink gets
    `write(r0, band)` calls for consecutive row bands (band: (3, rows, W) float32, the caller's
    buffer, to be copied or reduced before returning) and then `result()`.
    """

    def __init__(self, height: int, width: int):
        self.shape = (3, height, width)
        self.out: np.ndarray | None = None

    def write(self, r0: int, band: np.ndarray, owned: bool = False) -> None:
        if owned and r0 == 0 and band.shape == self.shape:  # the whole image in one band: keep it
            self.out = band
            return
        if self.out is None:
            self.out = np.empty(self.shape, np.float32)
        self.out[:, r0 : r0 + band.shape[1]] = band

    def result(self) -> np.ndarray:
        out, self.out = self.out, None
        return out


class MaskSink:
    """Thresholds each band of probabilities as it arrives: keeps two (H, W) bool masks (seeds,
    foreground) instead of (3, H, W) float32, 1/6 of the memory. Result: [seed_mask, foreground],
    the input of `postprocess.masks_to_instances`; with `keep_background` (for a `min_score`
    filter), [seed_mask, foreground, p(background) as float16] (1/3 of the memory)."""

    def __init__(self, height: int, width: int, interior_threshold: float = 0.5, foreground_threshold: float = 0.5,
                 keep_background: bool = False):
        self.seeds = np.zeros((height, width), bool)
        self.foreground = np.zeros((height, width), bool)
        self.background = np.empty((height, width), np.float16) if keep_background else None
        self.thresholds = (interior_threshold, foreground_threshold)

    def write(self, r0: int, band: np.ndarray, owned: bool = False) -> None:
        from cellseg.postprocess import threshold_probabilities

        seeds, fg = threshold_probabilities(band, *self.thresholds)
        r1 = r0 + band.shape[1]
        self.seeds[r0:r1], self.foreground[r0:r1] = seeds, fg
        if self.background is not None:
            self.background[r0:r1] = band[0]

    def result(self) -> list[np.ndarray]:
        """[seed_mask, foreground(, background)]: a list, so a consumer can pop the arrays and free each when done."""
        out = [self.seeds, self.foreground] + ([self.background] if self.background is not None else [])
        self.seeds = self.foreground = self.background = None
        return out


@dataclass(eq=False)
class _Job:
    """One image in flight: its pixels, a rolling accumulator and the tiles still to run.

    The mirror padding is virtual (tiles are gathered through reflected indices). Tiles run in
    row-major order; once a row of tiles is done, the image rows no later tile touches are
    final: they are divided by the summed windows and handed to the sink, and the accumulator
    keeps only the rows still open (a band a few tiles high, however tall the image).
    """

    key: Hashable
    image: np.ndarray  # (C, H, W) float32, the caller's pixels (not copied)
    rows: np.ndarray  # (Hp,) image row of each row of the padded frame
    cols: np.ndarray  # (Wp,) image column of each column of the padded frame
    margin: int  # the image starts at (margin, margin) of the padded frame
    tile: tuple[int, int]
    ys: list[int]  # tile rows (padded frame) that overlap the image
    xs: list[int]  # tile columns (padded frame) that overlap the image
    sink: Any  # ProbabilitySink, MaskSink or any object with write(r0, band) and result()
    remaining: int
    seq: int = field(default=0)
    acc: np.ndarray | None = None  # (3, rows, W): image rows [acc_row0, acc_row0 + rows)
    acc_row0: int = 0
    row_left: list[int] = field(default_factory=list)  # tiles not yet added, per tile row
    open_row: int = 0  # first tile row not complete

    def __post_init__(self) -> None:
        self.row_left = [len(self.xs)] * len(self.ys)

    @property
    def height(self) -> int:
        return self.image.shape[1]

    def patch(self, y: int, x: int) -> np.ndarray:
        """The (C, th, tw) tile at (y, x) of the padded frame."""
        th, tw = self.tile
        m = self.margin
        _, h, w = self.image.shape
        if m <= y and y + th <= m + h and m <= x and x + tw <= m + w:
            return self.image[:, y - m : y - m + th, x - m : x - m + tw]
        return self.image[:, self.rows[y : y + th, None], self.cols[None, x : x + tw]]

    def _rows_of(self, y: int) -> tuple[int, int]:
        """Image rows [a, b) covered by a tile starting at padded row y."""
        return max(y - self.margin, 0), min(y + self.tile[0] - self.margin, self.height)

    def add(self, y: int, x: int, probs: np.ndarray, window: np.ndarray) -> None:
        """Accumulate a tile's (3, th, tw) probabilities (modified in place) over the image part."""
        th, tw = self.tile
        m = self.margin
        w = self.image.shape[2]
        a, b = self._rows_of(y)
        if self.acc is None or b > self.acc_row0 + self.acc.shape[1]:  # extend the band downwards
            grown = np.zeros((3, b - self.acc_row0, w), np.float32)
            if self.acc is not None:
                grown[:, : self.acc.shape[1]] = self.acc
            self.acc = grown
        ty0, ty1 = _span(y, th, m, m + self.height)
        tx0, tx1 = _span(x, tw, m, m + w)
        part = probs[:, ty0:ty1, tx0:tx1]
        part *= window[ty0:ty1, tx0:tx1]
        r = a - self.acc_row0
        self.acc[:, r : r + (ty1 - ty0), x + tx0 - m : x + tx1 - m] += part
        i = self.ys.index(y, self.open_row)
        self.row_left[i] -= 1
        self.remaining -= 1
        while self.open_row < len(self.ys) and self.row_left[self.open_row] == 0:
            self.open_row += 1
        final = self._rows_of(self.ys[self.open_row])[0] if self.open_row < len(self.ys) else self.height
        if final > self.acc_row0:
            self._emit(final)

    def _emit(self, final: int) -> None:
        """Normalise image rows [acc_row0, final) by the summed windows and hand them to the sink."""
        th, tw = self.tile
        m = self.margin
        w = self.image.shape[2]
        r0 = self.acc_row0
        whole = r0 == 0 and final == self.height and self.acc.shape[1] == final
        band_rows = max(1, (1 << 22) // max(w, 1))  # window sums ~16 MB at a time
        for b0 in range(r0, final, band_rows):
            b1 = min(final, b0 + band_rows)
            wsum = np.zeros((b1 - b0, w), np.float32)
            for y in self.ys:
                ty0, ty1 = _span(y, th, m + b0, m + b1)
                if ty0 >= ty1:
                    continue
                for x in self.xs:
                    tx0, tx1 = _span(x, tw, m, m + w)
                    wsum[y + ty0 - m - b0 : y + ty1 - m - b0, x + tx0 - m : x + tx1 - m] += gaussian_window(self.tile)[ty0:ty1, tx0:tx1]
            self.acc[:, b0 - r0 : b1 - r0] /= wsum
        if whole:  # a single band (most images): no copy
            self.sink.write(0, self.acc, owned=True)
            self.acc = None
        else:
            self.sink.write(r0, self.acc[:, : final - r0])
            rest = self.acc[:, final - r0 :]
            self.acc = rest.copy() if rest.shape[1] else None
        self.acc_row0 = final

    def result(self):
        """The sink's result once every tile has been added; the job then holds nothing."""
        if self.acc_row0 < self.height:  # only if no tile touched the last rows (cannot happen)
            raise CellsegError(f"{self.key}: tiles left rows {self.acc_row0}..{self.height} uncovered")
        self.image = None
        return self.sink.result()


class TileBatcher:
    """A queue of tiles from several images, run through the model `batch_size` at a time.

    `add` queues an image's tiles (mirror padding is virtual: tiles are gathered from the image
    itself); `step` runs one batch (the oldest queued tile and up to batch_size - 1 more of the
    same tile shape, oldest first) and returns the images whose last tile it ran, as (key, result):
    by default (3, H, W) float32 probabilities; `sink(key, H, W)` may build another collector
    (`MaskSink`). Memory: the images in flight (referenced, not copied), each with a rolling
    accumulator a few tiles high, plus what its sink keeps; `predict_many` keeps fewer than a
    batch of tiles queued before adding another image.
    """

    def __init__(
        self,
        model: Callable[[np.ndarray], np.ndarray],
        tile: int | tuple[int, int] = DEFAULT_TILE,
        overlap: float = 0.125,
        batch_size: int = DEFAULT_BATCH,
        margin: int = DEFAULT_MARGIN,
        sink: Callable[[Hashable, int, int], Any] | None = None,
    ):
        if batch_size < 1:
            raise CellsegError(f"batch size {batch_size}: expected 1 or more")
        if margin < 0:
            raise CellsegError(f"margin {margin}: expected 0 or more pixels")
        if not 0.0 <= overlap < 1.0:
            raise CellsegError(f"overlap {overlap}: expected 0 <= overlap < 1")
        self.model = model
        self.sink = sink or (lambda key, h, w: ProbabilitySink(h, w))
        self.multiple = int(getattr(model, "size_multiple", 1) or 1)
        self.in_channels = int(getattr(model, "in_channels", 0) or 0)  # 0 = not checked
        self.tile = tuple(_round_up(t, self.multiple) for t in _as_tile(tile))
        self.overlap = overlap
        self.batch_size = batch_size
        # a margin that is a multiple of the size multiple keeps the image on the pooling grid; a
        # zoomed model (Rescaled) gets the same margin in its own pixels
        zoom = float(getattr(model, "zoom", 1.0) or 1.0)
        self.margin = _round_up(int(round(margin / zoom)), self.multiple)
        self._queue: deque[tuple[_Job, int, int]] = deque()
        self._seq = 0

    @property
    def pending(self) -> int:
        """Tiles queued and not yet run."""
        return len(self._queue)

    def add(self, key: Hashable, image: np.ndarray) -> None:
        """Queue the tiles of an (H, W) or (C, H, W) normalised float image (kept by reference until done)."""
        img = np.asarray(image, dtype=np.float32)
        if img.ndim == 2:
            img = img[None]
        if img.ndim != 3 or img.shape[1] == 0 or img.shape[2] == 0:
            raise CellsegError(f"{key}: image of shape {np.shape(image)}; expected (H, W) or (C, H, W) with pixels")
        if self.in_channels and img.shape[0] != self.in_channels:
            raise CellsegError(f"{key}: image has {img.shape[0]} channel(s), the model expects {self.in_channels}")
        _, h, w = img.shape
        m, mult = self.margin, self.multiple
        # the padded frame: the image mirrored by m px on every side, then to the size multiple
        hp, wp = _round_up(h + 2 * m, mult), _round_up(w + 2 * m, mult)
        # an image smaller than the tile is one tile of the padded image's size; a larger one
        # gets the smallest tiles that need no more tiles than the full size would
        th = balanced_tile(hp, self.tile[0], self.overlap, mult)
        tw = balanced_tile(wp, self.tile[1], self.overlap, mult)
        # tiles entirely in the margin add nothing to the image: they are not run
        ys = [y for y in tile_positions(hp, th, self.overlap, mult) if y < m + h and y + th > m]
        xs = [x for x in tile_positions(wp, tw, self.overlap, mult) if x < m + w and x + tw > m]
        job = _Job(
            key=key,
            image=img,
            rows=_reflect_index(h, m, hp),
            cols=_reflect_index(w, m, wp),
            margin=m,
            tile=(th, tw),
            ys=ys,
            xs=xs,
            sink=self.sink(key, h, w),
            remaining=len(ys) * len(xs),
            seq=self._seq,
        )
        self._seq += 1
        self._queue.extend((job, y, x) for y in ys for x in xs)

    def step(self) -> list[tuple[Hashable, np.ndarray]]:
        """Run one batch of tiles; return the (key, probabilities) of the images it finished."""
        if not self._queue:
            return []
        shape = self._queue[0][0].tile
        batch, rest = [], deque()
        while self._queue and len(batch) < self.batch_size:
            item = self._queue.popleft()
            (batch if item[0].tile == shape else rest).append(item)
        self._queue.extendleft(reversed(rest))
        th, tw = shape
        x = np.stack([job.patch(y, x0) for job, y, x0 in batch])
        logits = self.model(x)
        if np.shape(logits) != (len(batch), 3, th, tw):
            raise CellsegError(f"model returned shape {np.shape(logits)} for tiles of shape {x.shape}; expected (N, 3, H, W)")
        probs = _softmax(np.asarray(logits))
        window = gaussian_window(shape)
        done = []
        for p, (job, y, x0) in zip(probs, batch):
            job.add(y, x0, p, window)
            if job.remaining == 0:
                done.append(job)
        return [(job.key, job.result()) for job in sorted(done, key=lambda j: j.seq)]


def predict_many(
    model: Callable[[np.ndarray], np.ndarray],
    images: Iterable[tuple[Hashable, np.ndarray]],
    tile: int | tuple[int, int] = DEFAULT_TILE,
    overlap: float = 0.125,
    batch_size: int = DEFAULT_BATCH,
    margin: int = DEFAULT_MARGIN,
    sink: Callable[[Hashable, int, int], Any] | None = None,
) -> Iterator[tuple[Hashable, Any]]:
    """(key, (3, H, W) float32 softmax probabilities) for each (key, normalised image), tiles batched across images.

    With `sink` (a factory (key, H, W) -> collector, e.g. `MaskSink`), each result is that
    collector's `result()` instead: probabilities reach it band by band as rows are finished.
    Images are read from `images` lazily, only while fewer than `batch_size` tiles are queued, so
    memory is bounded by a batch of tiles plus the images in flight, whatever the image count.
    Results come in completion order: input order, except that an image whose tile shape differs
    (one smaller than the tile) may finish before or after its neighbours.
    """
    batcher = TileBatcher(model, tile, overlap, batch_size, margin, sink)
    for key, image in images:
        batcher.add(key, image)
        del image  # the batcher holds it until its last tile is run; no longer
        while batcher.pending >= batch_size:
            yield from batcher.step()
    while batcher.pending:
        yield from batcher.step()


def predict_tiled(
    model: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile: int | tuple[int, int] = DEFAULT_TILE,
    overlap: float = 0.125,
    batch_size: int = DEFAULT_BATCH,
    margin: int = DEFAULT_MARGIN,
) -> np.ndarray:
    """(3, H, W) float32 softmax probabilities (background, interior, boundary) for one normalised image.

    image: (H, W) (or (C, H, W)) float32, already percentile-normalised. tile: int or (th, tw) px,
    rounded up to the model's size multiple, shrunk to the padded image when larger. overlap:
    fraction of the tile shared by neighbours. margin: mirrored context px around the image.
    """
    ((_, probs),) = predict_many(model, [(None, image)], tile, overlap, batch_size, margin)
    return probs

