"""From a model spec (`--model`) to a loaded model with the OnnxModel interface.

Accepted specs:

* None or "default": the shipped model `models/cellseg-nuclei.onnx`, or its int8 copy
  `models/cellseg-nuclei.int8.onnx` on the CPU provider of a CPU with VNNI/AMX (`quantize.prefer_int8`);
* "onnx": the registered champion's ONNX (`models:/cellseg-unet@champion`), or the shipped
  model when no registry is reachable or it has no such champion;
* "torch": the champion's PyTorch weights (best.pt of its run);
* a path ending in .onnx (OnnxModel) or .pt (a cellseg training checkpoint, TorchModel);
* `models:/NAME@ALIAS` or `models:/NAME/VERSION`: that version's ONNX, else its run's best.pt;
* `runs:/RUN_ID` or a bare 32-hex run id: that run's best checkpoint.

The model is loaded completely here, so a bad spec fails before any image is read. The
returned OnnxModel/TorchModel gets two more attributes: `source` (default, file, registry, run)
and `describe` (one line naming what was loaded, for logs and reports).
"""

from __future__ import annotations

import re
from pathlib import Path

import cellseg
from cellseg import registry
from cellseg.errors import CellsegError

DEFAULT_MODEL = Path(cellseg.__file__).resolve().parents[1] / "models" / "cellseg-nuclei.onnx"
FORMS = (
    "'default' (the shipped model), 'onnx' (registered champion, ONNX), 'torch' (champion's PyTorch weights), "
    "PATH.onnx, PATH.pt, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID or a run id"
)
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_MODELS_URI = re.compile(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))/?")


def default_model(device: str = "auto", threads: int = 0):
    """The shipped model (its int8 copy where that is faster, see `quantize.prefer_int8`);
    CellsegError saying how to make one when the file is missing."""
    from cellseg.inference import OnnxModel
    from cellseg.quantize import cpu_int8_flags, int8_path, is_copy_of, prefer_int8

    path = Path(DEFAULT_MODEL)
    int8 = int8_path(path)
    stale = ""
    if path.is_file() and int8.is_file() and prefer_int8(device):
        try:
            quantised = OnnxModel(int8, device, threads)
        except CellsegError:
            quantised = None
        if quantised is not None and is_copy_of(quantised.metadata, path):
            why = ", ".join(sorted(cpu_int8_flags()))
            return _label(quantised, "default", f"shipped model {int8} (int8: this CPU has {why})")
        del quantised
        stale = f" ({int8.name} ignored: unreadable or not quantised from this file; rerun cellseg quantize)"
    if not path.is_file():
        raise CellsegError(
            f"no shipped model at {path}; train one (cellseg train DATA --config models/cellseg-nuclei.yaml), "
            f"export it there (cellseg export --run-id RUN_ID -o {path}), or pass --model PATH.onnx"
        )
    return _label(OnnxModel(path, device, threads), "default", f"shipped model {path}{stale}")


def _label(model, source: str, describe: str):
    model.source = source
    model.describe = describe
    return model


def _onnx(path: Path, device: str, threads: int, source: str, describe: str):
    from cellseg.inference import OnnxModel

    return _label(OnnxModel(path, device, threads), source, describe)


def _torch(path: Path, device: str, threads: int, source: str, describe: str):
    from cellseg.inference import TorchModel, check_threads

    if check_threads(threads) > 0:
        import torch

        torch.set_num_threads(threads)  # process-wide: PyTorch has no per-model thread setting
    return _label(TorchModel.from_checkpoint(path, device), source, describe)


def _version(name: str, alias: str | None, version: str | None, device: str, threads: int):
    """A registered version: its ONNX when attached, else the best checkpoint of its run."""
    mv = registry.get_version(name, alias=alias, version=version)
    where = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    what = f"{where} (version {mv.version}, run {mv.run_id}"
    onnx = registry.version_onnx(mv)
    if onnx is not None:
        return _onnx(onnx, device, threads, "registry", f"{what}, ONNX)")
    if not mv.run_id:
        raise CellsegError(f"{where}: version {mv.version} has no source run, so no checkpoint to load")
    return _torch(registry.run_checkpoint(mv.run_id), device, threads, "registry", f"{what}, PyTorch best.pt)")


def load_model(spec: str | None, device: str = "auto", threads: int = 0, tracking_uri: str | None = None):
    """Load the model named by `spec` (see the module docstring) on `device` with `threads` CPU threads.

    `tracking_uri` is used for registry and run specs (default: the current MLflow URI, i.e.
    MLFLOW_TRACKING_URI or sqlite:///mlflow.db). CellsegError for an unknown spec, a missing
    file, an unreachable registry (except for "onnx", which falls back to the shipped model).
    """
    spec = (spec or "default").strip()
    if spec == "default":
        return default_model(device, threads)
    if spec == "onnx":
        try:
            registry.connect(tracking_uri)
            path = registry.champion_onnx()
        except CellsegError as exc:
            model = default_model(device, threads)
            model.describe += f" (no registered champion ONNX: {exc})"
            model.fallback = f"--model onnx: no registered champion ONNX ({exc}); using the shipped model"
            return model
        return _onnx(path, device, threads, "registry", f"models:/{registry.MODEL_NAME}@{registry.ALIAS} ONNX ({path.name})")
    if spec == "torch":
        registry.connect(tracking_uri)
        mv = registry.get_version(registry.MODEL_NAME, registry.ALIAS)
        if not mv.run_id:
            raise CellsegError(f"models:/{registry.MODEL_NAME}@{registry.ALIAS} has no source run, so no checkpoint to load")
        describe = f"models:/{registry.MODEL_NAME}@{registry.ALIAS} (version {mv.version}, run {mv.run_id}, PyTorch best.pt)"
        return _torch(registry.run_checkpoint(mv.run_id), device, threads, "registry", describe)
    lowered = spec.lower()
    if lowered.endswith(".onnx"):
        return _onnx(Path(spec).expanduser(), device, threads, "file", spec)
    if lowered.endswith(".pt"):
        return _torch(Path(spec).expanduser(), device, threads, "file", spec)
    if spec.startswith("models:/"):
        m = _MODELS_URI.fullmatch(spec)
        if not m:
            raise CellsegError(f"--model {spec}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        registry.connect(tracking_uri)
        return _version(m.group(1), m.group(2), m.group(3), device, threads)
    run_id = spec[len("runs:/"):].split("/")[0] if spec.startswith("runs:/") else spec
    if _RUN_ID.fullmatch(run_id):
        registry.connect(tracking_uri)
        return _torch(registry.run_checkpoint(run_id), device, threads, "run", f"run {run_id} (PyTorch best.pt)")
    raise CellsegError(f"--model {spec}: not a model spec; use one of {FORMS}")
