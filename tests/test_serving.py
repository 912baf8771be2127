"""The MLflow pyfunc: labels equal to the direct pipeline, in process and behind `mlflow models serve`."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import SimpleNamespace
from unittest import mock

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from cellseg.config import Config
from cellseg.data.io import normalize_percentile
from cellseg.errors import CellsegError
from cellseg.export import export_onnx
from cellseg.inference import OnnxModel, predict_tiled
from cellseg.postprocess import probabilities_to_instances
from cellseg.serving import DEFAULT_PARAMS, decode_labels, encode_png, example_image, log_pyfunc, register_pyfunc


class _Threshold(nn.Module):
    """Logits that make bright pixels 'interior': real objects from an untrained-size model."""

    size_multiple = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-8.0, 8.0, 0.0]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([4.0, -4.0, -10.0]))

    def forward(self, x):
        return self.conv(x)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of this module's own with one (untrained) run and its exported ONNX."""
    import mlflow.tracking.fluent as fluent

    root = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("CELLSEG_CACHE_DIR", str(root / "cache"))
    mp.setenv("CELLSEG_THREADS", "1")
    mp.chdir(root)
    mp.setattr(fluent, "_active_experiment_id", getattr(fluent, "_active_experiment_id", None), raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serving-test")
    with mlflow.start_run() as run:
        mlflow.set_tag("dataset.hash", "0123456789abcdef")
    onnx = export_onnx(_Threshold().eval(), Config(), root / "threshold.onnx", run_id=run.info.run_id)
    yield SimpleNamespace(uri=uri, root=root, run_id=run.info.run_id, onnx=onnx)
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)
    mp.undo()


@pytest.fixture(scope="module")
def logged(store):
    return log_pyfunc(store.onnx, run_id=store.run_id)


@pytest.fixture(scope="module")
def pyfunc(logged):
    return mlflow.pyfunc.load_model(logged.model_uri)


def test_logged_pyfunc_carries_code_requirements_and_example(store, logged, tmp_path):
    from pathlib import Path

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=logged.model_uri, dst_path=str(tmp_path)))
    code = local / "code" / "cellseg"
    assert (code / "serving.py").is_file() and (code / "inference.py").is_file()
    assert not list(code.rglob("__pycache__"))
    reqs = (local / "requirements.txt").read_text()
    for name in ("onnxruntime", "tifffile", "onnx", "mlflow=="):
        assert name in reqs, name
    assert logged.signature.inputs.input_names() == ["image"]
    assert (local / "serving_input_example.json").is_file()
    # models from code: the model is cellseg/pyfunc_model.py, not a cloudpickled object
    assert not (local / "python_model.pkl").exists() and "pyfunc_model.py" in (local / "MLmodel").read_text()
    assert mlflow.get_run(store.run_id).info.status == "FINISHED"


def _image(size=(96, 80)) -> np.ndarray:
    img = np.zeros(size, np.uint8)
    img[: example_image(64).shape[0], : example_image(64).shape[1]] = example_image(64)
    img[70:85, 50:70] = 180
    return img


def _direct(onnx_path, img: np.ndarray) -> np.ndarray:
    m = OnnxModel(onnx_path, device="cpu", threads=1)
    norm = normalize_percentile(img.astype(np.float32), m.low_percentile, m.high_percentile)
    probs = predict_tiled(m, norm, DEFAULT_PARAMS["tile"], DEFAULT_PARAMS["overlap"], DEFAULT_PARAMS["batch_size"])
    return probabilities_to_instances(probs)


def test_pyfunc_labels_equal_the_direct_path(store, pyfunc):
    img = _image()
    expected = _direct(store.onnx, img)
    png = encode_png(img)
    frame = pd.DataFrame({"image": [png, base64.b64decode(png)]})  # base64 text and raw bytes
    out = pyfunc.predict(frame)
    assert list(out.columns) == ["labels", "n_objects", "height", "width"] and len(out) == 2
    for _, row in out.iterrows():
        labels = decode_labels(row["labels"])
        assert labels.dtype == np.uint16 and labels.shape == img.shape == (row["height"], row["width"])
        np.testing.assert_array_equal(labels, expected)
        assert row["n_objects"] == expected.max() == 3


def test_pyfunc_accepts_arrays_and_arrow_binary(store, pyfunc):
    model = pyfunc.unwrap_python_model()
    img = _image()
    expected = _direct(store.onnx, img)
    np.testing.assert_array_equal(model.predict(None, img), expected)
    both = model.predict(None, np.stack([img, img]))
    assert both.shape == (2, *img.shape)
    np.testing.assert_array_equal(both[1], expected)
    rgb = np.dstack([img, img, img])  # colour, channels last: one image (its channel mean), as an encoded RGB file
    np.testing.assert_array_equal(model.predict(None, rgb), expected)
    assert model.predict(None, np.stack([rgb, rgb])).shape == (2, *img.shape)
    import pyarrow as pa

    raw = base64.b64decode(encode_png(img))
    frame = pd.DataFrame({"image": pd.Series([raw], dtype=pd.ArrowDtype(pa.binary()))})
    np.testing.assert_array_equal(decode_labels(model.predict(None, frame)["labels"][0]), expected)


def test_pyfunc_reads_stain_channels_as_infer_does(store, pyfunc, monkeypatch):
    """A served 2-channel ImageJ TIFF is refused as `cellseg infer` refuses it; a model trained on a
    channel (`train --channel`) reads that channel."""
    import tifffile

    model = pyfunc.unwrap_python_model()
    img = _image()
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.stack([np.zeros_like(img), img]), imagej=True, metadata={"axes": "CYX"})
    frame = pd.DataFrame({"image": [buf.getvalue()]})
    with pytest.raises(CellsegError, match=r"^row 0 of column 'image': .* with 2 channels \(CYX\); pick the nuclear stain"):
        model.predict(None, frame)
    monkeypatch.setattr(model.model, "channel", 1)
    np.testing.assert_array_equal(decode_labels(model.predict(None, frame)["labels"][0]), _direct(store.onnx, img))
    np.testing.assert_array_equal(model.predict(None, np.dstack([np.zeros_like(img), img, img])), _direct(store.onnx, img))


def test_pyfunc_scale_and_tta_params_equal_infer_options(store, pyfunc):
    """params scale/tta give the labels of `cellseg infer --scale/--tta` (tile in model px, min sizes zoomed)."""
    from cellseg.inference import image_tile, with_settings
    from cellseg.postprocess import model_postprocess

    model = pyfunc.unwrap_python_model()
    img = _image((120, 104))
    m = OnnxModel(store.onnx, device="cpu", threads=1)
    norm = normalize_percentile(img.astype(np.float32), m.low_percentile, m.high_percentile)
    for scale, tta in [(2.0, False), (0.5, True)]:
        net = with_settings(m, tta, scale)
        probs = predict_tiled(net, norm, image_tile(DEFAULT_PARAMS["tile"], scale), DEFAULT_PARAMS["overlap"], DEFAULT_PARAMS["batch_size"])
        expected = probabilities_to_instances(probs, **model_postprocess(net))
        got = model.predict(None, img, params={"scale": scale, "tta": tta})
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(model.predict(None, img, params={"scale": 0.5}), model.predict(None, img))
    np.testing.assert_array_equal(model.predict(None, img, params={"tta": "False"}), model.predict(None, img))
    with pytest.raises(CellsegError, match="^scale 0: expected a zoom factor"):
        model.predict(None, img, params={"scale": 0.0})
    with pytest.raises(CellsegError, match="tta 'maybe': expected true or false"):
        model.predict(None, img, params={"tta": "maybe"})


def test_pyfunc_input_errors(pyfunc):
    model = pyfunc.unwrap_python_model()
    with pytest.raises(CellsegError, match="column 'image'"):
        model.predict(None, pd.DataFrame({"picture": ["x"]}))
    with pytest.raises(CellsegError, match="row 0 of column 'image': cannot decode image"):
        model.predict(None, pd.DataFrame({"image": [base64.b64encode(b"not an image").decode()]}))
    with pytest.raises(CellsegError, match=r"expected \(H, W\) or \(N, H, W\)"):
        model.predict(None, np.zeros((1, 1, 8, 8), np.float32))
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="^tile -5: expected at least 16 px") as err:  # served: HTTP 400 with this message
        model.predict(None, _image(), params={"tile": -5})
    assert err.value.get_http_status_code() == 400 and isinstance(err.value, CellsegError)
    for overlap in (0.99, float("nan")):  # as `infer --overlap`: near 1 one request could hold the server for minutes
        with pytest.raises(MlflowException, match="expected a number from 0 to 0.9"):
            model.predict(None, _image(), params={"overlap": overlap})
    import tifffile

    from cellseg import resources

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((2, 3), np.complex64))
    with pytest.raises(MlflowException, match=r"row 0 of column 'image': complex-valued image \(complex64\)"):
        model.predict(None, pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode()]}))
    # an image larger than the free memory: refused from its header, as `cellseg infer` refuses it, not a crash
    huge = io.BytesIO()
    tifffile.imwrite(huge, np.zeros((400, 500), np.uint8), compression="zlib")
    decoded = []
    with mock.patch.object(resources, "available_memory", lambda: resources.segmenting_bytes(100, 100)), \
            mock.patch("tifffile.imread", side_effect=lambda *a, **k: decoded.append(1)):
        with pytest.raises(MlflowException, match=r"row 0 of column 'image': 500x400 image .* needs about .*crop it into smaller images"):
            model.predict(None, pd.DataFrame({"image": [base64.b64encode(huge.getvalue()).decode()]}))
    assert decoded == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.slow
def test_mlflow_models_serve_champion(store, pyfunc, tmp_path):
    mv = register_pyfunc(store.run_id, onnx_path=store.onnx)
    assert mv.aliases == ["champion"] and mv.tags["cellseg.flavor"] == "pyfunc" and mv.tags["onnx_model_uri"]
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cellseg-unet@champion",
         "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1", "-w", "1"],
        # mlflow execs `uvicorn` by name: the venv's bin must be on PATH even when not activated
        env={**os.environ, "MLFLOW_TRACKING_URI": store.uri,
             "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() - t0 < 90, "server not ready in 90 s:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        img = _image()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encode_png(img)]]}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            predictions = json.loads(r.read())["predictions"]
        assert len(predictions) == 1 and predictions[0]["n_objects"] == 3
        np.testing.assert_array_equal(decode_labels(predictions[0]["labels"]), _direct(store.onnx, img))
        zoomed = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[encode_png(img)]]}, "params": {"scale": 0.5, "tta": True}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=zoomed, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            labels = decode_labels(json.loads(r.read())["predictions"][0]["labels"])
        np.testing.assert_array_equal(labels, pyfunc.unwrap_python_model().predict(None, img, params={"scale": 0.5, "tta": True}))
        bad = json.dumps({"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}).encode()
        req = urllib.request.Request(f"{base}/invocations", data=bad, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        assert err.value.code == 400
        message = json.loads(err.value.read())["message"]
        assert "row 0 of column 'image': cannot decode image" in message and "unexpected error" not in message
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        deadline = time.time() + 15
        while _group_alive(proc.pid) and time.time() < deadline:  # uvicorn workers exit after the parent
            time.sleep(0.2)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.5)
        log.close()
    assert proc.returncode is not None and not _group_alive(proc.pid)


def test_pyfunc_post_processes_bright_background_images_at_their_own_thresholds():
    """A served image that the model inverts as bright-background gets the model's bright-background thresholds."""
    from cellseg.serving import CellsegPyfunc

    class Inverting:  # a pixelwise fake network: bright (after inversion) pixels are interior
        size_multiple, in_channels, low_percentile, high_percentile, invert_bright = 8, 1, 1.0, 99.8, True
        postprocess = {"interior_threshold": 0.5, "foreground_threshold": 0.5, "min_size": 10}
        postprocess_bright = {"interior_threshold": 0.9, "foreground_threshold": 0.9, "min_size": 10}

        def __call__(self, batch):
            x = 12.0 * (batch[:, 0] - 0.5)
            return np.stack([-x, x, np.full_like(x, -8.0)], axis=1).astype(np.float32)

    yy, xx = np.mgrid[:64, :80]
    dist = np.hypot(yy - 30, xx - 40)
    dark = np.where(dist <= 5, 200, np.where(dist <= 8, 119, 20)).astype(np.uint8)  # a bright core in a fainter ring
    served = CellsegPyfunc()
    served.model = Inverting()
    on_dark, on_bright = served._labels([dark, 255 - dark], dict(DEFAULT_PARAMS))
    assert on_dark.max() == on_bright.max() == 1
    assert abs(int((on_dark > 0).sum()) - int((dist <= 8).sum())) < 10  # core and ring
    assert abs(int((on_bright > 0).sum()) - int((dist <= 5).sum())) < 10  # the core only
