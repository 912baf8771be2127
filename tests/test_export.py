"""ONNX export: a valid, self-describing file that matches PyTorch, and a loader that refuses others."""

import json
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import cellseg
from cellseg.checkpoint import save_checkpoint
from cellseg.config import Config
from cellseg.errors import CellsegError
from cellseg.export import check_parity, export_onnx, load_net_from_checkpoint
from cellseg.inference import OnnxModel, TorchModel, cuda_usable, predict_tiled
from cellseg.model import UNet


def _cfg() -> Config:
    cfg = Config()
    cfg.model.depth = 2
    cfg.model.base_channels = 8
    cfg.data.low_percentile = 2.0
    cfg.data.high_percentile = 99.5
    return cfg


@pytest.fixture(scope="module")
def net() -> UNet:
    torch.manual_seed(0)
    net = UNet(1, 3, depth=2, base_channels=8)
    # non-trivial batch-norm statistics, so folding them into the convolutions is exercised
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def onnx_file(net, tmp_path_factory):
    return export_onnx(net, _cfg(), tmp_path_factory.mktemp("onnx") / "model.onnx", run_id="abc123")


def _run(path, x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"image": x})[0]


def _torch(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def test_export_is_valid_onnx_with_metadata(onnx_file):
    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}  # folded into the convolutions
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["cellseg.format"] == "cellseg-unet-onnx/1"
    assert meta["cellseg.version"] == cellseg.__version__
    assert float(meta["cellseg.low_percentile"]) == 2.0
    assert float(meta["cellseg.high_percentile"]) == 99.5
    assert meta["cellseg.in_channels"] == "1"
    assert meta["cellseg.classes"] == "background,interior,boundary"
    assert meta["cellseg.size_multiple"] == "4"
    assert meta["cellseg.run_id"] == "abc123"
    assert json.loads(meta["cellseg.config"])["model"]["depth"] == 2
    assert not list(onnx_file.parent.glob(".*tmp*"))  # the temporary file was renamed away


def test_parity_with_pytorch_including_non_multiple_size(net, onnx_file):
    assert check_parity(net, onnx_file) < 1e-4  # 64x64 and 520x696
    assert check_parity(net, onnx_file, shapes=((2, 1, 70, 45),), atol=1e-4) < 1e-4


def test_dynamic_batch_and_sizes_with_one_file(net, onnx_file):
    rng = np.random.default_rng(1)
    for shape in [(3, 1, 64, 64), (1, 1, 32, 96), (2, 1, 120, 52)]:
        x = rng.random(shape, dtype=np.float32)
        got = _run(onnx_file, x)
        assert got.shape == (shape[0], 3, *shape[2:])
        np.testing.assert_allclose(got, _torch(net, x), atol=1e-4)


def test_export_leaves_the_network_untouched(net, tmp_path):
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_onnx(net, _cfg(), tmp_path / "m.onnx")
    assert net.training
    net.eval()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_parity_failure_is_a_cellseg_error(net, onnx_file):
    other = UNet(1, 3, depth=2, base_channels=8).eval()
    with pytest.raises(CellsegError, match="differ from PyTorch"):
        check_parity(other, onnx_file, shapes=((1, 1, 32, 32),))


def test_config_mismatch_is_refused(net, tmp_path):
    cfg = _cfg()
    cfg.model.depth = 3
    with pytest.raises(CellsegError, match="depth"):
        export_onnx(net, cfg, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_fp16_keeps_float32_io_and_runs(net, tmp_path):
    path = export_onnx(net, _cfg(), tmp_path / "half.onnx", fp16=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {i.data_type for i in proto.graph.initializer if i.dims} == {onnx.TensorProto.FLOAT16}
    assert {p.key: p.value for p in proto.metadata_props}["cellseg.precision"] == "fp16"
    # onnxruntime's CPU provider runs it through inserted casts; fp16 rounding bounds the error
    x = np.random.default_rng(2).random((2, 1, 64, 64), dtype=np.float32)
    expected = _torch(net, x)
    got = _run(path, x)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() < 2e-2 * max(1.0, np.abs(expected).max())


def test_onnx_model_loads_export(onnx_file):
    model = OnnxModel(onnx_file, device="cpu", threads=1)
    assert model.provider == "CPUExecutionProvider"
    assert (model.size_multiple, model.in_channels, model.run_id) == (4, 1, "abc123")
    assert (model.low_percentile, model.high_percentile) == (2.0, 99.5)
    out = model(np.zeros((2, 1, 30, 41), np.float32))  # padded to the multiple inside, cropped back
    assert out.shape == (2, 3, 30, 41) and out.dtype == np.float32


def test_onnx_model_auto_device_is_quiet_and_matches_torch_tiled(net, onnx_file, capfd):
    model = OnnxModel(onnx_file, device="auto", threads=1)
    if not cuda_usable():
        assert model.provider == "CPUExecutionProvider"
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    img = np.random.default_rng(5).random((90, 130), dtype=np.float32)
    ref = predict_tiled(TorchModel(net, _cfg(), device="cpu"), img, tile=64, overlap=0.25)
    np.testing.assert_allclose(predict_tiled(model, img, tile=64, overlap=0.25), ref, atol=1e-5)


def test_onnx_model_refuses_non_cellseg_onnx(tmp_path):
    path = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch.nn.Conv2d(1, 3, 3, padding=1).eval(), (torch.zeros(1, 1, 8, 8),), str(path),
            input_names=["x"], output_names=["y"], dynamo=False,
        )
    with pytest.raises(CellsegError) as exc:
        OnnxModel(path, device="cpu")
    assert str(exc.value) == f"{path}: not a cellseg model (missing cellseg metadata)"


@pytest.mark.parametrize("content", [b"", b"hello, not a model\n", bytes(range(256)) * 4])
def test_onnx_model_refuses_garbage(tmp_path, content):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    with pytest.raises(CellsegError) as exc:
        OnnxModel(path, device="cpu")
    assert str(exc.value) == f"{path}: not an ONNX model"


def test_onnx_model_with_missing_external_weights(tmp_path):
    from cellseg.inference import read_cellseg_onnx

    path = tmp_path / "m.onnx"
    proto = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "cellseg-nuclei.onnx"))
    onnx.save(proto, str(path), save_as_external_data=True, location="m.bin", size_threshold=0)
    assert read_cellseg_onnx(path)[1]["cellseg.format"]  # loads while its weight file is there
    (tmp_path / "m.bin").unlink()
    with pytest.raises(CellsegError, match=r"m.onnx: ONNX model with unreadable weights \(.*m.bin"):
        read_cellseg_onnx(path)


@pytest.mark.parametrize("out_channels", [2, 3])
def test_onnx_model_checks_the_signature_of_a_cellseg_file(onnx_file, tmp_path, out_channels):
    """cellseg metadata on a network with other outputs than the 3 class logits: refused by name."""
    path = tmp_path / "odd.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch.nn.Conv2d(1, out_channels, 3, padding=1).eval(), (torch.zeros(1, 1, 8, 8),), str(path),
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "h", 3: "w"}},
            dynamo=False,
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props})
    onnx.save(proto, str(path))
    if out_channels == 3:
        assert OnnxModel(path, device="cpu").in_channels == 1
        return
    with pytest.raises(CellsegError) as exc:
        OnnxModel(path, device="cpu")
    assert str(exc.value).startswith(f"{path}: unexpected model signature")


def test_infer_imports_neither_onnx_nor_matplotlib(onnx_file, tmp_path):
    """onnxruntime alone reads and checks the model, and overlays are drawn without matplotlib:
    importing those two took 1 s of every `cellseg infer`'s start (2.2 s for 4 small images)."""
    import subprocess
    import sys

    import cv2

    folder = tmp_path / "in"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), (np.random.default_rng(0).random((40, 50)) * 255).astype(np.uint8))
    code = (
        "import runpy, sys\n"
        "from cellseg.inference import OnnxModel\n"
        "from cellseg.resolve import load_model\n"
        "assert OnnxModel(sys.argv[1], device='cpu').run_id == 'abc123' and load_model(None, device='cpu').postprocess\n"
        "sys.argv = ['cellseg', 'infer', sys.argv[2], '--model', sys.argv[1], '-o', sys.argv[3], '--device', 'cpu']\n"
        "try:\n"
        "    runpy.run_module('cellseg', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('onnx', 'matplotlib')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(onnx_file), str(folder), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "a_overlay.png").is_file() and (tmp_path / "out" / "a_masks.tif").is_file()
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_onnx_model_missing_file(tmp_path):
    with pytest.raises(CellsegError, match="no such file"):
        OnnxModel(tmp_path / "nope.onnx")


def test_load_net_from_checkpoint(net, tmp_path):
    path = tmp_path / "best.pt"
    state = {"module." + k: v for k, v in net.state_dict().items()}  # as saved under DDP
    save_checkpoint(path, {"model": state, "config": _cfg().model_dump(), "run_id": "r1"})
    loaded, cfg, run_id = load_net_from_checkpoint(path)
    assert run_id == "r1" and cfg.model.depth == 2 and not loaded.training
    x = np.random.default_rng(3).random((1, 1, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(_torch(loaded, x), _torch(net, x), atol=1e-6)
    from cellseg.evaluate import model_name

    # reports name a checkpoint by its file (they said "TorchModel(provider='torch:cpu')" for any .pt,
    # so evaluate's guard let one checkpoint's report replace another's)
    assert model_name(TorchModel.from_checkpoint(path, device="cpu")) == str(path)

    bad = _cfg().model_dump()
    bad["model"]["base_channels"] = 16
    save_checkpoint(path, {"model": net.state_dict(), "config": bad, "run_id": None})
    with pytest.raises(CellsegError, match="do not match"):
        load_net_from_checkpoint(path)


def test_stored_postprocess_is_read_back_and_used_by_default(net, onnx_file, tmp_path):
    import shutil

    from cellseg.batch import InferOptions
    from cellseg.export import store_postprocess

    path = shutil.copy(onnx_file, tmp_path / "tuned.onnx")
    assert OnnxModel(path).postprocess == {}  # a fresh export: defaults
    store_postprocess(path, {"interior_threshold": 0.7, "foreground_threshold": 0.4, "min_size": 25})
    model = OnnxModel(path)
    assert model.postprocess == {"interior_threshold": 0.7, "foreground_threshold": 0.4, "min_size": 25}
    assert model.low_percentile == 2.0 and model.run_id == "abc123"  # the other metadata is kept
    np.testing.assert_array_equal(_run(path, np.ones((1, 1, 32, 32), np.float32)), _run(onnx_file, np.ones((1, 1, 32, 32), np.float32)))
    # infer options override the stored values one by one
    assert InferOptions().postprocess_for(model)["interior_threshold"] == 0.7
    assert InferOptions(interior_threshold=0.3).postprocess_for(model) == {"interior_threshold": 0.3, "foreground_threshold": 0.4, "min_size": 25}
    # a bright-background operating point: stored beside, used for inverted images only, dropped by a tune without one
    assert model.postprocess_bright == {} and InferOptions().postprocess_for(model, bright=True) == model.postprocess
    store_postprocess(path, {"interior_threshold": 0.6, "min_size": 25}, bright={"interior_threshold": 0.4, "min_size": 40})
    model = OnnxModel(path)
    assert model.postprocess == {"interior_threshold": 0.6, "min_size": 25}
    assert InferOptions().postprocess_for(model, bright=True) == {"interior_threshold": 0.4, "min_size": 40}
    assert InferOptions(min_size=5).postprocess_for(model, bright=True) == {"interior_threshold": 0.4, "min_size": 5}
    with pytest.raises(CellsegError, match="postprocess_bright: interior_threshold"):
        store_postprocess(path, {"min_size": 3}, bright={"interior_threshold": 2})
    store_postprocess(path, {"interior_threshold": 0.7, "foreground_threshold": 0.4, "min_size": 25})
    assert OnnxModel(path).postprocess_bright == {}
    with pytest.raises(CellsegError, match="interior_threshold"):
        store_postprocess(path, {"interior_threshold": 1.5})
    with pytest.raises(CellsegError, match="unknown option"):
        store_postprocess(path, {"threshold": 0.5})
    with pytest.raises(CellsegError, match="not a cellseg model"):
        import onnx

        plain = onnx.load(str(path))
        del plain.metadata_props[:]
        onnx.save(plain, str(tmp_path / "plain.onnx"))
        store_postprocess(tmp_path / "plain.onnx", {"min_size": 3})


def test_invert_bright_is_exported_and_read(net, tmp_path):
    cfg = _cfg()
    cfg.data.invert_bright = True
    path = export_onnx(net, cfg, tmp_path / "inv.onnx")
    assert OnnxModel(path).invert_bright is True
    assert TorchModel(net, cfg).invert_bright is True
    assert OnnxModel(export_onnx(net, _cfg(), tmp_path / "plain.onnx")).invert_bright is False


def test_store_dataset_hash_records_the_training_data(tmp_path):
    """A model exported before exports carried it gets its training data's hash: evaluate's
    training-data note then fires for it. Weights and other metadata stay as they were."""
    import shutil

    from cellseg.export import store_dataset_hash
    from cellseg.inference import read_cellseg_onnx

    path = tmp_path / "m.onnx"
    shutil.copy(Path(__file__).resolve().parents[1] / "models" / "cellseg-nuclei.onnx", path)
    before = read_cellseg_onnx(path)[1]
    store_dataset_hash(path, "0123456789abcdef")
    after = read_cellseg_onnx(path)[1]
    assert after.pop("cellseg.dataset_hash") == "0123456789abcdef" and after == {k: v for k, v in before.items() if k != "cellseg.dataset_hash"}
    with pytest.raises(CellsegError, match="not a cellseg dataset hash"):
        store_dataset_hash(path, "../shared/data")


def test_the_shipped_model_records_its_training_data():
    """models/cellseg-nuclei.onnx (and its int8 copy) carry the hash of ../shared/data/dsb2018-train,
    the run's dataset.hash tag; checked against the data itself where it is present."""
    from cellseg.inference import read_cellseg_onnx

    models = Path(__file__).resolve().parents[1] / "models"
    recorded = {read_cellseg_onnx(models / f)[1].get("cellseg.dataset_hash") for f in ("cellseg-nuclei.onnx", "cellseg-nuclei.int8.onnx")}
    assert len(recorded) == 1 and re.fullmatch(r"[0-9a-f]{16}", recorded.pop() or "")
    data = models.parents[1] / "shared" / "data" / "dsb2018-train"
    if not data.is_dir():
        pytest.skip(f"{data} not present")
    from cellseg.data.dataset import dataset_hash

    assert read_cellseg_onnx(models / "cellseg-nuclei.onnx")[1]["cellseg.dataset_hash"] == dataset_hash(data)


def test_cli_export_checks_before_writing_and_names_an_interrupt(net, tmp_path, monkeypatch, capsys):
    """The parity check runs on the serialised graph before the file is written: a failed check or a
    Ctrl-C meanwhile leaves an earlier export whole, and a Ctrl-C prints one line (typer turns it
    into its own Exit(130), which used to end the command silently)."""
    import sys

    from cellseg import cli, export

    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, {"model": net.state_dict(), "config": _cfg().model_dump(), "run_id": None})
    out = tmp_path / "m.onnx"
    monkeypatch.setattr(sys, "argv", ["cellseg", "export", "--checkpoint", str(ckpt), "-o", str(out)])
    cli.main()
    assert "ONNX vs PyTorch max |logit diff|" in capsys.readouterr().out
    before = out.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def differs(*args, **kwargs):
        raise CellsegError("differ")

    other = UNet(1, 3, depth=2, base_channels=8).eval()  # another model: its file would differ
    save_checkpoint(ckpt, {"model": other.state_dict(), "config": _cfg().model_dump(), "run_id": None})
    for fail, code, said in ((interrupted, 130, "interrupted\n"), (differs, 2, "error: differ\n")):
        monkeypatch.setattr(export, "check_parity", fail)
        monkeypatch.setattr(sys, "argv", ["cellseg", "export", "--checkpoint", str(ckpt), "-o", str(out), "--overwrite"])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        assert exc.value.code == code and capsys.readouterr().err.endswith(said)
        assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "m.onnx"]
