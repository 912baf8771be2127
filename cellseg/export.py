"""Export a trained U-Net to ONNX with the metadata inference needs, and check it against PyTorch.

The file is self-describing: `metadata_props` carry the normalisation percentiles, input
channels, size multiple, class names, run id and the full config, so `cellseg.inference.OnnxModel`
needs nothing but the file. Format tag: `cellseg.format` = "cellseg-unet-onnx/1".
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

import cellseg
from cellseg.checkpoint import load_checkpoint, unwrap_state_dict
from cellseg.config import Config, validate_config
from cellseg.data.io import atomic_write, replaceable
from cellseg.errors import CellsegError
from cellseg.model import UNet, build_model
from cellseg.postprocess import check_postprocess

from cellseg.inference import ONNX_FORMAT as FORMAT  # noqa: E402  one definition of the tag
from cellseg.inference import POSTPROCESS_BRIGHT_KEY, POSTPROCESS_KEY, read_cellseg_onnx  # noqa: E402

DATASET_KEY = "cellseg.dataset_hash"  # metadata: hash of the training dataset (cellseg.data.dataset.dataset_hash)
CLASSES = ("background", "interior", "boundary")
INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def _bare(net: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel/DataParallel wrapper, or the network itself."""
    return getattr(net, "module", net)


def first_conv_in_channels(net: nn.Module) -> int:
    """Input channels of the network (those of its first Conv2d)."""
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise CellsegError("network has no Conv2d layer: not a cellseg U-Net")
    return conv.in_channels


def _without_data_path(config: dict) -> dict:
    return {**config, "data": {**config.get("data", {}), "path": None}}


def model_metadata(
    cfg: Config, size_multiple: int, run_id: str | None, precision: str = "fp32", postprocess: dict | None = None,
    dataset_hash: str | None = None,
) -> dict[str, str]:
    """The `cellseg.*` key/value strings written into an exported model (and shown by TorchModel)."""
    meta = {
        "cellseg.format": FORMAT,
        "cellseg.version": cellseg.__version__,
        "cellseg.low_percentile": repr(float(cfg.data.low_percentile)),
        "cellseg.high_percentile": repr(float(cfg.data.high_percentile)),
        "cellseg.invert_bright": str(int(cfg.data.invert_bright)),
        "cellseg.in_channels": str(cfg.model.in_channels),
        "cellseg.classes": ",".join(CLASSES),
        "cellseg.size_multiple": str(int(size_multiple)),
        "cellseg.run_id": run_id or "",
        "cellseg.precision": precision,
        # the training data is identified by its hash (DATASET_KEY), not by a local path
        "cellseg.config": json.dumps(_without_data_path(cfg.model_dump()), sort_keys=True),
    }
    if cfg.data.channel is not None:  # trained on this channel of multi-channel images: read by default
        meta["cellseg.channel"] = str(cfg.data.channel)
    if postprocess:
        meta[POSTPROCESS_KEY] = json.dumps(check_postprocess(postprocess), sort_keys=True)
    if dataset_hash:  # `dataset.dataset_hash` of the training data: evaluate notes a report on it
        meta[DATASET_KEY] = dataset_hash
    return meta


def store_postprocess(path: str | Path, params: dict, bright: dict | None = None) -> Path:
    """Write post-processing options (e.g. thresholds tuned on validation data) into an exported
    model's metadata, atomically; `OnnxModel` applies them by default. `bright`: the options for
    images the model inverts as bright-background; None removes any stored before. Returns the path."""
    path = Path(path)
    params = check_postprocess(params, f"{path}: postprocess")
    updates = {POSTPROCESS_KEY: json.dumps(params, sort_keys=True)}
    if bright is not None:
        updates[POSTPROCESS_BRIGHT_KEY] = json.dumps(check_postprocess(bright, f"{path}: postprocess_bright"), sort_keys=True)
    return _store_metadata(path, updates, drop=() if bright is not None else (POSTPROCESS_BRIGHT_KEY,))


def store_dataset_hash(path: str | Path, data_hash: str) -> Path:
    """Record the training data's hash (`cellseg.data.dataset.dataset_hash`, the run's `dataset.hash`
    tag) in a model exported before exports carried it, so `evaluate` notes a report on that data."""
    if not re.fullmatch(r"[0-9a-f]{16}", data_hash):
        raise CellsegError(f"{data_hash!r}: not a cellseg dataset hash (16 hex digits)")
    return _store_metadata(Path(path), {DATASET_KEY: data_hash})


def _store_metadata(path: Path, updates: dict[str, str], drop: tuple[str, ...] = ()) -> Path:
    """Set (and `drop`) metadata keys of an exported cellseg model, atomically (the file keeps its permissions)."""
    import onnx

    proto, meta = read_cellseg_onnx(path)
    meta.update(updates)
    for key in drop:
        meta.pop(key, None)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    atomic_write(path, lambda tmp: onnx.save(proto, tmp), in_place=True)
    return path


def fuse_conv_bn(net: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d (in a Sequential) into it.

    Done in float32 before any cast to float16, so the folded weights lose no precision;
    the BatchNorm becomes an Identity. Modifies `net` in place and returns it.
    """
    for seq in net.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq[i] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                seq[i + 1] = nn.Identity()
    return net


class _Fp16Core(nn.Module):
    """float16 weights and compute behind a float32 interface (the I/O of the fp32 export)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.half()).float()


def export_onnx(
    net: nn.Module,
    cfg: Config,
    out_path: str | Path,
    run_id: str | None = None,
    fp16: bool = False,
    opset: int = 17,
    postprocess: dict | None = None,
    check: Callable[[bytes], object] | None = None,
) -> Path:
    """Write `net` as ONNX: input "image" (N, C, H, W) float32 -> output "logits" (N, 3, H, W) float32.

    Batch, height and width are dynamic (height/width must be multiples of `cellseg.size_multiple`).
    Exported on CPU in eval mode from a copy (the caller's network is untouched), BatchNorm folded
    into the convolutions. With `fp16` the weights and arithmetic are float16 while the I/O stays
    float32; meant for the CUDA provider (onnxruntime's CPU provider runs it too, through inserted
    casts, no faster than fp32). The file is written atomically, after `check` (e.g. `check_parity`)
    has accepted the serialised model: an error or interrupt meanwhile leaves any earlier file whole.
    """
    out_path = Path(out_path)
    if out_path.is_dir():
        raise CellsegError(f"{out_path}: is a folder; give the .onnx file name to write")
    bare = _bare(net)
    size_multiple = int(getattr(bare, "size_multiple", 1))
    in_ch = first_conv_in_channels(bare)
    if in_ch != cfg.model.in_channels:
        raise CellsegError(
            f"network has {in_ch} input channel(s) but config model.in_channels is {cfg.model.in_channels}; "
            "export with the config the network was trained with"
        )
    depth = getattr(bare, "depth", None)
    if depth is not None and depth != cfg.model.depth:
        raise CellsegError(
            f"network depth {depth} differs from config model.depth {cfg.model.depth}; "
            "export with the config the network was trained with"
        )

    model = fuse_conv_bn(copy.deepcopy(bare).float().cpu().eval())
    if fp16:
        model = _Fp16Core(model).eval()
    side = max(64, 2 * size_multiple)
    dummy = torch.zeros(1, in_ch, side, side)
    axes = {0: "batch", 2: "height", 3: "width"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated (and chatty) but gives dynamic axes with no tracing guards
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )

    import onnx

    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = f"cellseg U-Net (depth {cfg.model.depth}, base {cfg.model.base_channels}): 3-class logits"
    onnx.helper.set_model_props(proto, model_metadata(cfg, size_multiple, run_id, "fp16" if fp16 else "fp32", postprocess,
                                                      getattr(net, "dataset_hash", None)))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CellsegError(f"{out_path}: exported graph failed the ONNX checker ({str(exc)[:300]})") from None
    if check is not None:
        check(proto.SerializeToString())
    atomic_write(out_path, lambda tmp: onnx.save(proto, tmp), in_place=True)
    return out_path


def export_checked(net: nn.Module, cfg: Config, out_path: str | Path, run_id: str | None = None, fp16: bool = False) -> float | None:
    """`export_onnx` with the fp32 graph checked against PyTorch (`check_parity`) before the file is
    written; the largest logit difference (None for fp16, which is not checked)."""
    diffs: list[float] = []
    export_onnx(net, cfg, out_path, run_id=run_id, fp16=fp16,
                check=None if fp16 else lambda model: diffs.append(check_parity(net, model, name=out_path)))
    return diffs[0] if diffs else None


def check_parity(
    net: nn.Module,
    onnx_path: str | Path | bytes,
    shapes=((1, 1, 64, 64), (1, 1, 520, 696)),
    atol: float = 1e-4,
    name: str | Path | None = None,
) -> float:
    """Max |PyTorch - onnxruntime(CPU)| logits over random inputs of `shapes`; CellsegError above `atol`.

    `onnx_path`: a file, or a serialised model (errors then name it `name`). Shapes are (N, C, H, W);
    C is taken from the network. Sizes that are not multiples of the network's size multiple are
    reflect-padded (both runtimes get the same padded input).
    """
    import onnxruntime as ort

    from cellseg.model import pad_to_multiple

    bare = copy.deepcopy(_bare(net)).float().cpu().eval()  # leave the caller's network where it is
    multiple = int(getattr(bare, "size_multiple", 1))
    in_ch = first_conv_in_channels(bare)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    serialised = isinstance(onnx_path, bytes)
    model = onnx_path if serialised else str(onnx_path)
    shown = name if name is not None else "the exported model" if serialised else onnx_path  # what errors name
    try:
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CellsegError(f"{shown}: onnxruntime cannot load the model ({str(exc)[:200]})") from None
    rng = np.random.default_rng(0)
    worst = 0.0
    for n, _, h, w in shapes:
        x = torch.from_numpy(rng.random((n, in_ch, h, w), dtype=np.float32))
        x, _ = pad_to_multiple(x, multiple)
        with torch.no_grad():
            expected = bare(x).numpy()
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise CellsegError(f"{shown}: output shape {got.shape} for input {tuple(x.shape)}, PyTorch gives {expected.shape}")
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if not diff <= atol:  # also catches NaN
            raise CellsegError(
                f"{shown}: ONNX logits differ from PyTorch by {diff:.3g} (> {atol:g}) on input "
                f"{n}x{in_ch}x{h}x{w}; re-export, or raise the tolerance for an fp16 model"
            )
    return worst


def load_net_from_checkpoint(path: str | Path) -> tuple[UNet, Config, str | None]:
    """(network in eval mode on CPU, its Config, MLflow run id or None) from a cellseg checkpoint;
    the network's `dataset_hash` attribute is its training data's hash (None if not recorded)."""
    state = load_checkpoint(path)
    cfg = validate_config(state["config"], str(path))
    net = build_model(cfg.model)
    try:
        net.load_state_dict(unwrap_state_dict(state["model"]))
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise CellsegError(f"{path}: weights do not match the model in its config ({first})") from None
    net.dataset_hash = state.get("dataset_hash")  # read by export_onnx (None for older checkpoints)
    return net.eval(), cfg, state.get("run_id")


def check_model_output(path: Path) -> None:
    """Refuse, before any work, an --output that is a folder, not an .onnx name, below a file or
    in a read-only folder, or an existing file that is not a cellseg ONNX model or is read-only
    (only a model may be replaced)."""
    if path.is_dir():
        raise CellsegError(f"{path}: is a folder; --output names the .onnx file to write")
    if path.suffix.lower() != ".onnx":
        raise CellsegError(f"{path}: --output must end in .onnx (the model file to write)")
    blocking = next((p for p in path.absolute().parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CellsegError(f"{path}: {blocking} is a file, not a folder; choose another --output")
    folder = (Path(os.path.realpath(path)) if path.is_symlink() else path.absolute()).parent  # where the rename happens
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        raise CellsegError(f"{path}: its folder {folder} is read-only; choose another --output")
    if path.exists():
        try:
            read_cellseg_onnx(path, load_external_data=False)
        except CellsegError:
            raise CellsegError(f"{path}: exists and is not a cellseg model; refusing to overwrite it (choose another --output)") from None
        replaceable(path)  # a read-only model is refused before the work


def check_replaces_own_model(path: Path, run_id: str | None, precision: str, overwrite: bool = False,
                             any_run: bool = False) -> None:
    """Without `overwrite`, refuse to replace an existing model file that is not an earlier copy of
    this one: exported from another run, of another precision (an int8 copy over its fp32 model), or
    holding thresholds `cellseg tune` stored (a fresh export would drop them). `any_run`: a file of
    this precision is replaced whatever its run (an earlier, stale copy at the default place)."""
    if overwrite or not path.exists():
        return
    meta = read_cellseg_onnx(path, load_external_data=False)[1]
    theirs = meta.get("cellseg.run_id") or None
    if any_run and (meta.get("cellseg.precision") or "fp32") == precision:
        return
    if theirs != (run_id or None):
        why = f"a model of run {theirs}" if theirs else "a model from a checkpoint outside MLflow"
    elif theirs is None:  # two checkpoints outside MLflow: nothing tells whether it is this one's
        why = "a model from a checkpoint outside MLflow (which one is not recorded)"
    elif (meta.get("cellseg.precision") or "fp32") != precision:
        why = f"the {meta.get('cellseg.precision') or 'fp32'} model of this run"
    elif POSTPROCESS_KEY in meta and precision != "int8":
        why = "thresholds tuned by cellseg tune, which a new export would drop"
    else:
        return
    raise CellsegError(f"{path}: holds {why}; --overwrite replaces it, or choose another --output")
