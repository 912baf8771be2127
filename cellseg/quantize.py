"""int8 copies of an exported model (onnxruntime static QDQ quantisation), and when to use one.

On CPUs with int8 dot-product instructions (VNNI, AMX) the int8 model runs about 1.4x faster
than fp32 for a mAP change of a few thousandths (`make bench`: bench/infer.py, bench/int8.py); on CPUs without
them it is slower, and CUDA runs the fp32 model. `prefer_int8` says which case a machine is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellseg.data.io import atomic_write, normalize_percentile, read_image
from cellseg.errors import CellsegError

SOURCE_KEY = "cellseg.quantized_from"  # sha256 of the fp32 file an int8 copy was made from
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo flags of int8 dot products
CALIBRATION_SIDE = 256


def cpu_int8_flags(cpuinfo: str | None = None) -> set[str]:
    """The int8 dot-product flags this CPU reports (Linux /proc/cpuinfo; empty elsewhere)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split()) & set(INT8_FLAGS)
    return set()


def prefer_int8(device: str = "auto", cpuinfo: str | None = None) -> bool:
    """True when inference runs on the CPU provider of a CPU with int8 dot-product instructions."""
    from cellseg.inference import CPU, available_providers

    return available_providers(device)[0] == CPU and bool(cpu_int8_flags(cpuinfo))


def calibration_images(root: str | Path, low: float, high: float, invert_bright: bool, n: int = 32,
                       val_fraction: float = 0.2, multiple: int = 8, channel: int | None = None) -> list[np.ndarray]:
    """Normalised top-left crops (at most 256², cut to `multiple`) of the first n training-split
    images of an images/ + masks/ dataset (`channel` of multi-channel ones, as the model reads them):
    what the quantiser calibrates activation ranges on."""
    from cellseg.evaluate import select_pairs

    pairs = select_pairs(Path(root), "train", val_fraction)[:n]
    if not pairs:
        raise CellsegError(f"{root}: no training-split images to calibrate on")
    crops = []
    for _, image_path, _ in pairs:
        img = normalize_percentile(read_image(image_path, channel=channel), low, high, invert_bright)
        h, w = (min(s, CALIBRATION_SIDE) // multiple * multiple for s in img.shape)
        if h and w:
            crops.append(np.ascontiguousarray(img[:h, :w], dtype=np.float32))
    if not crops:
        raise CellsegError(f"{root}: every calibration image is smaller than {multiple} px")
    return crops


def preprocessed(src: str | Path, dst: str | Path) -> Path:
    """onnxruntime's quantisation pre-processing (shape inference, folding) of `src` written to
    `dst`; returns `dst`, or `src` itself when pre-processing fails (it is an optimisation only)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception:  # noqa: BLE001
        return Path(src)
    return Path(dst)


def quantize_static(src: str | Path, dst: str | Path, calibration: list[np.ndarray],
                    pre: str | Path | None = None) -> Path:
    """Write an int8 QDQ copy of the cellseg model `src` to `dst` (per-channel int8 weights, uint8
    activations calibrated on `calibration` (H, W) images); metadata is kept, precision "int8".
    `pre`: `src` already pre-processed by `preprocessed` (else it is done here)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    from cellseg.inference import read_cellseg_onnx

    src, dst = Path(src), Path(dst)
    source, meta = read_cellseg_onnx(src)
    if meta.get("cellseg.precision", "fp32") != "fp32":
        raise CellsegError(f"{src}: precision {meta['cellseg.precision']}; quantise the fp32 export")
    name = source.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({name: c[None, None]} for c in calibration)

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "int8.onnx"
        if pre is None:
            pre = preprocessed(src, Path(tmp) / "pre.onnx")
        ort_quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        proto = onnx.load(str(out))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {**meta, "cellseg.precision": "int8", SOURCE_KEY: file_digest(src)})
    atomic_write(dst, lambda tmp_path: onnx.save(proto, tmp_path), in_place=True)
    return dst


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_copy_of(int8_metadata: dict, fp32_path: str | Path) -> bool:
    """True when an int8 model (its metadata) was quantised from exactly this fp32 file; a copy
    left from an earlier model, or one whose source was re-tuned since, is stale."""
    return int8_metadata.get(SOURCE_KEY) == file_digest(fp32_path)


def int8_path(path: str | Path) -> Path:
    """Where the int8 copy of a model lives: NAME.onnx -> NAME.int8.onnx."""
    path = Path(path)
    return path.with_name(path.stem + ".int8.onnx")
