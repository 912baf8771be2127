"""Folder segmentation (cellseg infer): outputs, failures, overwrite rules, atomicity, safe names."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import cellseg.batch as batch
from cellseg.batch import (
    CSV_COLUMNS,
    InferOptions,
    collect_inputs,
    default_output_dir,
    object_table,
    output_paths,
    plan_outputs,
    segment_folder,
)
from cellseg.data.io import read_image
from cellseg.errors import CellsegError


class FakeModel:
    """Per-pixel logits: normalised intensity above 0.5 is cell interior, the rest background."""

    size_multiple = 4
    low_percentile = 1.0
    high_percentile = 99.8
    in_channels = 1
    provider = "fake"
    run_id = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert x.ndim == 4 and x.shape[1] == 1
        k = 20.0 * (x[:, 0] - 0.5)
        return np.stack([-k, k, np.full_like(k, -10.0)], axis=1).astype(np.float32)


MODEL = FakeModel()
FAST = dict(tile=32, overlap=0.125, batch_size=4)


def _image(h=40, w=48, squares=((4, 6), (20, 28)), side=8, dtype=np.uint8, seed=0) -> np.ndarray:
    """Dim noisy background with bright squares (top-left corners given)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(5, 20, size=(h, w)).astype(np.float64)
    for y, x in squares:
        img[y : y + side, x : x + side] = 200
    if dtype == np.uint16:
        img *= 100
    return img.astype(dtype)


def _png(path: Path, img: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), img)
    return path


def _good_folder(root: Path, n: int = 3) -> Path:
    d = root / "imgs"
    d.mkdir()
    _png(d / "a.png", _image(seed=1))
    tifffile.imwrite(d / "b.tif", _image(dtype=np.uint16, seed=2, squares=((10, 10),)))
    if n >= 3:
        rgba = np.repeat(_image(seed=3, squares=((2, 2), (25, 30), (28, 5)))[..., None], 4, axis=2)
        rgba[..., 3] = 255
        _png(d / "c.png", rgba)  # 4 channels (BGRA): read as the mean of the colours
    return d


def _run(inp, out=None, **kw) -> batch.InferSummary:
    opts = InferOptions(**{**FAST, **kw})
    return segment_folder(MODEL, inp, out, opts, progress=False, model_name="fake.onnx")


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------ basics


def test_good_and_bad_files(tmp_path):
    d = _good_folder(tmp_path)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (d / "empty.tif").write_bytes(b"")
    (d / "x.png").write_text("not an image at all")
    tifffile.imwrite(d / "nan.tif", np.full((8, 8), np.nan, np.float32))
    tifffile.imwrite(d / "stack.tif", np.zeros((5, 16, 16), np.uint8))
    (d / "notes.txt").write_text("ignored")
    _png(d / ".hidden.png", _image())  # ignored
    out = tmp_path / "out"

    s = _run(d, out, save_probs=True)

    assert s.processed == 3 and s.skipped == 0
    reasons = dict(s.failed)
    assert set(reasons) == {str(d / n) for n in ("corrupt.png", "empty.tif", "x.png", "nan.tif", "stack.tif")}
    assert "empty" in reasons[str(d / "empty.tif")]
    assert "decode" in reasons[str(d / "x.png")] and "decode" in reasons[str(d / "corrupt.png")]
    assert "NaN" in reasons[str(d / "nan.tif")]
    assert "stack" in reasons[str(d / "stack.tif")]
    assert _files(out) == {"summary.json"} | {f"{s}{k}" for s in "abc" for k in ("_masks.tif", "_probs.tif", "_overlay.png", "_objects.csv")}
    for stem, n_obj in (("a", 2), ("b", 1), ("c", 3)):
        masks = tifffile.imread(out / f"{stem}_masks.tif")
        assert masks.dtype == np.uint16 and masks.shape == (40, 48)
        assert masks.max() == n_obj
        probs = tifffile.imread(out / f"{stem}_probs.tif")
        assert probs.dtype == np.float16 and probs.shape == (3, 40, 48)
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=2e-3)
        overlay = cv2.imread(str(out / f"{stem}_overlay.png"), cv2.IMREAD_UNCHANGED)
        assert overlay.dtype == np.uint8 and overlay.shape == (40, 48, 3)
        lines = (out / f"{stem}_objects.csv").read_text().splitlines()
        assert lines[0] == ",".join(CSV_COLUMNS) and len(lines) == 1 + n_obj
    assert s.objects == 6
    assert not list(out.glob(".*")), "temporary files left"

    data = json.loads((out / "summary.json").read_text())
    assert data["format"] == batch.SUMMARY_FORMAT
    assert data["processed"] == 3 and data["skipped"] == 0 and data["objects"] == 6
    assert data["model"] == "fake.onnx" and data["provider"] == "fake"
    assert data["tile"] == 32 and data["batch_size"] == 4 and data["overlap"] == 0.125
    assert data["output"] == str(out) and data["input"] == str(d)
    assert {f["path"] for f in data["failed"]} == set(reasons)
    assert all(f["reason"] for f in data["failed"])
    assert data["megapixels"] == pytest.approx(3 * 40 * 48 / 1e6, abs=1e-3)
    assert data["seconds"] >= 0 and data["images_per_s"] > 0 and "megapixels_per_s" in data
    assert [r["masks"] for r in data["images"]] == ["a_masks.tif", "b_masks.tif", "c_masks.tif"]
    assert not s.ok


def test_optional_outputs_off_and_inline_reading(tmp_path):
    d = _good_folder(tmp_path, n=2)
    s = _run(d, tmp_path / "o", overlay=False, csv=False, prefetch=0, workers=1, batch_size=1)
    assert s.processed == 2 and s.ok
    assert _files(tmp_path / "o") == {"summary.json", "a_masks.tif", "b_masks.tif"}


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(CellsegError, match=r"nope: no such file or folder$"):
        _run(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(CellsegError) as e:
        _run(empty)
    assert str(e.value) == f"{empty}: no images (.png, .tif, .tiff, .jpg, .jpeg) found"
    assert not (tmp_path / "empty_cellseg").exists()
    (empty / "sub").mkdir()
    _png(empty / "sub" / "a.png", _image())
    with pytest.raises(CellsegError, match="--recursive"):
        _run(empty)
    with pytest.raises(CellsegError, match=r"not an image file \(.*\); globs and lists of paths are read by --engine ray"):
        _run(empty / "readme.txt")  # a list of paths, as --engine ray takes
    with pytest.raises(CellsegError, match=r"\*.png: no such file or folder; globs and lists of paths are read by --engine ray"):
        _run(empty / "sub" / "*.png")


def test_invalid_options_refused_before_writing(tmp_path):
    d = _good_folder(tmp_path, n=2)
    for kw in (dict(tile=0), dict(overlap=1.0), dict(batch_size=0), dict(prefetch=-1)):
        with pytest.raises(CellsegError):
            _run(d, tmp_path / "o", **kw)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ overwrite rules


def test_overwrite_and_skip_existing(tmp_path):
    d = _good_folder(tmp_path)
    out = tmp_path / "out"
    assert _run(d, out).processed == 3
    before = (out / "a_overlay.png").stat().st_mtime_ns

    with pytest.raises(CellsegError) as e:
        _run(d, out)
    assert str(e.value) == (
        f"{out / 'a_objects.csv'}: output already exists; use --overwrite to replace existing outputs "
        "or --skip-existing to segment only the images without a _masks.tif"
    )

    s = _run(d, out, overwrite=True)
    assert s.processed == 3 and s.skipped == 0
    assert (out / "a_overlay.png").stat().st_mtime_ns >= before

    full = json.loads((out / "summary.json").read_text())["images"]
    (out / "b_masks.tif").unlink()
    s = _run(d, out, skip_existing=True)
    assert (s.processed, s.skipped) == (1, 2)
    assert (out / "b_masks.tif").is_file()
    written = json.loads((out / "summary.json").read_text())
    assert written["processed"] == 1
    # the summary still describes every image of the folder: the skipped ones keep their entries
    assert written["images"] == full and [r["input"] for r in s.images] == [str(d / n) for n in ("a.png", "b.tif", "c.png")]

    s = _run(d, out, skip_existing=True)
    assert (s.processed, s.skipped) == (0, 3)
    assert json.loads((out / "summary.json").read_text())["images"] == full

    # no summary.json (an interrupted run writes none): the entries are read back from the label TIFFs
    (out / "summary.json").unlink()
    s = _run(d, out, skip_existing=True)
    assert (s.processed, s.skipped) == (0, 3) and s.images == full
    # without an entry, a damaged label TIFF is not a result: that image is segmented again
    (out / "summary.json").unlink()
    (out / "c_masks.tif").write_bytes(b"II*\x00" + b"\x00" * 50)
    s = _run(d, out, skip_existing=True)
    assert (s.processed, s.skipped) == (1, 2) and s.images == full
    assert tifffile.imread(out / "c_masks.tif").shape == (40, 48)

    # --overwrite with fewer outputs removes the replaced result's other files (no stale overlay or table)
    s = _run(d, out, overwrite=True, overlay=False, csv=False)
    assert s.processed == 3 and not list(out.glob("*_overlay.png")) and not list(out.glob("*_objects.csv"))
    assert len(list(out.glob("*_masks.tif"))) == 3


def test_user_files_are_never_removed_without_overwrite_and_entries_survive_another_path(tmp_path):
    d = _good_folder(tmp_path, n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_overlay.png").write_bytes(b"the user's own file")  # no summary.json: not from a run
    _run(d, out, overlay=False)
    assert (out / "a_overlay.png").read_bytes() == b"the user's own file"
    first = json.loads((out / "summary.json").read_text())["images"]
    link = tmp_path / "link"
    link.symlink_to(d, target_is_directory=True)
    (out / "b_masks.tif").unlink()
    _run(link, out, skip_existing=True, overlay=False)  # the same images through another path
    names = [e["masks"] for e in json.loads((out / "summary.json").read_text())["images"]]
    kept = {**first[0], "input": str(link / "a.png")}  # its counts survive; the input is named as given now
    assert names == ["a_masks.tif", "b_masks.tif"] and kept in json.loads((out / "summary.json").read_text())["images"]


def test_an_output_named_like_an_image_is_refused(tmp_path):
    d = _good_folder(tmp_path, n=1)
    with pytest.raises(CellsegError, match=r"result.png: the output is a folder \(several files per image\), not an image file; drop the .png"):
        _run(d, tmp_path / "result.png")
    assert not (tmp_path / "result.png").exists()


def test_a_damaged_earlier_summary(tmp_path):
    d = _good_folder(tmp_path, n=2)
    out = tmp_path / "out"
    full = _run(d, out).images
    summary = out / "summary.json"
    summary.write_text(json.dumps({"format": batch.SUMMARY_FORMAT, "images": None}))
    # no usable entries, no traceback: they are read back from the label TIFFs
    assert _run(d, out, skip_existing=True).images == full
    summary.write_text("{not json")
    with pytest.raises(CellsegError, match=r"summary.json: unreadable summary.json \(JSONDecodeError\); use --overwrite"):
        _run(d, out, skip_existing=True)
    assert _run(d, out, overwrite=True).processed == 2


def test_infer_refuses_a_folder_holding_another_commands_summary(tmp_path):
    d = _good_folder(tmp_path, n=2)
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"map": 0.5, "params": {"split": "val"}}))
    for kw in ({}, {"skip_existing": True}, {"overwrite": True}):
        with pytest.raises(CellsegError, match=r"summary.json: not a cellseg infer summary \(an evaluate report\?\)"):
            _run(d, out, **kw)
    assert _files(out) == {"summary.json"}


def test_new_images_do_not_conflict_but_summary_does(tmp_path):
    d = _good_folder(tmp_path, n=2)
    out = tmp_path / "out"
    other = tmp_path / "other"
    other.mkdir()
    _png(other / "z.png", _image())
    _run(d, out)
    with pytest.raises(CellsegError, match="summary.json: output already exists"):
        _run(other, out)


class Killed(BaseException):
    """Stands for SIGINT/SIGTERM arriving in the middle of a write."""


def _die():
    raise Killed()


def test_kill_mid_write_leaves_complete_files_only(tmp_path, monkeypatch):
    d = _good_folder(tmp_path)
    out = tmp_path / "out"
    real = tifffile.imwrite
    calls = []

    def dying_imwrite(path, data, *a, **kw):
        if "_masks" in str(path):
            calls.append(path)
            if len(calls) == 2:  # the 2nd image: write half a file, then die
                Path(path).write_bytes(b"II*\x00" + b"\x00" * 50)
                raise Killed()
        return real(path, data, *a, **kw)

    monkeypatch.setattr(tifffile, "imwrite", dying_imwrite)
    with pytest.raises(Killed):
        _run(d, out, workers=1)
    monkeypatch.setattr(tifffile, "imwrite", real)
    assert not [t for t in threading.enumerate() if t.name.startswith(("cellseg-prefetch", "cellseg-write"))]

    assert not [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    done = {p.name for p in out.glob("*_masks.tif")}
    assert "b_masks.tif" not in done and "a_masks.tif" in done
    for name in done:  # every masks file present is complete
        assert tifffile.imread(out / name).shape == (40, 48)
    # only the provisional summary: the folder is known as an output folder, its results are not inputs
    provisional = json.loads((out / "summary.json").read_text())
    assert provisional == {"format": batch.SUMMARY_FORMAT, "finished": False, "images": [], "settings": provisional["settings"],
                           "pending": [{"input": str(d / n), "masks": f"{Path(n).stem}_masks.tif"} for n in ("a.png", "b.tif", "c.png")]}
    assert set(provisional["settings"]) == set(batch.SETTING_KEYS) and provisional["settings"]["model"] == "fake.onnx"
    assert all(not p.name.endswith("_masks.tif") for p in collect_inputs(tmp_path, recursive=True, out_dir=tmp_path / "elsewhere"))

    # a real kill -9 can leave a temporary file: the next run removes it
    stale = out / ".b_masks.tif.abc123.tmp.tif"
    stale.write_bytes(b"partial")
    with pytest.raises(CellsegError, match="already exists"):
        _run(d, out)
    s = _run(d, out, skip_existing=True)
    assert s.processed == 3 - len(done) and s.skipped == len(done) and s.ok
    assert {p.name for p in out.glob("*_masks.tif")} == {"a_masks.tif", "b_masks.tif", "c_masks.tif"}
    assert not stale.exists()


# ----------------------------------------------------------------------------------- locations


def test_default_output_dir_is_beside_the_input(tmp_path, monkeypatch):
    d = _good_folder(tmp_path, n=2)
    assert default_output_dir(d) == tmp_path / "imgs_cellseg"
    assert default_output_dir(str(d) + "/") == tmp_path / "imgs_cellseg"
    assert default_output_dir(d / "a.png") == d / "a_cellseg"
    monkeypatch.chdir(d)
    assert default_output_dir(".") == tmp_path / "imgs_cellseg"

    before = _files(d)
    s = _run(d)
    assert s.output == str(tmp_path / "imgs_cellseg") and s.processed == 2
    assert (tmp_path / "imgs_cellseg" / "a_masks.tif").is_file()
    assert _files(d) == before  # nothing written inside the input

    s = _run(d / "a.png")
    assert s.processed == 1 and (d / "a_cellseg" / "a_masks.tif").is_file()
    # that result folder is not taken as input by a later recursive run of the parent folder
    assert collect_inputs(d, recursive=True) == [d / "a.png", d / "b.tif"]


def test_output_inside_input_is_not_reread(tmp_path):
    d = _good_folder(tmp_path, n=2)
    s = _run(d, d)  # -o the input folder itself
    assert s.processed == 2
    assert collect_inputs(d, out_dir=d) == [d / "a.png", d / "b.tif"]
    assert _run(d, d, skip_existing=True).skipped == 2
    s = _run(d, d / "res", recursive=True)
    assert s.processed == 2
    assert _run(d, d / "res", recursive=True, skip_existing=True).skipped == 2


def test_image_folder_used_as_output_is_still_searched(tmp_path):
    d = _good_folder(tmp_path, n=2)
    assert _run(d, d).processed == 2  # results written beside the images (-o the input folder)
    (d / "sub").mkdir()
    _png(d / "sub" / "c.png", _image(seed=4))
    _run(d / "sub", d / "sub" / "res")  # and an output folder inside a sub-folder
    # a later recursive run of the parent takes the images of both, not their results
    found = collect_inputs(tmp_path, recursive=True, out_dir=tmp_path / "all")
    assert found == [d / "a.png", d / "b.tif", d / "sub" / "c.png"]
    s = _run(tmp_path, tmp_path / "all", recursive=True)
    assert s.processed == 3 and (tmp_path / "all" / "imgs" / "a_masks.tif").is_file()


def test_output_folder_not_writable(tmp_path):
    d = _good_folder(tmp_path, n=2)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    calls = []
    orig = batch.read_image
    batch.read_image = lambda p: calls.append(p) or orig(p)
    try:
        for out, message in ((blocker / "sub", "output folder is not writable"), (blocker, "is a file, not a folder")):
            with pytest.raises(CellsegError) as e:
                _run(d, out)
            assert str(e.value).startswith(f"{out}: {message}")
        if os.geteuid() != 0:  # root ignores permission bits
            locked = tmp_path / "locked"
            locked.mkdir()
            locked.chmod(0o500)
            try:
                with pytest.raises(CellsegError, match="output folder is not writable"):
                    _run(d, locked)
            finally:
                locked.chmod(0o700)
    finally:
        batch.read_image = orig
    assert calls == []  # refused before reading any image


def test_a_dataset_stays_a_dataset(tmp_path):
    """A dataset's masks/ are labels, not images to segment, and its images/ and masks/ folders
    take no outputs (a *_masks.tif in masks/ is a mask without an image)."""
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    (ds / "masks").mkdir()
    _png(ds / "images" / "a.png", _image())
    cv2.imwrite(str(ds / "masks" / "a.png"), (_image() > 0).astype(np.uint8))
    assert collect_inputs(ds, recursive=True) == [ds / "images" / "a.png"]
    assert collect_inputs(tmp_path, recursive=True) == [ds / "images" / "a.png"]
    with pytest.raises(CellsegError, match=f"{ds}: no images .*it is a dataset: segment {ds / 'images'}, or score it with cellseg evaluate"):
        collect_inputs(ds)
    for part in ("masks", "images"):
        with pytest.raises(CellsegError) as e:
            _run(ds / "images", ds / part)
        assert str(e.value) == (f"{ds / part}: is the {part}/ folder of the dataset {ds}; outputs there would break "
                                "its images/ and masks/ pairs: choose another output folder")
    assert sorted(p.name for p in ds.rglob("*")) == ["a.png", "a.png", "images", "masks"]  # nothing written
    assert _run(ds / "images", ds / "pred").processed == 1  # beside them is fine
    with pytest.raises(CellsegError, match=r"masks: is the masks/ folder of the dataset .*ds \(labels, not images\); segment its images/"):
        collect_inputs(ds / "masks")  # even asked for by name (it used to segment the labels)


def test_recursive_keeps_structure(tmp_path):
    d = _good_folder(tmp_path, n=2)
    (d / "s1" / "deep").mkdir(parents=True)
    (d / ".git").mkdir()
    _png(d / "s1" / "a.png", _image(seed=5))
    _png(d / "s1" / "deep" / "q.png", _image(seed=6))
    _png(d / ".git" / "h.png", _image())
    os.symlink(d / "s1", d / "loop")  # a symlinked folder is not descended

    out = tmp_path / "out"
    assert _run(d, out).processed == 2  # not recursive: top level only
    s = _run(d, out, recursive=True, skip_existing=True)
    assert (s.processed, s.skipped) == (2, 2)
    masks = {str(p.relative_to(out)) for p in out.rglob("*_masks.tif")}
    assert masks == {"a_masks.tif", "b_masks.tif", "s1/a_masks.tif", "s1/deep/q_masks.tif"}


def test_same_stem_images_get_distinct_outputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _png(d / "a.png", _image(squares=((4, 6),)))
    tifffile.imwrite(d / "a.tif", _image(squares=((4, 6), (20, 28))))
    _png(d / "b.png", _image())
    s = _run(d, tmp_path / "out")
    assert s.processed == 3
    out = tmp_path / "out"
    assert tifffile.imread(out / "a.png_masks.tif").max() == 1
    assert tifffile.imread(out / "a.tif_masks.tif").max() == 2
    assert (out / "b_masks.tif").is_file()


# ---------------------------------------------------------------------------------- hostile names


def test_hostile_names_cannot_escape(tmp_path):
    root = tmp_path / "in"
    out = tmp_path / "out"
    root.mkdir()
    # path tricks relative to the input root are refused
    for trick in (root / ".." / "x.png", tmp_path / "x.png", Path("/etc/x.png")):
        with pytest.raises(CellsegError, match="not inside the input folder"):
            output_paths(root, trick, out)
    # hostile but legal names stay inside the output folder, never hidden
    for name, stem in (("..x.png", "__x"), ("..png", "_"), ("a\\..\\b.png", "a_.._b"), ("x\x01y.png", "x_y")):
        paths = output_paths(root, root / name, out)
        assert paths["masks"] == out / f"{stem}_masks.tif", name
        assert paths["masks"].parent == out
    assert output_paths(root, root / "..d" / "..x.png", out)["csv"] == out / "__d" / "__x_objects.csv"
    # a single hostile file given directly works and writes inside the output folder
    hostile = root / "..x.png"
    _png(hostile, _image())
    s = _run(hostile, out)
    assert s.processed == 1 and (out / "__x_masks.tif").is_file()
    assert _run(hostile).output == str(root / "__x_cellseg")
    assert _files(tmp_path) - {f"out/{f}" for f in _files(out)} - {f"in/{f}" for f in _files(root)} == set()


def test_symlinks_cannot_redirect_outputs(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    _png(root / "sub" / "a.png", _image())
    _png(outside / "target.png", _image())
    os.symlink(outside / "target.png", root / "link.png")  # a linked file: output named after the link
    os.symlink(tmp_path / "missing.png", root / "broken.png")  # a broken link: a failure
    os.symlink(root / "loop.png", root / "loop.png")  # a link to itself: a failure, said as such
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "sub")  # an output sub-folder leading elsewhere
    s = _run(root, out, recursive=True)
    assert s.processed == 1 and (out / "link_masks.tif").is_file()
    reasons = dict(s.failed)
    assert "outside" in reasons[str(root / "sub" / "a.png")]
    assert reasons[str(root / "broken.png")] == f"broken link (to {tmp_path / 'missing.png'})"
    assert reasons[str(root / "loop.png")] == "symbolic link loop"
    assert sorted(p.name for p in outside.iterdir()) == ["target.png"]  # nothing written there


# ------------------------------------------------------------------------------ image edge cases


def test_tiny_and_flat_images(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _png(d / "one.png", np.full((1, 1), 7, np.uint8))
    _png(d / "zero.png", np.zeros((30, 17), np.uint8))
    tifffile.imwrite(d / "row.tif", np.linspace(0, 1, 13, dtype=np.float32)[None])
    _png(d / "rgb1.png", np.full((1, 1, 3), 9, np.uint8))
    _png(d / "col.png", np.arange(11, dtype=np.uint8)[:, None])
    s = _run(d, tmp_path / "out", save_probs=True)
    assert s.processed == 5 and s.ok and s.objects == 0
    out = tmp_path / "out"
    assert tifffile.imread(out / "one_masks.tif").shape == (1, 1)
    assert tifffile.imread(out / "one_probs.tif").shape == (3, 1, 1)
    assert tifffile.imread(out / "zero_masks.tif").max() == 0
    assert tifffile.imread(out / "row_masks.tif").shape == (1, 13)
    assert tifffile.imread(out / "rgb1_masks.tif").shape == (1, 1)
    assert tifffile.imread(out / "col_masks.tif").shape == (11, 1)
    assert (out / "zero_objects.csv").read_text().splitlines() == [",".join(CSV_COLUMNS)]


def test_csv_matches_labels_and_raw_image(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    img = _image(h=50, w=60, squares=((5, 7), (30, 40)), side=9, dtype=np.uint16)
    img[30:39, 40:49] = 12345  # a second, dimmer square
    tifffile.imwrite(d / "sq.tif", img)
    out = tmp_path / "out"
    _run(d, out)
    labels = tifffile.imread(out / "sq_masks.tif").astype(np.int64)
    rows = (out / "sq_objects.csv").read_text().splitlines()
    assert rows[0].split(",") == list(CSV_COLUMNS)
    table = [dict(zip(CSV_COLUMNS, map(float, r.split(",")))) for r in rows[1:]]
    assert len(table) == labels.max() == 2
    for row in table:
        m = labels == row["label"]
        ys, xs = np.nonzero(m)
        assert row["area"] == m.sum()
        assert row["centroid_y"] == pytest.approx(ys.mean(), abs=1e-3)
        assert row["centroid_x"] == pytest.approx(xs.mean(), abs=1e-3)
        assert (row["bbox_y0"], row["bbox_x0"], row["bbox_y1"], row["bbox_x1"]) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        assert row["mean_intensity"] == pytest.approx(img[m].mean(), rel=1e-5)
    # the bright square is one object covering it (the fake model thresholds at mid-intensity)
    first = labels[5:14, 7:16]
    assert (first > 0).all() and len(np.unique(first)) == 1


def test_object_table_matches_brute_force():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=(37, 23)).astype(np.int32)
    labels[labels == 3] = 0  # a missing id
    raw = rng.random((37, 23)).astype(np.float32)
    t = object_table(labels, raw)
    assert t["label"].tolist() == [1, 2, 4, 5]
    for i, lab in enumerate(t["label"]):
        ys, xs = np.nonzero(labels == lab)
        assert t["area"][i] == ys.size
        assert t["centroid_y"][i] == pytest.approx(ys.mean()) and t["centroid_x"][i] == pytest.approx(xs.mean())
        assert t["mean_intensity"][i] == pytest.approx(raw[labels == lab].mean(), rel=1e-6)
        assert (t["bbox_y0"][i], t["bbox_x1"][i]) == (ys.min(), xs.max() + 1)
    empty = object_table(np.zeros((4, 4), np.int32), np.zeros((4, 4)))
    assert all(len(v) == 0 for v in empty.values())


def test_plan_outputs_unique_after_neutralising(tmp_path):
    root = tmp_path / "in"
    imgs = [root / "a:b.png", root / "a_b.png", root / "A_b.png", root / "x.png"]
    plans = plan_outputs(root, imgs, tmp_path / "o")
    names = [p["masks"].name for p in plans]
    assert len({n.lower() for n in names}) == 4 and names[-1] == "x_masks.tif"


# --------------------------------------------------------------------------------- real model, UI


def test_real_unet_and_progress_bar(tmp_path, capsys):
    import torch

    from cellseg.inference import TorchModel
    from cellseg.model import UNet

    torch.manual_seed(0)
    model = TorchModel(UNet(1, 3, depth=2, base_channels=8).eval(), device="cpu")
    d = _good_folder(tmp_path, n=2)
    _png(d / "one.png", np.full((1, 1), 3, np.uint8))
    out = tmp_path / "out"
    s = segment_folder(model, d, out, InferOptions(tile=32, batch_size=3), progress=True)
    assert s.processed == 3 and s.ok and s.provider == "torch:cpu"
    for stem, shape in (("a", (40, 48)), ("b", (40, 48)), ("one", (1, 1))):
        labels = tifffile.imread(out / f"{stem}_masks.tif")
        assert labels.shape == shape and labels.dtype == np.uint16
        n = len((out / f"{stem}_objects.csv").read_text().splitlines()) - 1
        assert n == labels.max()
    assert capsys.readouterr().out == ""  # progress goes to stderr


def test_model_with_wrong_channels_refused(tmp_path):
    d = _good_folder(tmp_path, n=2)

    class Rgb(FakeModel):
        in_channels = 3

    with pytest.raises(CellsegError, match="3 input channels"):
        segment_folder(Rgb(), d, tmp_path / "o", InferOptions(), progress=False)


def test_streamed_overlay_has_the_same_pixels(tmp_path, monkeypatch):
    """Huge overlays are compressed band by band: the decoded pixels equal OpenCV's encoding."""
    d = _good_folder(tmp_path, n=2)
    _run(d, tmp_path / "small")
    monkeypatch.setattr(batch, "STREAMED_PNG_PIXELS", 100)  # every image counts as huge
    monkeypatch.setattr(batch, "write_png", None)  # the OpenCV path must not be taken
    _run(d, tmp_path / "big")
    for name in ("a_overlay.png", "b_overlay.png"):
        a = cv2.imread(str(tmp_path / "small" / name), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "big" / name), cv2.IMREAD_UNCHANGED)
        assert a is not None and a.shape == b.shape and np.array_equal(a, b)
        assert (a[..., 2] == 255).any()  # contours in red (BGR order on disk)


def test_png_bands_writer_checks_its_rows(tmp_path):
    from cellseg.data.io import write_png_bands

    band = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(CellsegError, match="3 PNG rows|rows written"):
        write_png_bands(tmp_path / "x.png", 7, 5, [band])
    with pytest.raises(CellsegError, match="expected"):
        write_png_bands(tmp_path / "x.png", 4, 6, [band])
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left
    write_png_bands(tmp_path / "x.png", 8, 5, [band, band + 9])
    assert cv2.imread(str(tmp_path / "x.png")).shape == (8, 5, 3)


def test_an_image_too_large_for_the_memory_fails_alone(tmp_path, monkeypatch):
    from cellseg import resources

    d = _good_folder(tmp_path, n=2)
    _png(d / "huge.png", _image(h=400, w=480, seed=5))
    tifffile.imwrite(d / "huge_rgb.tif", np.zeros((300, 200, 3), np.uint8))
    # room for a 40x48 image, not for a 400x480 one
    monkeypatch.setattr(resources, "available_memory", lambda: resources.segmenting_bytes(100, 100))
    decoded = []
    monkeypatch.setattr(batch, "read_image", lambda p, **kw: decoded.append(Path(p).name) or read_image(p, **kw))
    s = _run(d, tmp_path / "out")
    assert s.processed == 2 and [p for p, _ in s.failed] == [str(d / "huge.png"), str(d / "huge_rgb.tif")]
    assert sorted(decoded) == ["a.png", "b.tif"]  # the huge ones were refused from their headers, not read
    reason = s.failed[0][1]
    assert reason.startswith("480x400 image (0.2 megapixels) needs about") and reason.endswith("crop it into smaller images")
    assert s.failed[1][1].startswith("200x300 image")
    assert not (tmp_path / "out" / "huge_masks.tif").exists()
    # --probs needs more
    monkeypatch.setattr(resources, "available_memory", lambda: resources.segmenting_bytes(40, 48) + 1)
    s = _run(d, tmp_path / "out2", save_probs=True)
    assert s.processed == 0 and "with --probs" in s.failed[0][1]



def test_summary_lists_inputs_by_absolute_path(tmp_path, monkeypatch):
    d = _good_folder(tmp_path, n=2)
    monkeypatch.chdir(tmp_path)
    s = _run(Path("imgs"), Path("out"))  # relative paths, as typed
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [i["input"] for i in written["images"]] == [str(d / "a.png"), str(d / "b.tif")]
    assert written["input"] == str(d) and [i["masks"] for i in s.images] == ["a_masks.tif", "b_masks.tif"]


def test_kept_entries_name_the_input_as_now(tmp_path, monkeypatch):
    d = _good_folder(tmp_path, n=2)
    out = tmp_path / "out"
    _run(d, out)
    summary = out / "summary.json"
    data = json.loads(summary.read_text())
    for e in data["images"]:  # as an older version wrote them: relative to some earlier cwd
        e["input"] = "../elsewhere/" + Path(e["input"]).name
    summary.write_text(json.dumps(data))
    s = _run(d, out, skip_existing=True)
    assert [e["input"] for e in s.images] == [str(d / "a.png"), str(d / "b.tif")]


class _Broken(FakeModel):
    def __call__(self, x):
        raise RuntimeError("the accelerator fell over")


def test_a_run_that_stopped_before_any_result_does_not_block_a_plain_rerun(tmp_path):
    d = _good_folder(tmp_path, n=2)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        segment_folder(_Broken(), d, out, InferOptions(**FAST), progress=False)
    assert json.loads((out / "summary.json").read_text())["finished"] is False
    s = _run(d, out)  # no --overwrite needed: nothing but the provisional summary is there
    assert s.processed == 2 and json.loads((out / "summary.json").read_text())["finished"] is True


def test_an_interrupted_overwrite_leaves_no_stale_counts(tmp_path, monkeypatch):
    d = _good_folder(tmp_path, n=2)
    out = tmp_path / "out"
    first = {e["masks"]: e["objects"] for e in _run(d, out).images}
    assert all(first.values())
    # --overwrite with a model that finds nothing, killed after the first label TIFF
    real = tifffile.imwrite
    calls = []

    class Killed(BaseException):
        pass

    def dying_imwrite(path, data, *a, **kw):
        if "_masks" in str(path):
            calls.append(path)
            if len(calls) == 2:
                raise Killed()
        return real(path, data, *a, **kw)

    class Empty(FakeModel):
        def __call__(self, x):
            return np.stack([np.full_like(x[:, 0], 10.0), np.full_like(x[:, 0], -10.0), np.full_like(x[:, 0], -10.0)], axis=1)

    monkeypatch.setattr(tifffile, "imwrite", dying_imwrite)
    with pytest.raises(Killed):
        segment_folder(Empty(), d, out, InferOptions(**FAST, overwrite=True, workers=1), progress=False)
    monkeypatch.setattr(tifffile, "imwrite", real)
    provisional = json.loads((out / "summary.json").read_text())
    assert provisional == {"format": batch.SUMMARY_FORMAT, "finished": False, "images": [], "settings": provisional["settings"],
                           "pending": provisional["pending"]}
    assert provisional["settings"]["model"] == "Empty" and len(provisional["pending"]) == 2
    assert int(tifffile.imread(out / "b_masks.tif").max()) > 0  # the first run's, not replaced yet
    s = segment_folder(Empty(), d, out, InferOptions(**FAST, skip_existing=True), progress=False)  # the same model goes on
    counts = {e["masks"]: e["objects"] for e in s.images}
    assert counts == {m: int(tifffile.imread(out / m).max()) for m in counts}  # read back, not the old summary's
    # a: written by the stopped run, kept; b: the first run's masks, which that run had yet to replace: segmented again
    assert (s.skipped, s.processed) == (1, 1) and counts == {"a_masks.tif": 0, "b_masks.tif": 0}


def test_skip_existing_keeps_no_masks_a_finished_summary_does_not_list(tmp_path):
    """A run over one file of a folder, with other settings than the first run over all of it: its
    summary lists that file only, so --skip-existing with its settings segments the rest again
    instead of keeping the first run's masks under the new settings' name."""
    d = _good_folder(tmp_path)
    out = tmp_path / "out"
    assert _run(d, out, min_size=30).processed == 3
    assert _run(d / "a.png", out, min_size=5, overwrite=True).processed == 1
    s = _run(d, out, min_size=5, skip_existing=True)
    assert (s.skipped, s.processed) == (1, 2) and s.postprocess["min_size"] == 5


def test_skip_existing_after_a_stopped_run_on_other_images_of_the_same_names(tmp_path, monkeypatch):
    """A run on folder A stops; --skip-existing on folder B (same file names) into that output folder
    keeps none of A's masks: the stopped run's summary lists what it set out to segment, from where."""
    (tmp_path / "A").mkdir(), (tmp_path / "B").mkdir()
    a, b = _good_folder(tmp_path / "A", n=2), _good_folder(tmp_path / "B", n=2)
    out = tmp_path / "out"
    real = tifffile.imwrite
    monkeypatch.setattr(tifffile, "imwrite", lambda path, *args, **kw: _die() if "b_masks" in str(path) else real(path, *args, **kw))
    with pytest.raises(Killed):
        _run(a, out, workers=1)
    monkeypatch.setattr(tifffile, "imwrite", real)
    assert (out / "a_masks.tif").is_file()
    s = _run(b, out, skip_existing=True)
    assert (s.skipped, s.processed) == (0, 2) and {Path(e["input"]).parent for e in s.images} == {b}
    assert _run(b, out, skip_existing=True).skipped == 2  # its own finished results are kept


def test_skip_existing_refuses_to_mix_settings(tmp_path):
    """--skip-existing after a run with another model or thresholds: refused before anything is
    written (summary.json would misreport the kept masks); the same settings go on, also after an
    interrupted run (its provisional summary records them)."""
    d = _good_folder(tmp_path)
    out = tmp_path / "out"
    _run(d, out, min_size=30)
    (out / "b_masks.tif").unlink()
    summary = (out / "summary.json").read_text()
    from cellseg.inference import FlipAverage

    for model, min_size, what in ((MODEL, 5, "min_size 30 -> 5"), (FlipAverage(MODEL), 30, "tta False -> True")):
        opts = InferOptions(**FAST, min_size=min_size, skip_existing=True)
        with pytest.raises(CellsegError, match=rf"summary.json: its images were segmented with other settings \(.*{what}"):
            segment_folder(model, d, out, opts, progress=False, model_name="fake.onnx")
        assert (out / "summary.json").read_text() == summary and not (out / "b_masks.tif").exists()
    with pytest.raises(CellsegError, match="model fake.onnx -> other.onnx"):
        segment_folder(MODEL, d, out, InferOptions(**FAST, min_size=30, skip_existing=True), progress=False, model_name="other.onnx")
    assert _run(d, out, min_size=30, skip_existing=True).processed == 1  # same settings: goes on
    (out / "b_masks.tif").unlink()  # options given at their defaults make the same masks: goes on too
    assert _run(d, out, min_size=30, min_score=0.0, interior_threshold=0.5, skip_existing=True).processed == 1
    # a run that stopped after its provisional summary: that summary's settings are checked
    (out / "b_masks.tif").unlink()
    provisional = json.loads((out / "summary.json").read_text())
    batch.mark_output_folder(out, [e for e in provisional["images"] if e["masks"] != "b_masks.tif"],
                             {k: provisional[k] for k in batch.SETTING_KEYS})
    with pytest.raises(CellsegError, match="min_size 30 -> 5"):
        _run(d, out, min_size=5, skip_existing=True)
    assert _run(d, out, min_size=30, skip_existing=True).processed == 1


def test_skip_existing_refuses_a_sub_folder_of_an_earlier_runs_output(tmp_path):
    """`infer DIR -r -o out` then `infer DIR/sub -o out/sub --skip-existing`: out/sub has no summary.json
    of its own, so its masks (the first run's, maybe of other settings) cannot be checked: refused,
    before anything is written; --overwrite goes on."""
    d = tmp_path / "tree"
    d.mkdir()
    sub = _good_folder(d)  # tree/imgs
    _png(d / "top.png", _image(seed=5))
    out = tmp_path / "out"
    assert _run(d, out, recursive=True, min_size=30).processed == 4
    (out / "imgs" / "b_masks.tif").unlink()
    before = _files(out)
    with pytest.raises(CellsegError, match=rf"imgs: inside {out}, the output folder of an earlier run.*-o {out}"):
        _run(sub, out / "imgs", min_size=5, skip_existing=True)
    assert _files(out) == before
    assert _run(sub, out / "imgs", min_size=5, overwrite=True).processed == 3


def test_channel_picks_the_nuclear_stain(tmp_path):
    """A 2-channel ImageJ TIFF (nuclei in channel 1, an even membrane stain in channel 0) fails
    alone without --channel, is segmented from channel 1 with it, and the channel is a setting
    --skip-existing checks."""
    d = tmp_path / "in"
    d.mkdir()
    nuclei = _image(squares=((4, 6), (20, 28), (4, 30)))
    tifffile.imwrite(d / "two.tif", np.stack([_image(squares=()), nuclei]), imagej=True, metadata={"axes": "CYX"})
    _png(d / "grey.png", _image(seed=1))
    s = _run(d, tmp_path / "none")
    assert s.processed == 1 and [Path(p).name for p, _ in s.failed] == ["two.tif"]
    assert "image with 2 channels (CYX); pick the nuclear stain with --channel K" in s.failed[0][1]
    out = tmp_path / "out"
    s = _run(d, out, channel=1)
    assert s.ok and s.channel == 1 and json.loads((out / "summary.json").read_text())["channel"] == 1
    assert tifffile.imread(out / "two_masks.tif").max() == 3  # the three nuclei of channel 1
    s = _run(d, tmp_path / "c2", channel=2)
    assert [Path(p).name for p, _ in s.failed] == ["two.tif"] and s.failed[0][1] == "channel 2 (--channel, or the one the model was trained on): the image has 2 channels (0 to 1)"
    (out / "two_masks.tif").unlink()
    with pytest.raises(CellsegError, match="channel 1 -> 0"):
        _run(d, out, channel=0, skip_existing=True)
    assert _run(d, out, channel=1, skip_existing=True).processed == 1


def test_skip_existing_redoes_masks_of_another_file_or_of_an_image_that_failed(tmp_path, monkeypatch):
    """A _masks.tif is a result only for the file it was made from: one made from a same-named
    image of another folder, or kept from an earlier success of an image that has failed since,
    is not skipped but segmented again (and the failure reported)."""
    d = _good_folder(tmp_path, n=2)
    out = tmp_path / "out"
    _run(d, out)
    other = tmp_path / "other"
    other.mkdir()
    tifffile.imwrite(other / "a.tif", np.zeros((24, 30), np.uint8))  # same stem as d/a.png, another image
    s = _run(other, out, skip_existing=True)
    assert (s.processed, s.skipped) == (1, 0) and s.images[0]["height"] == 24
    assert tifffile.imread(out / "a_masks.tif").shape == (24, 30)

    _run(d, out, overwrite=True)
    broken = sorted(d.iterdir())[0]
    broken.write_bytes(b"not an image")
    s = _run(d, out, overwrite=True)  # fails that image, keeps its earlier outputs
    assert [Path(p).name for p, _ in s.failed] == [broken.name]
    s = _run(d, out, skip_existing=True)  # ... which are not taken for its result
    assert [Path(p).name for p, _ in s.failed] == [broken.name] and s.skipped == 1
    # the failure recorded for a relative path through a symlinked folder is recognised from anywhere
    (tmp_path / "link").symlink_to(d, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    _run(Path("link"), out, skip_existing=True)
    monkeypatch.chdir(out)
    s = _run(d, out, skip_existing=True)
    assert [Path(p).name for p, _ in s.failed] == [broken.name] and s.skipped == 1


def test_recursive_reports_a_sub_folder_it_cannot_list(tmp_path, monkeypatch):
    """Its images would be silently missing: the folder is reported as failed (exit 1) and the
    others are segmented; an input folder that cannot be listed stops the run before any work."""
    d = _good_folder(tmp_path, n=2)
    (d / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # as for a folder of mode 000 (root reads it anyway)
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    s = _run(d, tmp_path / "out", recursive=True)
    assert s.processed == 2 and s.failed == [(str(d / "locked"), "cannot list the folder (Permission denied); its images are left out")]
    with pytest.raises(CellsegError, match=rf"^{d / 'locked'}: cannot list the folder \(Permission denied\)"):
        _run(d / "locked", tmp_path / "out2", recursive=True)
    assert not (tmp_path / "out2").exists()


def test_missing_outputs_names_what_skipped_images_lack(tmp_path):
    d = _good_folder(tmp_path, n=2)
    out = tmp_path / "out"
    _run(d, out)  # no probability maps
    s = _run(d, out, skip_existing=True, save_probs=True)
    assert s.skipped == 2 and batch.missing_outputs(s, InferOptions(**{**FAST, "save_probs": True})) == ["_probs.tif"]
    s = _run(d, out, overwrite=True, save_probs=True)
    assert batch.missing_outputs(s, InferOptions(**{**FAST, "save_probs": True})) == []
