"""cellseg as an MLflow pyfunc: exported ONNX in, instance label images out.

`CellsegPyfunc` wraps an exported ONNX file (artifact "onnx") and runs the same pipeline as
`cellseg predict`: percentile normalisation, tiled onnxruntime inference, instance post-processing.
`register_pyfunc` registers it as the `champion` version of the registered model, so

    mlflow models serve -m models:/cellseg-unet@champion --env-manager local

serves label images (see `CellsegPyfunc` for the request and response format). The registered
model's champion is therefore the pyfunc; its version tags point at the PyTorch model
(`torch_model_uri`) and the plain ONNX model (`onnx_model_uri`, `onnx_artifact`) of the same run
(see `cellseg.registry`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
import numpy as np
import pandas as pd

import cellseg
from cellseg import registry
from cellseg.defaults import DEFAULT_BATCH, DEFAULT_TILE
from cellseg.errors import CellsegError

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_RAW_MAGIC = (b"\x89PNG", b"\xff\xd8\xff") + _TIFF_MAGIC
DEFAULT_PARAMS = {"tile": DEFAULT_TILE, "overlap": 0.125, "batch_size": DEFAULT_BATCH, "scale": 1.0, "tta": False}


# ------------------------------------------------------------------------------------- encoding


def _as_bytes(value, where: str) -> bytes:
    """Raw image file bytes from base64 text, raw bytes, or a pyarrow binary scalar."""
    if hasattr(value, "as_py"):  # pyarrow scalar
        value = value.as_py()
    if isinstance(value, str):
        text = value.split(",", 1)[1] if value.startswith("data:") else value  # data: URLs too
        try:
            return base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError):
            raise CellsegError(f"{where}: not base64 text; send base64-encoded PNG or TIFF bytes") from None
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)  # Ray/pyarrow hand binary[pyarrow] values
        if data.startswith(_RAW_MAGIC):
            return data
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            return data  # let the decoder name the problem
    raise CellsegError(f"{where}: a {type(value).__name__}; expected base64 text or the bytes of a PNG/TIFF file")


def decode_image(value, where: str = "image", channel: int | None = None) -> np.ndarray:
    """(H, W) float32 raw intensities from an encoded image (base64 text or bytes of PNG/TIFF/JPEG) or an
    array, read as `cellseg infer` reads files (colours averaged; of stain channels, `channel`)."""
    from cellseg.data.io import as_image, decode_image as decode_file, image_shape
    from cellseg.resources import check_fits

    if isinstance(value, np.ndarray):  # colour images become the mean of their channels, as files do
        img = as_image(value, where, channel=channel)
    else:
        data = _as_bytes(value, where)
        if not data:
            raise CellsegError(f"{where}: empty image")
        shape = image_shape(data)
        if shape:  # refused from its header, before its pixels take the server's memory (as `cellseg infer`)
            check_fits(where, *shape)
        img = decode_file(data, where, channel, suffix=".tif" if data.startswith(_TIFF_MAGIC) else ".png")  # cv2 reads JPEG too
    if img.size == 0:
        raise CellsegError(f"{where}: image of shape {img.shape}; expected a 2-D grey or RGB image")
    check_fits(where, *img.shape)  # (a JPEG, or an array: no header read before)
    return img


def encode_labels(labels: np.ndarray) -> str:
    """Base64 of a zlib-compressed TIFF of the labels: uint16, or uint32 above 65535 objects."""
    import tifffile

    dtype = np.uint16 if labels.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32
    buf = io.BytesIO()
    tifffile.imwrite(buf, labels.astype(dtype), compression="zlib")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_labels(text: str | bytes) -> np.ndarray:
    """The label image of a response's `labels` value (the inverse of `encode_labels`)."""
    import tifffile

    return tifffile.imread(io.BytesIO(base64.b64decode(text)))


def encode_png(img: np.ndarray) -> str:
    """Base64 of a PNG of a uint8/uint16 grey image: a request's `image` value."""
    import cv2

    ok, buf = cv2.imencode(".png", np.asarray(img))
    if not ok:
        raise CellsegError(f"cannot encode an image of shape {np.shape(img)} and dtype {np.asarray(img).dtype} as PNG")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def example_image(size: int = 64) -> np.ndarray:
    """A small uint8 grey image with two bright disks: the logged input example."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 20, np.uint8)
    for cy, cx, r in ((size // 3, size // 3, size // 6), (2 * size // 3, 2 * size // 3, size // 5)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 200
    return img


# ---------------------------------------------------------------------------------------- model


class BadRequest(MlflowException, CellsegError):
    """A request the model cannot answer (bad image, shape or params): HTTP 400 with this message when served."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class CellsegPyfunc(mlflow.pyfunc.PythonModel):
    """Instance segmentation by an exported cellseg ONNX model (artifact "onnx"), as an MLflow pyfunc.

    Input: a pandas DataFrame with a column `image`, one image per row, each the base64 text
    of a PNG, TIFF or JPEG file, read as `cellseg infer` reads files (grey or RGB, RGB becoming
    the channel mean; of multi-channel stain TIFFs, the channel the model was trained on, and
    without one such a file is refused), or the file's raw bytes (`bytes`, `bytearray`,
    `memoryview`, pyarrow binary scalars as Ray hands them).
    Served, that is `{"dataframe_split": {"columns": ["image"], "data": [["<base64 png>"], ...]}}`
    POSTed to /invocations.

    Output: a DataFrame with one row per input row: `labels` (base64 of a zlib TIFF of the
    instance labels, uint16, or uint32 above 65535 objects, 0 = background; decode with
    `cellseg.serving.decode_labels`), `n_objects`, `height`, `width`.

    In Python (the wrapped model, `loaded.unwrap_python_model()`), a numpy array is accepted too:
    (H, W) returns an (H, W) int32 label array, (N, H, W) an (N, H, W) one; a last axis of 3 or 4
    is colour (RGB(A), averaged; of a model trained on one channel, that colour): (H, W, 3) is one
    image, (N, H, W, 3) N of them. Stain channels are not an array layout: pass the nuclear stain
    as (H, W), or the file's bytes. Raw intensities in every case: normalisation uses the
    percentiles stored in the ONNX file.

    Params (optional, per request), as `cellseg infer`'s options: tile (px of the model's input,
    default DEFAULT_TILE), overlap (0.125), batch_size (DEFAULT_BATCH), scale (zoom for the model,
    1.0: 2 when the objects are half the size of its training objects) and tta (flip averaging, false).
    Environment at load: CELLSEG_DEVICE (auto, cpu, cuda, cuda:N; default auto) and
    CELLSEG_THREADS (onnxruntime intra-op threads, 0 = one per physical core).
    """

    def load_context(self, context):
        from cellseg.inference import OnnxModel

        self.model = OnnxModel(
            context.artifacts["onnx"],
            device=os.environ.get("CELLSEG_DEVICE", "auto"),
            threads=int(os.environ.get("CELLSEG_THREADS", "0") or 0),
        )

    def _labels(self, images: list[np.ndarray], params: dict) -> list[np.ndarray]:
        from cellseg.data.io import normalize_flagged
        from cellseg.inference import check_scale, image_tile, predict_many, with_settings
        from cellseg.postprocess import model_postprocess, probabilities_to_instances

        m = self.model
        scale, tta, tile = check_scale(float(params["scale"]), "scale"), _as_flag(params["tta"]), int(params["tile"])
        if tile < 16:  # as `cellseg infer --tile`
            raise CellsegError(f"tile {tile}: expected at least 16 px")
        overlap = float(params["overlap"])
        if not 0.0 <= overlap <= 0.9:  # as `cellseg infer --overlap` (near 1 the tiles, and the time, grow without bound)
            raise CellsegError(f"overlap {overlap:g}: expected a number from 0 to 0.9")
        net = with_settings(m, tta, scale)
        bright: dict[int, bool] = {}

        def normalised():
            for i, img in enumerate(images):
                norm, bright[i] = normalize_flagged(img, m.low_percentile, m.high_percentile, getattr(m, "invert_bright", False))
                yield i, norm

        out: list = [None] * len(images)
        for i, probs in predict_many(net, normalised(), image_tile(tile, scale), overlap, int(params["batch_size"])):
            out[i] = probabilities_to_instances(probs, **model_postprocess(net, bright=bright[i]))
        return out

    # the hint names the served type; MLflow infers nothing from it (the logged signature rules)
    def predict(self, context, model_input: pd.DataFrame, params=None):
        """Labels for each image of `model_input` (a DataFrame, or an array: see the class docstring).

        Bad input raises `BadRequest` (a CellsegError and an MlflowException): served, an HTTP
        400 whose message ends with cellseg's one-line reason (MLflow puts a short view of the
        request before it), not MLflow's generic "unexpected error"."""
        try:
            return self._predict(model_input, params)
        except CellsegError as exc:
            if isinstance(exc, BadRequest):
                raise
            raise BadRequest(str(exc)) from None

    def _predict(self, model_input, params):
        params = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
        if isinstance(model_input, np.ndarray) and model_input.dtype != object:
            colour = model_input.ndim in (3, 4) and model_input.shape[-1] in (3, 4)  # RGB(A), channels last
            single = model_input.ndim == 2 + colour
            if model_input.ndim - colour not in (2, 3):
                raise CellsegError(f"input array of shape {model_input.shape}; expected (H, W) or (N, H, W), "
                                   "with a last axis of 3 or 4 for colour")
            stack = model_input[None] if single else model_input
            images = [decode_image(np.asarray(a), f"image {i}", self.model.channel) for i, a in enumerate(stack)]
            shape = stack.shape[1:3]
            labels = np.stack(self._labels(images, params)) if images else np.zeros((0, *shape), np.int32)
            return labels[0] if single else labels
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        elif isinstance(model_input, (list, tuple, np.ndarray)):
            model_input = pd.DataFrame({"image": list(model_input)})
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            have = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise CellsegError(f"input {have}: expected a DataFrame with a column 'image' of base64 PNG/TIFF bytes")
        images = [decode_image(v, f"row {i} of column 'image'", self.model.channel) for i, v in enumerate(model_input["image"].tolist())]
        labels = self._labels(images, params)
        return pd.DataFrame(
            {
                "labels": [encode_labels(lab) for lab in labels],
                "n_objects": [int(lab.max(initial=0)) for lab in labels],
                "height": [int(lab.shape[0]) for lab in labels],
                "width": [int(lab.shape[1]) for lab in labels],
            },
            index=model_input.index,
        )


def _as_flag(value) -> bool:
    """A boolean request param: a bool, or the text true/false (any case) or 1/0."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise CellsegError(f"tta {value!r}: expected true or false")


# -------------------------------------------------------------------------------------- logging


def pyfunc_signature():
    """DataFrame[image: string] -> DataFrame[labels, n_objects, height, width], params tile/overlap/batch_size/scale/tta."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),
        outputs=Schema([ColSpec("string", "labels"), ColSpec("long", "n_objects"), ColSpec("long", "height"), ColSpec("long", "width")]),
        params=ParamSchema(
            [
                ParamSpec("tile", "long", DEFAULT_PARAMS["tile"]),
                ParamSpec("overlap", "double", DEFAULT_PARAMS["overlap"]),
                ParamSpec("batch_size", "long", DEFAULT_PARAMS["batch_size"]),
                ParamSpec("scale", "double", DEFAULT_PARAMS["scale"]),
                ParamSpec("tta", "boolean", DEFAULT_PARAMS["tta"]),
            ]
        ),
    )


def serving_requirements() -> list[str]:
    """cellseg's model requirements plus what the pyfunc imports beyond them (onnx, tifffile, pydantic, pyyaml)."""
    from cellseg.tracking import pip_requirements

    reqs = list(pip_requirements())
    have = {r.split("=")[0].split(">")[0].split("<")[0].strip().lower() for r in reqs}
    reqs += [r for r in ("onnx", "tifffile", "pydantic", "pyyaml") if r not in have]
    return reqs


@contextlib.contextmanager
def _package_copy():
    """The cellseg package copied without __pycache__, for code_paths (so a bare environment imports it)."""
    src = Path(cellseg.__file__).resolve().parent
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "cellseg"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        yield dst


def _run_for(onnx_run_id: str | None) -> str | None:
    """The run recorded in an ONNX file, when it exists in the current store."""
    from mlflow.exceptions import MlflowException

    if not onnx_run_id:
        return None
    try:
        registry.connect().get_run(onnx_run_id)
        return onnx_run_id
    except (MlflowException, CellsegError):
        return None


def log_pyfunc(onnx_path: str | Path, run_id: str | None = None, registered_model_name: str | None = None):
    """Log `CellsegPyfunc` around `onnx_path` as the model "pyfunc"; returns MLflow's ModelInfo.

    Logged on run `run_id`; when None, on the active run, else on the run recorded in the ONNX
    file (if it is in this store), else without a run. The cellseg package goes with it
    (code_paths) so `mlflow models serve` works in an environment without cellseg installed.
    `registered_model_name` registers it without cellseg's version tags: prefer `register_pyfunc`.
    """
    from cellseg.inference import OnnxModel

    onnx_path = Path(onnx_path)
    model = OnnxModel(onnx_path, device="cpu", threads=1)  # refuse a bad file before logging anything
    if run_id is None and mlflow.active_run() is None:
        run_id = _run_for(model.run_id)
    example = pd.DataFrame({"image": [encode_png(example_image())]})
    from cellseg.tracking import failed_if_interrupted

    with _package_copy() as code, (registry.reopened_run(run_id) if run_id else contextlib.nullcontext()), failed_if_interrupted():
        return mlflow.pyfunc.log_model(
            name=registry.PYFUNC_MODEL,
            python_model=str(Path(cellseg.__file__).resolve().parent / "pyfunc_model.py"),  # models from code
            artifacts={"onnx": str(onnx_path)},
            pip_requirements=serving_requirements(),
            code_paths=[str(code)],
            input_example=example,
            signature=pyfunc_signature(),
            registered_model_name=registered_model_name,
        )


def register_pyfunc(
    run_id: str,
    name: str = registry.MODEL_NAME,
    alias: str = registry.ALIAS,
    metric: str = "val_map",
    onnx_path: str | Path | None = None,
):
    """Register the run's pyfunc as a new version of `name` and move `alias` to it; returns the ModelVersion.

    `onnx_path` is first attached to the run (`registry.attach_onnx`); without it the run must
    already have an ONNX attached. A pyfunc already logged on the run after its latest ONNX is
    reused, else one is logged. The version carries the tags of `registry.version_tags`
    (torch_model_uri, onnx_model_uri, best metrics, dataset hash, run id) and cellseg.flavor=pyfunc.
    """
    client = registry.connect()
    if onnx_path is not None:
        registry.attach_onnx(run_id, onnx_path, name=name)
    run = registry.get_run(client, run_id)
    if not registry.onnx_attached(run):
        raise CellsegError(
            f"run {run_id} has no ONNX model attached; export one (cellseg export) and pass it as onnx_path "
            "or attach it with cellseg.registry.attach_onnx"
        )
    onnx_lm = registry.logged_model(client, run_id, registry.ONNX_MODEL)
    pyfunc_lm = registry.logged_model(client, run_id, registry.PYFUNC_MODEL)
    if pyfunc_lm is not None and onnx_lm is not None and pyfunc_lm.creation_timestamp >= onnx_lm.creation_timestamp:
        uri = pyfunc_lm.model_uri
    else:
        artifact = run.data.tags[registry.RUN_ONNX_TAG]
        key = run.data.tags.get(registry.RUN_ONNX_URI_TAG, "").removeprefix("models:/") or f"run-{run_id}"
        local = registry.download_artifact(run_id, artifact, key)
        uri = log_pyfunc(local, run_id=run_id).model_uri
    return registry.register_model_uri(uri, run_id, name, alias, flavor="pyfunc", metric=metric)
