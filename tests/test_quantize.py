"""int8 copies of a model: static QDQ keeps the metadata and the predictions; the shipped model's
int8 copy is picked only on the CPU provider of a CPU with int8 dot products."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from cellseg import resolve
from cellseg.cli import app
from cellseg.config import Config
from cellseg.errors import CellsegError
from cellseg.export import export_onnx
from cellseg.inference import OnnxModel, predict_tiled
from cellseg.model import UNet
from cellseg.quantize import (
    SOURCE_KEY,
    calibration_images,
    cpu_int8_flags,
    file_digest,
    int8_path,
    is_copy_of,
    prefer_int8,
    preprocessed,
    quantize_static,
)

CPUINFO_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni amx_int8\n"
CPUINFO_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    torch.manual_seed(0)
    net = UNet(1, 3, depth=2, base_channels=8).eval()
    return export_onnx(net, _tiny_cfg(), tmp_path_factory.mktemp("q") / "model.onnx", run_id="r1")


def _tiny_cfg() -> Config:
    cfg = Config()
    cfg.model.depth, cfg.model.base_channels = 2, 8
    return cfg


def _tiny_checkpoint(path: Path, run_id: str | None = None) -> Path:
    """A checkpoint of fp32_file's architecture (untrained), of run `run_id` (None: outside MLflow)."""
    from cellseg.checkpoint import save_checkpoint

    state = {"model": UNet(1, 3, depth=2, base_channels=8).state_dict(), "config": _tiny_cfg().model_dump()}
    save_checkpoint(path, {**state, "run_id": run_id} if run_id else state)
    return path


def test_cpu_flags_and_preference():
    assert cpu_int8_flags(CPUINFO_VNNI) == {"avx512_vnni", "amx_int8"}
    assert cpu_int8_flags(CPUINFO_PLAIN) == set() and cpu_int8_flags("") == set()
    assert prefer_int8("cpu", CPUINFO_VNNI) and not prefer_int8("cpu", CPUINFO_PLAIN)


def test_static_int8_keeps_metadata_and_predictions(fp32_file, tiny_data, tmp_path):
    fp32 = OnnxModel(fp32_file, device="cpu")
    crops = calibration_images(tiny_data, fp32.low_percentile, fp32.high_percentile, False, n=4)
    assert crops and all(c.dtype == np.float32 and c.shape[0] % 8 == 0 and c.shape[1] % 8 == 0 for c in crops)
    dst = quantize_static(fp32_file, tmp_path / "m.int8.onnx", crops)
    meta = {p.key: p.value for p in onnx.load(str(dst)).metadata_props}
    src_meta = {p.key: p.value for p in onnx.load(str(fp32_file)).metadata_props}
    assert meta["cellseg.precision"] == "int8" and meta[SOURCE_KEY] == file_digest(fp32_file)
    assert is_copy_of(meta, fp32_file)
    own = ("cellseg.precision", SOURCE_KEY)
    assert {k: v for k, v in meta.items() if k not in own} == {k: v for k, v in src_meta.items() if k not in own}
    graph_ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert "QuantizeLinear" in graph_ops and "DequantizeLinear" in graph_ops
    int8 = OnnxModel(dst, device="cpu")
    image = crops[0]
    a = predict_tiled(fp32, image, tile=64).argmax(0)
    b = predict_tiled(int8, image, tile=64).argmax(0)
    assert (a == b).mean() > 0.9  # same classes almost everywhere
    with pytest.raises(CellsegError, match="precision int8; quantise the fp32 export"):
        quantize_static(dst, tmp_path / "again.onnx", crops)


def test_preprocessed_once_gives_the_same_int8_file(fp32_file, tiny_data, tmp_path):
    crops = calibration_images(tiny_data, 1.0, 99.8, False, n=2)
    pre = preprocessed(fp32_file, tmp_path / "pre.onnx")
    assert pre == tmp_path / "pre.onnx" and pre.is_file()
    a = quantize_static(fp32_file, tmp_path / "a.onnx", crops)
    b = quantize_static(fp32_file, tmp_path / "b.onnx", crops, pre=pre)
    assert onnx.load(str(a)).graph == onnx.load(str(b)).graph
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    assert preprocessed(broken, tmp_path / "pre2.onnx") == broken  # falls back to the source


def test_default_model_picks_a_fresh_int8_copy_only_where_faster(fp32_file, tiny_data, tmp_path, monkeypatch):
    import shutil

    import cellseg.quantize as q
    from cellseg.export import store_postprocess

    shipped = tmp_path / "cellseg-nuclei.onnx"
    shutil.copy(fp32_file, shipped)
    monkeypatch.setattr(resolve, "DEFAULT_MODEL", shipped)
    monkeypatch.setattr(q, "cpu_int8_flags", lambda cpuinfo=None: {"avx512_vnni"})
    assert resolve.load_model(None, device="cpu").path == shipped  # no int8 copy yet
    crops = calibration_images(tiny_data, 1.0, 99.8, False, n=2)
    quantize_static(shipped, int8_path(shipped), crops)
    model = resolve.load_model(None, device="cpu")
    assert model.path == tmp_path / "cellseg-nuclei.int8.onnx" and "int8: this CPU has avx512_vnni" in model.describe
    monkeypatch.setattr(q, "cpu_int8_flags", lambda cpuinfo=None: set())
    assert resolve.load_model("default", device="cpu").path == shipped
    # the fp32 file changes (re-tuned, retrained): its old int8 copy is stale and not used
    monkeypatch.setattr(q, "cpu_int8_flags", lambda cpuinfo=None: {"amx_int8"})
    store_postprocess(shipped, {"interior_threshold": 0.4, "foreground_threshold": 0.6, "min_size": 5})
    import cellseg.inference as inference

    built = []
    real_init = inference.OnnxModel.__init__
    monkeypatch.setattr(inference.OnnxModel, "__init__", lambda self, p, *a, **k: (built.append(Path(p)), real_init(self, p, *a, **k))[1])
    model = resolve.load_model(None, device="cpu")
    assert model.path == shipped and "not quantised from this file; rerun cellseg quantize" in model.describe
    assert built == [int8_path(shipped), shipped]  # the stale copy is judged by its metadata, then passed over
    # a damaged copy is passed over the same way, not a crash
    int8_path(shipped).write_bytes(b"not an onnx file")
    assert resolve.load_model(None, device="cpu").path == shipped


def test_cli_quantize_writes_the_int8_copy_and_refuses_bad_input(fp32_file, tiny_data, tmp_path):
    import shutil

    src = tmp_path / "my model.onnx"
    shutil.copy(fp32_file, src)
    runner = CliRunner()
    res = runner.invoke(app, ["quantize", str(src), str(tiny_data), "--calib", "3"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "my model.int8.onnx").is_file() and "calibrated on 3 training images" in res.output
    # the command it suggests runs as printed (quoted paths)
    assert f"check it: cellseg evaluate {tiny_data} --split val --model '{tmp_path / 'my model.int8.onnx'}'" in " ".join(res.output.split())
    for args, message in (([src, tmp_path / "nodata"], "nodata: dataset folder not found"),
                          ([src, tiny_data, "-o", src], "would overwrite its source"),
                          ([src, src], f"{src.name}: is a file; expected a dataset folder with images/ and masks/"),
                          ([src, tiny_data, "-o", src / "x.onnx"], f"{src} is a file, not a folder; choose another --output"),
                          ([tmp_path / "m.pt", tiny_data], "quantize takes an exported .onnx model")):
        r = subprocess.run([sys.executable, "-m", "cellseg", "quantize", *map(str, args)], capture_output=True, text=True)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    for args, message in (([src], f"quantize {src}: missing DATA_DIR"), ([src, tiny_data, "-m", src], "takes the model once"),
                          (["-m", src], f"quantize -m {src}: missing DATA_DIR"), ([], "quantize: missing MODEL and DATA_DIR")):
        res = runner.invoke(app, ["quantize", *map(str, args)])
        assert isinstance(res.exception, CellsegError) and message in str(res.exception), res.output
    meta = {p.key: p.value for p in onnx.load(str(src)).metadata_props}
    assert meta["cellseg.precision"] == "fp32"  # the source is untouched


def test_quantize_and_export_replace_only_their_own_earlier_file_without_overwrite(fp32_file, tiny_data, tmp_path):
    """An earlier int8 copy of the same run is replaced (a re-quantization); another run's model,
    this run's fp32 model, or a tuned export is kept unless --overwrite says otherwise."""
    import shutil

    from cellseg.export import store_postprocess
    from cellseg.inference import read_cellseg_onnx

    shipped = Path(__file__).resolve().parents[1] / "models" / "cellseg-nuclei.onnx"
    src, other = tmp_path / "m.onnx", tmp_path / "other.onnx"
    shutil.copy(fp32_file, src)
    shutil.copy(shipped, other)
    runner = CliRunner()
    assert runner.invoke(app, ["quantize", str(src), str(tiny_data), "--calib", "2"]).exit_code == 0
    mtime = (tmp_path / "m.int8.onnx").stat().st_mtime_ns
    res = runner.invoke(app, ["quantize", str(tiny_data), "-m", str(src), "--calib", "2"])  # its own copy, as tune takes a model
    assert res.exit_code == 0 and (tmp_path / "m.int8.onnx").stat().st_mtime_ns != mtime, res.output
    shutil.copy(shipped.with_suffix(".int8.onnx"), tmp_path / "m.int8.onnx")
    res = runner.invoke(app, ["quantize", str(src), str(tiny_data), "--calib", "2"])  # the default copy of another run: stale
    assert res.exit_code == 0 and read_cellseg_onnx(tmp_path / "m.int8.onnx")[1]["cellseg.run_id"] == "r1", res.output
    fp32_copy = tmp_path / "fp32-copy.onnx"
    shutil.copy(src, fp32_copy)
    shipped_run = read_cellseg_onnx(shipped)[1]["cellseg.run_id"]
    assert shipped_run and shipped_run != "r1"
    for target, why in ((other, f"holds a model of run {shipped_run}"), (fp32_copy, "holds the fp32 model of this run")):
        before = target.read_bytes()
        res = runner.invoke(app, ["quantize", str(src), str(tiny_data), "--calib", "2", "-o", str(target)])
        assert isinstance(res.exception, CellsegError) and why in str(res.exception) and "--overwrite replaces it" in str(res.exception)
        assert target.read_bytes() == before
    res = runner.invoke(app, ["quantize", str(src), str(tiny_data), "--calib", "2", "-o", str(other), "--overwrite"])
    assert res.exit_code == 0 and read_cellseg_onnx(other)[1]["cellseg.precision"] == "int8"

    # export: a tuned file of the same run keeps its thresholds unless --overwrite
    ckpt = tmp_path / "best.pt"
    _tiny_checkpoint(ckpt, run_id="r1")  # as fp32_file
    store_postprocess(fp32_copy, {"interior_threshold": 0.4, "foreground_threshold": 0.6, "min_size": 20})
    res = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "-o", str(fp32_copy), "--no-attach"])
    assert isinstance(res.exception, CellsegError) and "thresholds tuned by cellseg tune" in str(res.exception)
    res = runner.invoke(app, ["export", "--checkpoint", str(ckpt), "-o", str(fp32_copy), "--no-attach", "--overwrite"])
    assert res.exit_code == 0, res.output


def test_export_of_checkpoints_outside_mlflow_never_replaces_one_with_another(tmp_path):
    for name in ("a.pt", "b.pt"):  # no run id recorded: nothing tells the two apart
        _tiny_checkpoint(tmp_path / name)
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    assert runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "a.pt"), "-o", str(out), "--no-attach"]).exit_code == 0
    res = runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "b.pt"), "-o", str(out), "--no-attach"])
    assert isinstance(res.exception, CellsegError) and "a model from a checkpoint outside MLflow" in str(res.exception)
    assert runner.invoke(app, ["export", "--checkpoint", str(tmp_path / "b.pt"), "-o", str(out), "--no-attach", "--overwrite"]).exit_code == 0
