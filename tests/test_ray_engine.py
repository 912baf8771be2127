"""Ray Data engine (cellseg infer --engine ray): same outputs as the local engine, a manifest,
bad files recorded, inputs from globs and list files, a clean shutdown."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from cellseg.batch import SUMMARY_NAME, InferOptions, segment_folder
from cellseg.data.io import read_image
from cellseg.errors import CellsegError
from cellseg.ray_engine import (
    MANIFEST_NAME,
    NEED_RAY,
    decode_bytes,
    plan_resources,
    resolve_inputs,
    segment_with_ray,
)

OPTS = dict(tile=64, overlap=0.125, batch_size=4)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    """A depth-2, 8-channel U-Net (random weights) exported to ONNX."""
    import torch

    from cellseg.config import Config
    from cellseg.export import export_onnx
    from cellseg.model import UNet

    cfg = Config()
    cfg.model.depth, cfg.model.base_channels = 2, 8
    torch.manual_seed(0)
    net = UNet(depth=2, base_channels=8).eval()
    return export_onnx(net, cfg, tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """4 synthetic 96x128 images and one corrupt PNG."""
    from cellseg.data.synth import write_dataset

    root = tmp_path_factory.mktemp("ray_data")
    write_dataset(root, n=4, size=(96, 128), seed=3)
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    return root / "images"


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- no Ray needed


def test_without_ray_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(CellsegError) as err:
        segment_with_ray(tmp_path / "m.onnx", tmp_path, tmp_path / "out", InferOptions())
    assert str(err.value) == NEED_RAY == "--engine ray needs Ray: pip install 'cellseg-unet[ray]'"


def test_cli_passes_tta_and_scale_to_ray(monkeypatch, tiny_onnx, image_folder, tmp_path):
    from typer.testing import CliRunner

    from cellseg import ray_engine
    from cellseg.cli import app

    seen = {}

    def fake(onnx_path, inp, out, opts, **kw):
        seen.update(kw, tile=opts.tile)
        raise CellsegError("stop here")

    monkeypatch.setattr(ray_engine, "segment_with_ray", fake)
    res = CliRunner().invoke(app, ["infer", str(image_folder), "--model", str(tiny_onnx), "--engine", "ray", "--tta",
                                   "--scale", "0.5", "--tile", "256", "-o", str(tmp_path / "out")])
    assert str(res.exception) == "stop here", res.output
    assert (seen["tta"], seen["scale"], seen["tile"]) == (True, 0.5, 512)
    assert seen["model_name"].endswith("(flip TTA) (scale 0.5)")


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_cli_infer_interrupted_says_how_to_go_on(monkeypatch, tiny_onnx, image_folder, tmp_path, engine):
    from typer.testing import CliRunner

    from cellseg import batch, ray_engine
    from cellseg.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "segment_folder", interrupted)
    monkeypatch.setattr(ray_engine, "segment_with_ray", interrupted)
    res = CliRunner().invoke(app, ["infer", str(image_folder), "--model", str(tiny_onnx), "--engine", engine, "-o", str(tmp_path / "o")])
    assert res.exit_code == 130
    assert "interrupted: the images finished so far keep their outputs; rerun the same command with --skip-existing" in res.output


def test_a_ray_run_that_cannot_start_leaves_no_output_folder(tiny_onnx, image_folder, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(CellsegError, match="--cpus-per-actor -1: expected a positive number"):
        segment_with_ray(tiny_onnx, image_folder, tmp_path / "a", InferOptions(**OPTS), cpus_per_actor=-1, progress=False)
    with pytest.raises(CellsegError, match="cannot connect to the Ray cluster at auto"):
        segment_with_ray(tiny_onnx, image_folder, tmp_path / "b", InferOptions(**OPTS), address="auto", progress=False)
    assert list(tmp_path.iterdir()) == []


def _write(path: Path, img: np.ndarray) -> Path:
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, img)
    else:
        assert cv2.imwrite(str(path), img)
    return path


def test_decode_bytes_reads_like_read_image(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    files = [
        _write(tmp_path / "g8.png", grey8),
        _write(tmp_path / "g16.png", (grey8.astype(np.uint16) * 250)),
        _write(tmp_path / "rgb.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)),
        _write(tmp_path / "rgba.png", rng.integers(0, 255, (20, 30, 4), dtype=np.uint8)),
        _write(tmp_path / "q.jpg", grey8),
        _write(tmp_path / "u16.tif", grey8.astype(np.uint16) * 3),
        _write(tmp_path / "f32.tiff", rng.random((20, 30), dtype=np.float32)),
        _write(tmp_path / "chw.tif", rng.integers(0, 999, (3, 20, 30), dtype=np.uint16)),
    ]
    for f in files:
        got = decode_bytes(f.read_bytes(), f)
        assert got.dtype == np.float32 and np.array_equal(got, read_image(f)), f.name

    bad = {
        "empty.png": b"",
        "junk.png": b"garbage",
        "junk.tif": b"II*\x00garbage",
        "nan.tif": None,
        "stack.tif": None,
    }
    tifffile.imwrite(tmp_path / "nan.tif", np.full((4, 4), np.nan, np.float32))
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 8, 8), np.uint8))
    bad["pages.tif"] = None  # two images of different shapes
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((6, 9), np.uint8), append=True)
    for name, data in bad.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(CellsegError) as local:
            read_image(path)
        with pytest.raises(CellsegError) as remote:
            decode_bytes(path.read_bytes(), path)
        assert str(remote.value) == str(local.value), name


def test_resolve_inputs_glob_list_file_and_folder(tmp_path):
    data = tmp_path / "data"
    (data / "a" / "deep").mkdir(parents=True)
    (data / "b").mkdir()
    (data / ".hidden").mkdir()
    img = np.full((8, 8), 7, np.uint8)
    for rel in ("a/x.png", "a/deep/y.tif", "b/z.png", ".hidden/h.png", "b/notes.txt"):
        _write(data / rel, img) if not rel.endswith(".txt") else (data / rel).write_text("hi")
    # an earlier run's results inside the tree are not inputs
    prev = data / "b" / "old_cellseg"
    prev.mkdir()
    (prev / SUMMARY_NAME).write_text(json.dumps({"format": "cellseg.infer/1"}))
    _write(prev / "z_masks.tif", img)

    g = resolve_inputs(str(data / "**" / "*.*"))
    assert g.kind == "glob" and g.root == data
    assert [p.relative_to(data).as_posix() for p in g.images] == ["a/deep/y.tif", "a/x.png", "b/z.png"]
    assert g.default_out == tmp_path / "data_cellseg" and not g.bad

    g1 = resolve_inputs(str(data / "a" / "*.png"))
    assert g1.root == data / "a" and [p.name for p in g1.images] == ["x.png"]
    with pytest.raises(CellsegError, match="no images"):
        resolve_inputs(str(data / "*.jpg"))

    lst = tmp_path / "batch.txt"
    lst.write_text("# my images\ndata/a/x.png\n\n  data/b/z.png  \n" f"{data / 'a' / 'deep' / 'y.tif'}\ndata/missing.png\ndata/b/notes.txt\ndata/a/x.png\n")
    li = resolve_inputs(lst)
    assert li.kind == "list" and li.root == data and li.default_out == tmp_path / "batch_cellseg"
    assert [p.relative_to(data).as_posix() for p in li.images] == ["a/deep/y.tif", "a/x.png", "b/z.png"]
    assert [(p.name, r.split(" (")[0]) for p, r in li.bad] == [("notes.txt", "not an image file"), ("missing.png", "no such file")]
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(links / "gone.png", links / "broken.png")
    os.symlink(links / "loop.png", links / "loop.png")
    lst.write_text("data/a/x.png\nlinks/broken.png\nlinks/loop.png\n")
    assert sorted((p.name, r) for p, r in resolve_inputs(lst).bad) == [
        ("broken.png", f"broken link (to {links / 'gone.png'})"), ("loop.png", "symbolic link loop")]
    _write(links / "ok.png", img)  # a folder holding them: they fail alone, as in the local engine (Ray's reader failed the job)
    fo = resolve_inputs(links)
    assert [p.name for p in fo.images] == ["ok.png"]
    assert sorted((p.name, r) for p, r in fo.bad) == [
        ("broken.png", f"broken link (to {links / 'gone.png'})"), ("loop.png", "symbolic link loop")]

    f = resolve_inputs(data / "a")
    assert f.kind == "folder" and [p.name for p in f.images] == ["x.png"]
    assert [p.name for p in resolve_inputs(data, recursive=True).images] == ["y.tif", "x.png", "z.png"]
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02")
    with pytest.raises(CellsegError, match="nor a text list"):
        resolve_inputs(tmp_path / "bin.dat")
    with pytest.raises(CellsegError, match="no such file or folder"):
        resolve_inputs(tmp_path / "nothing")


def test_plan_resources_leaves_cpus_to_the_read_tasks():
    assert plan_resources(2, 0, False) == (2, 0.75, 1)
    assert plan_resources(2, 0, False, num_actors=1) == (1, 1.5, 1)
    assert plan_resources(16, 0, False) == (16, 0.96, 1)
    assert plan_resources(16, 0, False, num_actors=2) == (2, 7.75, 7)
    assert plan_resources(8, 2, True) == (2, 3.75, 3)
    assert plan_resources(4, 0, False, num_actors=3, cpus_per_actor=1) == (3, 1.0, 1)
    with pytest.raises(CellsegError, match="stall"):
        plan_resources(2, 0, False, num_actors=2, cpus_per_actor=1)  # would hang: no CPU to read with
    with pytest.raises(CellsegError, match="GPU"):
        plan_resources(8, 1, True, num_actors=2)
    with pytest.raises(CellsegError):
        plan_resources(2, 0, False, num_actors=0)


def test_skip_existing_and_conflicts_are_decided_before_ray_starts(tiny_onnx, image_folder, tmp_path):
    ray = pytest.importorskip("ray")
    good = sorted(p for p in image_folder.glob("synth_*.png"))
    out = tmp_path / "out"
    out.mkdir()
    for p in good:
        tifffile.imwrite(out / f"{p.stem}_masks.tif", np.zeros((8, 8), np.uint16))  # results (read back as entries)
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in good) + "\n")
    with pytest.raises(CellsegError, match="already exists"):
        segment_with_ray(tiny_onnx, lst, out, InferOptions(**OPTS), progress=False)
    s = segment_with_ray(tiny_onnx, lst, out, InferOptions(**OPTS, skip_existing=True), progress=False)
    assert (s.processed, s.skipped, s.failed) == (0, 4, [])
    assert not ray.is_initialized()  # nothing to do: Ray was never started
    import pyarrow.parquet as pq

    rows = pq.read_table(out / MANIFEST_NAME).to_pylist()
    assert [r["status"] for r in rows] == ["skipped"] * 4 and [r["path"] for r in rows] == [str(p) for p in good]
    written = json.loads((out / SUMMARY_NAME).read_text())
    assert written["skipped"] == 4 and [(i["height"], i["objects"]) for i in written["images"]] == [(8, 0)] * 4

    report = tmp_path / "report"  # a folder holding an evaluate report's summary.json is refused, as locally
    report.mkdir()
    (report / SUMMARY_NAME).write_text(json.dumps({"map": 0.5, "params": {"split": "val"}}))
    with pytest.raises(CellsegError, match="not a cellseg infer summary"):
        segment_with_ray(tiny_onnx, lst, report, InferOptions(**OPTS, skip_existing=True), progress=False)
    assert sorted(p.name for p in report.iterdir()) == [SUMMARY_NAME]


def test_ray_reads_the_channel_the_model_was_trained_on(tiny_onnx, image_folder, tmp_path):
    """Without --channel the actors are told the model's own channel (train --channel), as locally."""
    ray = pytest.importorskip("ray")
    from cellseg.export import _store_metadata

    model = tmp_path / "ch1.onnx"
    shutil.copy(tiny_onnx, model)
    _store_metadata(model, {"cellseg.channel": "1"})
    good = sorted(image_folder.glob("synth_*.png"))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in good) + "\n")
    for extra, expected in (({}, 1), ({"channel": 0}, 0)):
        out = tmp_path / f"out{expected}"
        out.mkdir()
        for p in good:  # every image done already: the run plans and writes its summary without starting Ray
            tifffile.imwrite(out / f"{p.stem}_masks.tif", np.zeros((8, 8), np.uint16))
        segment_with_ray(model, lst, out, InferOptions(**OPTS, skip_existing=True, **extra), progress=False)
        assert not ray.is_initialized()
        assert json.loads((out / SUMMARY_NAME).read_text())["channel"] == expected


# ------------------------------------------------------------------------------------ with Ray


def _ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (Ray's temp folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\x00", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and int(pid) != os.getpid():
            found.append(f"{pid}: {cmd[:120]}")
    return found


@pytest.fixture
def ray_tmp(monkeypatch):
    """A short temp root of our own for a local Ray (its sockets live there); Ray shut down and the
    folder removed afterwards, whatever the test did."""
    ray = pytest.importorskip("ray")
    from cellseg import ray_engine

    short = Path(f"/tmp/rt-{uuid.uuid4().hex[:8]}")
    short.mkdir()
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setattr(ray_engine, "_short_tmp_root", lambda: str(short))
    yield short
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(short, ignore_errors=True)


@pytest.mark.slow
def test_ray_outputs_equal_the_local_engine(tiny_onnx, image_folder, tmp_path, ray_tmp):
    import ray

    from cellseg.inference import OnnxModel

    short = ray_tmp  # Ray's temp folder: ours to inspect
    opts = InferOptions(**OPTS, save_probs=True)
    local = segment_folder(OnnxModel(tiny_onnx, device="cpu"), image_folder, tmp_path / "local", opts, progress=False)
    s = segment_with_ray(tiny_onnx, image_folder, tmp_path / "ray", opts, num_actors=2, progress=False, device="cpu")

    # the job ended cleanly: Ray shut down, its processes gone, its temp folder removed
    assert not ray.is_initialized()
    deadline = time.time() + 20
    while _ray_processes(str(short)) and time.time() < deadline:
        time.sleep(0.5)
    assert _ray_processes(str(short)) == []
    assert list(short.iterdir()) == []

    # the same per-image outputs, identical
    a, b = _files(tmp_path / "local"), _files(tmp_path / "ray")
    assert set(b) == set(a) | {MANIFEST_NAME}
    masks = [k for k in a if k.endswith("_masks.tif")]
    assert len(masks) == 4
    for k in a:
        if k.endswith(".tif"):
            assert np.array_equal(tifffile.imread(a[k]), tifffile.imread(b[k])), k
            assert tifffile.imread(a[k]).dtype == tifffile.imread(b[k]).dtype
        elif k != SUMMARY_NAME:
            assert a[k].read_bytes() == b[k].read_bytes(), k

    # the same summary, failures included
    assert (s.processed, s.skipped, s.objects) == (local.processed, local.skipped, local.objects) == (4, 0, local.objects)
    assert s.failed == local.failed and len(s.failed) == 1
    assert s.failed[0][0].endswith("broken.png") and "cannot decode image" in s.failed[0][1]
    assert s.images == local.images
    sj = json.loads((tmp_path / "ray" / SUMMARY_NAME).read_text())
    lj = json.loads((tmp_path / "local" / SUMMARY_NAME).read_text())
    for key in ("format", "processed", "skipped", "failed", "objects", "images", "input", "tile", "overlap", "megapixels"):
        assert sj[key] == lj[key], key
    assert sj["engine"]["name"] == "ray" and sj["engine"]["actors"] == 2

    # the manifest: a row per input, the corrupt file failed with its reason
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "ray" / MANIFEST_NAME)
    assert table.column_names == ["path", "status", "error", "n_objects", "seconds", "worker"]
    rows = {Path(r["path"]).name: r for r in table.to_pylist()}
    assert len(rows) == 5
    assert rows["broken.png"]["status"] == "failed" and rows["broken.png"]["error"] == local.failed[0][1]
    oks = [r for n, r in rows.items() if n != "broken.png"]
    assert all(r["status"] == "ok" and r["error"] is None and r["worker"] and r["seconds"] >= 0 for r in oks)
    assert sum(r["n_objects"] for r in oks) == local.objects


def test_ray_starts_no_more_actors_than_it_has_blocks_of_images(tiny_onnx, image_folder, tmp_path, ray_tmp):
    """One image and --actors 3: one actor, without Ray's UserWarning about actors left idle."""
    import warnings

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted(image_folder.glob("synth_*.png"))[0], one)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = segment_with_ray(tiny_onnx, one, tmp_path / "out", InferOptions(**OPTS), num_actors=3, progress=False, device="cpu")
    assert s.processed == 1 and s.engine["actors"] == 1
    assert not [w for w in caught if "concurrent actors" in str(w.message)], [str(w.message) for w in caught]


def test_ray_takes_tta_and_scale_like_the_local_engine(tiny_onnx, image_folder, tmp_path, ray_tmp):
    from cellseg.inference import OnnxModel, with_settings

    opts = InferOptions(**OPTS, csv=False, overlay=False, save_probs=True)  # random weights: compare probabilities
    model = with_settings(OnnxModel(tiny_onnx, device="cpu"), tta=True, scale=2.0)
    local = segment_folder(model, image_folder, tmp_path / "local", opts, progress=False)
    plain = segment_folder(OnnxModel(tiny_onnx, device="cpu"), image_folder, tmp_path / "plain", opts, progress=False)
    s = segment_with_ray(tiny_onnx, image_folder, tmp_path / "ray", opts, num_actors=1, progress=False, device="cpu",
                         tta=True, scale=2.0)
    a, b, c = _files(tmp_path / "local"), _files(tmp_path / "ray"), _files(tmp_path / "plain")
    tifs = [k for k in a if k.endswith(".tif")]
    assert len(tifs) == 8 and set(tifs) == {k for k in b if k.endswith(".tif")}
    assert all(np.array_equal(tifffile.imread(a[k]), tifffile.imread(b[k])) for k in tifs)
    assert not any(np.array_equal(tifffile.imread(a[k]), tifffile.imread(c[k])) for k in tifs if "prob" in k)  # the settings matter
    sj = json.loads((tmp_path / "ray" / SUMMARY_NAME).read_text())
    assert (sj["tta"], sj["scale"]) == (True, 2.0) and s.postprocess == local.postprocess
    assert s.postprocess_bright == local.postprocess_bright == local.postprocess  # no bright-background point stored: the same
    assert (s.postprocess["min_size"], plain.postprocess.get("min_size")) == (2, None)  # default 10 model px: round(10 / 2²) image px
    with pytest.raises(CellsegError, match="--scale 0: expected"):
        segment_with_ray(tiny_onnx, image_folder, tmp_path / "bad", opts, progress=False, scale=0)
    assert not (tmp_path / "bad").exists()


def test_the_ray_actor_refuses_an_image_too_large_from_its_header(tiny_onnx, tmp_path, monkeypatch):
    """What a Ray actor does with each row, without Ray: an image larger than the free memory
    fails alone with the local engine's reason, refused from its header before decoding."""
    from cellseg import ray_engine, resources

    d = tmp_path / "imgs"
    d.mkdir()
    small, huge_png, huge_tif = d / "small.png", d / "huge.png", d / "huge.tif"
    cv2.imwrite(str(small), np.full((40, 48), 100, np.uint8))
    cv2.imwrite(str(huge_png), np.full((400, 480), 100, np.uint8))
    tifffile.imwrite(huge_tif, np.zeros((300, 200, 3), np.uint8))
    monkeypatch.setattr(resources, "available_memory", lambda: resources.segmenting_bytes(100, 100))
    decoded = []
    monkeypatch.setattr(ray_engine, "decode_bytes", lambda data, name, *a: decoded.append(Path(name).name) or decode_bytes(data, name, *a))
    opts = InferOptions(**OPTS)
    seg = ray_engine._Segmenter(tiny_onnx.read_bytes(), tiny_onnx.name, "cpu", 1, str(d), str(tmp_path / "out"), {}, opts)
    paths = [small, huge_png, huge_tif]
    out = seg({"path": np.array([str(p) for p in paths], dtype=object),
               "bytes": np.array([p.read_bytes() for p in paths], dtype=object)})
    assert list(out["status"]) == ["ok", "failed", "failed"]
    assert decoded == ["small.png"]  # the huge ones were refused from their headers, not decoded
    assert out["error"][1].startswith("480x400 image (0.2 megapixels) needs about") and out["error"][1].endswith("crop it into smaller images")
    assert out["error"][2].startswith("200x300 image")
    assert (tmp_path / "out" / "small_masks.tif").exists() and not (tmp_path / "out" / "huge_masks.tif").exists()


def test_the_ray_actor_reads_the_chosen_channel(tiny_onnx, tmp_path):
    """--channel reaches the actors' decoding: a 2-channel ImageJ TIFF fails without it, as in the
    local engine, and is segmented with it."""
    from cellseg import ray_engine

    d = tmp_path / "imgs"
    d.mkdir()
    two = d / "two.tif"
    tifffile.imwrite(two, np.zeros((2, 40, 48), np.uint16), imagej=True, metadata={"axes": "CYX"})
    rows = {"path": np.array([str(two)], dtype=object), "bytes": np.array([two.read_bytes()], dtype=object)}
    errors = []
    for channel, status in ((None, "failed"), (1, "ok")):
        opts = InferOptions(**OPTS, channel=channel)
        seg = ray_engine._Segmenter(tiny_onnx.read_bytes(), tiny_onnx.name, "cpu", 1, str(d), str(tmp_path / f"out{channel}"), {}, opts)
        out = seg(dict(rows))
        assert list(out["status"]) == [status], out["error"]
        errors.append(out["error"][0])
    assert errors[0] == "40x48 image with 2 channels (CYX); pick the nuclear stain with --channel K (or train with it: the model then reads it), or save it as its own 2-D image"
    assert (tmp_path / "out1" / "two_masks.tif").is_file()


def test_a_ctrl_c_while_ray_starts_shuts_it_down_and_removes_its_folder(monkeypatch):
    """An interrupt inside ray.init: what had started is shut down and the private temp folder removed
    (Ray agents were left orphaned and a /tmp/cs-ray-* folder behind)."""
    from cellseg import ray_engine

    calls = []

    class FakeRay:
        initialized = False

        def is_initialized(self):
            return self.initialized

        def init(self, **kwargs):
            calls.append(kwargs["_temp_dir"])
            self.initialized = True  # half started
            raise KeyboardInterrupt

        def shutdown(self):
            calls.append("shutdown")
            self.initialized = False

    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(KeyboardInterrupt):
        ray_engine._RaySession(FakeRay(), None, None, use_gpu_locally=False)
    assert calls[1:] == ["shutdown"] and not os.path.exists(calls[0]) and "RAY_AUTH_MODE" not in os.environ
