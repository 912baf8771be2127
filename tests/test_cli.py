"""The command line as a user meets it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from mlflow import MlflowClient

from cellseg.errors import CellsegError

ROOT = Path(__file__).resolve().parents[1]


def cellseg(*args, env=None, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "cellseg", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def test_data_synth_writes_a_dataset_and_refuses_to_overwrite(tmp_path):
    r = cellseg("data", "synth", tmp_path / "d", "--n", 3, "--size", 64, 80, "--seed", 1)
    assert r.returncode == 0, r.stderr
    from cellseg.data.dataset import list_pairs

    pairs = list_pairs(tmp_path / "d")
    assert len(pairs) == 3
    r = cellseg("data", "synth", tmp_path / "d", "-n", 3)  # -n as well as --n
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "overwrite" in r.stderr


def test_usage_errors_exit_2_without_traceback(tmp_path):
    for args in (["train", "--no-such-option"], ["infer"], ["evaluate", tmp_path, "--split", "nope"],
                 ["infer", tmp_path / "missing"], ["train", "--lr-schedule", "garbage"], ["train", "--lr-schedule", ""],
                 ["train", "--crop-size", 100], ["train", "--config", tmp_path]):
        r = cellseg(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr, args


def test_tune_refuses_what_it_cannot_store_into(tmp_path, tiny_data):
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"x")
    r = cellseg("tune", tiny_data, "--model", ckpt)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "best.pt" in r.stderr and ".onnx" in r.stderr
    r = cellseg("tune", tiny_data, "--model", tmp_path / "missing.onnx")
    assert r.returncode == 2 and "missing.onnx" in r.stderr and "Traceback" not in r.stderr
    locked = tmp_path / "locked.onnx"
    shutil.copy(SHIPPED, locked)
    locked.chmod(0o444)
    r = cellseg("tune", tiny_data, "--model", locked)
    assert r.returncode == 2 and r.stderr == f"error: {locked}: is read-only (mode -r--r--r--); not replaced\n"
    assert locked.read_bytes() == SHIPPED.read_bytes()


def test_tune_at_the_scale_of_inference(tmp_path, tiny_data):
    model = tmp_path / "m.onnx"
    shutil.copy(SHIPPED, model)
    r = cellseg("tune", tiny_data, "--model", model, "--scale", 0)
    assert r.returncode == 2 and r.stderr.startswith("error: --scale 0: expected a zoom factor")
    r = cellseg("tune", tiny_data, "--model", model, "--scale", 2, "--dry-run", "-q")
    assert r.returncode == 0, r.stderr
    from cellseg.evaluate import select_pairs

    n = len(select_pairs(tiny_data, "val", 0.2))
    assert f"best on {tiny_data} val at scale 2 ({n} image{'s' if n > 1 else ''}): interior" in r.stdout
    assert f"note: tuned on only {n} validation image" in r.stderr and model.read_bytes() == SHIPPED.read_bytes()
    # the shipped model's bright-background thresholds do not survive a tune on data with too few such images
    from cellseg.inference import OnnxModel

    assert OnnxModel(model).postprocess_bright
    r = cellseg("tune", tiny_data, "--model", model, "-q")
    assert r.returncode == 0, r.stderr
    assert "note: the bright-background thresholds stored before were removed" in r.stderr
    assert OnnxModel(model).postprocess_bright == {} and OnnxModel(model).postprocess


def test_tune_dry_run_fails_when_nothing_matched(tmp_path, tiny_data):
    import cv2

    blank = tmp_path / "blank"
    shutil.copytree(tiny_data, blank)
    for img in (blank / "images").iterdir():  # nothing to see: no threshold can match the true nuclei
        cv2.imwrite(str(img), np.zeros(cv2.imread(str(img), cv2.IMREAD_UNCHANGED).shape, np.uint8))
    r = cellseg("tune", blank, "--model", SHIPPED, "--dry-run", "-q")
    assert r.returncode == 2 and "no threshold setting matched a single object" in r.stderr, r.stderr
    assert "nothing stored" not in r.stderr and r.stderr.count("\n") == 1


def test_atomic_write_keeps_links_and_permissions(tmp_path):
    from cellseg.data.io import atomic_write

    target = tmp_path / "v3.onnx"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "current.onnx"
    link.symlink_to(target.name)
    atomic_write(link, lambda tmp: Path(tmp).write_bytes(b"new"), in_place=True)  # a model file the user names
    assert link.is_symlink() and target.read_bytes() == b"new" and (target.stat().st_mode & 0o777) == 0o640
    target.chmod(0o444)
    with pytest.raises(CellsegError, match="current.onnx: is read-only"):
        atomic_write(link, lambda tmp: Path(tmp).write_bytes(b"newer"), in_place=True)
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["current.onnx", "v3.onnx"]
    # outputs (the default): the link itself is replaced, never written through
    atomic_write(link, lambda tmp: Path(tmp).write_bytes(b"output"))
    assert not link.is_symlink() and link.read_bytes() == b"output" and target.read_bytes() == b"new"


def test_bad_config_names_the_field(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  batch_size: 0\n  colour: blue\n")
    r = cellseg("train", "--config", cfg)
    assert r.returncode == 2
    assert "train.batch_size: Input should be greater than or equal to 1" in r.stderr
    assert "train.colour: unknown key" in r.stderr


@pytest.mark.slow
def test_train_register_export_infer_end_to_end(tmp_path, tiny_data, tiny_cfg):
    """train (tiny) -> register -> export -> infer --model onnx == infer --model torch."""
    from cellseg.config import to_yaml

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "CELLSEG_CACHE_DIR": str(tmp_path / "cache")}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(to_yaml(tiny_cfg))
    r = cellseg("train", tiny_data, "--config", cfg, "--experiment", "e2e", "-q", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cellseg("register", "--experiment", "e2e", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "alias champion" in r.stdout
    # a PyTorch version cannot serve labels: the note names the export that makes the serving version
    assert f"`cellseg export -o FILE.onnx --tracking-uri sqlite:///{tmp_path / 'mlflow.db'}` makes the ONNX version" in r.stderr
    onnx_path = tmp_path / "m.onnx"
    r = cellseg("export", "-o", onnx_path, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "max |logit diff|" in r.stdout and onnx_path.exists()
    r = cellseg("tune", tiny_data, "--model", onnx_path, "-q", env=env, cwd=tmp_path)
    from cellseg.export import store_postprocess
    from cellseg.inference import OnnxModel

    if r.returncode == 0:
        assert "stored in" in r.stdout and f"cellseg register --onnx {onnx_path} makes this file the champion" in r.stderr
    else:  # a model trained for 2 steps may match no object at any threshold: then nothing is stored
        assert r.returncode == 2 and "no threshold setting matched a single object" in r.stderr, r.stderr
        assert OnnxModel(onnx_path).postprocess == {}
        store_postprocess(onnx_path, {"interior_threshold": 0.3, "foreground_threshold": 0.4, "min_size": 5, "min_score": 0.0})
    tuned = OnnxModel(onnx_path).postprocess
    assert set(tuned) == {"interior_threshold", "foreground_threshold", "min_size", "min_score"}
    images = tiny_data / "images"
    r1 = cellseg("infer", "--model", onnx_path, images, "-o", tmp_path / "onnx_out", "-q", env=env, cwd=tmp_path)
    assert r1.returncode == 0, r1.stderr
    import json

    assert json.loads((tmp_path / "onnx_out" / "summary.json").read_text())["postprocess"] == tuned
    # the PyTorch checkpoint has no stored thresholds: give the tuned ones as options
    r2 = cellseg("infer", "--model", "torch", images, "-o", tmp_path / "torch_out", "-q",
                 "--interior-threshold", tuned["interior_threshold"], "--foreground-threshold", tuned["foreground_threshold"],
                 "--min-size", tuned["min_size"], "--min-score", tuned["min_score"], env=env, cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    masks = sorted((tmp_path / "onnx_out").glob("*_masks.tif"))
    assert len(masks) == 8
    agree = []
    for m in masks:
        a, b = tifffile.imread(m), tifffile.imread(tmp_path / "torch_out" / m.name)
        agree.append(np.mean((a > 0) == (b > 0)))
    assert min(agree) > 0.999
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias("cellseg-unet", "champion")
    assert champion.tags.get("onnx_model_uri")
    # the registered copy predates tune; register --onnx publishes the tuned file (what --model onnx and serving use)
    r = cellseg("infer", "--model", "onnx", images, "-o", tmp_path / "champ0", "-q", env=env, cwd=tmp_path)
    assert r.returncode == 0 and json.loads((tmp_path / "champ0" / "summary.json").read_text())["postprocess"] == {}
    r = cellseg("register", "--onnx", onnx_path, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cellseg("infer", "--model", "onnx", images, "-o", tmp_path / "champ1", "-q", env=env, cwd=tmp_path)
    assert r.returncode == 0 and json.loads((tmp_path / "champ1" / "summary.json").read_text())["postprocess"] == tuned
    # the model knows its training data (by hash, not path): evaluating on it says so, the held-out split does not
    from cellseg.data.dataset import dataset_hash

    assert OnnxModel(onnx_path).metadata["cellseg.dataset_hash"] == dataset_hash(tiny_data)
    assert str(tiny_data) not in OnnxModel(onnx_path).metadata["cellseg.config"]  # no local path in the file
    r = cellseg("evaluate", tiny_data, "--model", onnx_path, "--no-baseline", "-q", "-o", tmp_path / "ev_all", env=env, cwd=tmp_path)
    assert r.returncode == 0 and f"note: {tiny_data} is the dataset this model was trained on; --split all scores" in r.stderr
    r = cellseg("evaluate", tiny_data, "--model", onnx_path, "--no-baseline", "-q", "--split", "val", "-o", tmp_path / "ev_val", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr
    # a registry model's report is named by its URI (table, summary, folder), not by its download's cache path
    r = cellseg("evaluate", tiny_data, "--model", "models:/cellseg-unet@champion", "--no-baseline", "--split", "val", "-q", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "models:/cellseg-unet@champion - val split" in r.stdout, r.stdout + r.stderr
    report = tmp_path / "cellseg-eval" / f"{tiny_data.name}_val_models_cellseg-unet@champion" / "summary.json"
    assert json.loads(report.read_text())["model"] == "models:/cellseg-unet@champion"


@pytest.mark.slow
def test_mlflow_run_train_entry_point(tmp_path, tiny_cfg):
    from cellseg.config import to_yaml

    from cellseg.config import apply_overrides

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(to_yaml(apply_overrides(tiny_cfg, {"train.seed": 7, "train.epochs": 1})))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "CELLSEG_CACHE_DIR": str(tmp_path / "cache"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def mlflow_run(*params):
        args = [a for p in params for a in ("-P", p)]
        return subprocess.run(
            [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "train", "--env-manager", "local",
             "--experiment-name", "mlproject", *args],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )

    r = mlflow_run("curriculum=True", f"config={cfg}", "steps_per_epoch=1")
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("mlproject")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    params = runs[0].data.params
    assert params["curriculum.enabled"] == "True" and params["train.steps_per_epoch"] == "1"
    # what no -P sets comes from the config file, not from MLproject defaults
    assert (params["train.seed"], params["train.epochs"], params["train.batch_size"]) == ("7", "1", "2")
    assert params["tracking.experiment"] == "mlproject"  # where mlflow run put it
    assert runs[0].data.metrics["val_iou"] >= 0

    # a misspelt flag and an experiment parameter are refused before training, in one line
    r = mlflow_run("curriculum=ture", f"config={cfg}")
    assert r.returncode != 0 and "error: -P curriculum=ture: expected true or false" in r.stderr
    r = mlflow_run("experiment=other", f"config={cfg}")
    assert r.returncode != 0 and "mlflow run --experiment-name other" in r.stderr
    assert len(client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")) == 1


SHIPPED = ROOT / "models" / "cellseg-nuclei.onnx"


def _one_line(r, *fragments):
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, r.stderr


def test_outputs_of_other_commands_and_other_files_are_not_overwritten(tmp_path, tiny_data):
    infer_out = tmp_path / "infer_out"
    assert cellseg("infer", tiny_data / "images", "-o", infer_out, "--model", SHIPPED, "-q").returncode == 0
    summary = (infer_out / "summary.json").read_text()
    _one_line(cellseg("evaluate", tiny_data, "--model", SHIPPED, "-o", infer_out, "-q"), "not a cellseg evaluate report")
    assert (infer_out / "summary.json").read_text() == summary and not (infer_out / "per_image.csv").exists()

    victim = tmp_path / "notes.txt"
    victim.write_text("keep me")
    _one_line(cellseg("evaluate", tiny_data, "--model", SHIPPED, "-o", victim, "-q"), "is a file, not a folder")
    _one_line(cellseg("quantize", SHIPPED, tiny_data, "-o", tmp_path), "is a folder")
    _one_line(cellseg("quantize", SHIPPED, tiny_data, "-o", victim), "must end in .onnx")
    fake = tmp_path / "fake.onnx"
    fake.write_text("keep me too")
    _one_line(cellseg("quantize", SHIPPED, tiny_data, "-o", fake), "exists and is not a cellseg model")
    _one_line(cellseg("export", "--checkpoint", tmp_path / "missing.pt", "-o", fake), "exists and is not a cellseg model")
    assert victim.read_text() == "keep me" and fake.read_text() == "keep me too"


def test_evaluate_reports_of_different_models_get_their_own_folders(tmp_path, tiny_data):
    for model in ("classic", str(SHIPPED)):
        assert cellseg("evaluate", tiny_data, "--model", model, "--no-baseline", "-q", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "cellseg-eval").iterdir()) == [
        f"{tiny_data.name}_all_cellseg-nuclei", f"{tiny_data.name}_all_classic"]
    # one -o folder used twice: the second report (no baseline) keeps no baseline of the first
    assert cellseg("evaluate", tiny_data, "--model", SHIPPED, "-q", "-o", tmp_path / "ev").returncode == 0
    assert (tmp_path / "ev" / "classic" / "summary.json").is_file()
    assert cellseg("evaluate", tiny_data, "--model", SHIPPED, "-q", "--no-baseline", "-o", tmp_path / "ev").returncode == 0
    assert not (tmp_path / "ev" / "classic").exists()
    # another split, another model (even one of the same file name) is refused, the report kept
    report = (tmp_path / "ev" / "summary.json").read_text()
    _one_line(cellseg("evaluate", tiny_data, "--model", SHIPPED, "-q", "--split", "val", "-o", tmp_path / "ev"),
              f"{tmp_path / 'ev'}: holds the report of {SHIPPED}", "(split all)", "--overwrite")
    for other in (["--tta"], ["--scale", "0.5"]):  # other settings: another report, not a rerun of this one
        _one_line(cellseg("evaluate", tiny_data, "--model", SHIPPED, "-q", *other, "-o", tmp_path / "ev"),
                  "holds the report of", "(split all)", "--overwrite")
    twin = tmp_path / "other" / SHIPPED.name
    twin.parent.mkdir()
    twin.write_bytes(SHIPPED.read_bytes())
    for args in (["-o", tmp_path / "ev"], []):  # -o, and the default folder of the same file name
        _one_line(cellseg("evaluate", tiny_data, "--model", twin, "-q", "--no-baseline", *args, cwd=tmp_path), "holds the report of")
    assert (tmp_path / "ev" / "summary.json").read_text() == report
    assert cellseg("evaluate", tiny_data, "--model", twin, "-q", "--no-baseline", "--overwrite", "-o", tmp_path / "ev").returncode == 0
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["params"]["model"] == str(twin)


def test_report_names_without_a_model_file():
    from cellseg.cli import _report_name

    class TorchLike:  # a PyTorch model: no file path
        pass

    assert _report_name(Path("/x/dsb"), "val", TorchLike(), "models:/cellseg-unet@champion", True, 0.5) == \
        "dsb_val_models_cellseg-unet@champion_tta_scale0.5"
    assert _report_name(Path("/x/dsb"), "all", TorchLike(), None, False, 1) == "dsb_all_default"

    from cellseg.cli import _given_name

    class Downloaded:  # a registry model: its file sits in a cache under a name a local file may have too
        path = Path("/cache/abc/m.onnx")

    class Shipped:  # what --model onnx falls back to without a registry
        path = Path("/pkg/models/cellseg-nuclei.int8.onnx")
        fallback = "no registered champion"

    def named(spec, net):
        given = _given_name(spec, net)
        if given:
            net.display_name = given
        return _report_name(Path("/x/dsb"), "all", net, spec, False, 1)

    assert named("models:/cellseg-unet/1", Downloaded()) == "dsb_all_models_cellseg-unet_1"
    assert named("onnx", Downloaded()) == "dsb_all_models_cellseg-unet@champion"
    assert named("torch", TorchLike()) == "dsb_all_models_cellseg-unet@champion_PyTorch"
    assert named("m.onnx", Downloaded()) == "dsb_all_m"
    assert named("onnx", Shipped()) == named(None, Shipped()) == named("default", Shipped()) == "dsb_all_cellseg-nuclei.int8"


def test_evaluate_never_replaces_files_of_its_own_names_outside_a_report(tmp_path, tiny_data):
    """-o a folder of the user's holding a per_image.csv (no report there): refused before any work,
    the file kept; --log to an unreachable server fails before the evaluation, leaving no report."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "per_image.csv").write_text("my,data\n")
    _one_line(cellseg("evaluate", tiny_data, "--model", SHIPPED, "-q", "-o", mine), "per_image.csv: exists and is not part of a cellseg evaluate report")
    assert (mine / "per_image.csv").read_text() == "my,data\n" and not (mine / "summary.json").exists()
    (mine / "per_image.csv").write_text("stem,map,ap50\nx,0.5,0.6\n")  # an interrupted report's table: its rerun goes on
    assert cellseg("evaluate", tiny_data, "--model", SHIPPED, "-q", "--no-baseline", "-o", mine).returncode == 0
    assert (mine / "summary.json").is_file()
    r = cellseg("evaluate", tiny_data, "--model", SHIPPED, "-q", "--log", "--tracking-uri", "http://127.0.0.1:9", "-o", tmp_path / "ev")
    _one_line(r, "127.0.0.1:9")
    assert not (tmp_path / "ev").exists()


def test_out_of_range_options_and_unwritable_places_are_one_line_errors(tmp_path, tiny_data):
    for args in (["evaluate", tiny_data, "--val-fraction", "2"], ["tune", tiny_data, "-m", SHIPPED, "--val-fraction", "0"],
                 ["quantize", SHIPPED, tiny_data, "--val-fraction", "nan"]):
        _one_line(cellseg(*args), "--val-fraction", "expected a fraction between 0 and 1")
    _one_line(cellseg("data", "synth", tmp_path / "big", "--size", 100000, 100000), "between 32 and 8192")
    assert not (tmp_path / "big").exists()
    r = cellseg("data", "synth", tmp_path / "s", "--seed", -1)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line(cellseg("data", "synth", blocker / "d", "--n", 1, "--size", 32, 32), str(blocker))
    _one_line(cellseg("export", "--checkpoint", SHIPPED, "-o", tmp_path / "x.onnx", "--no-attach"), "an ONNX model, not a PyTorch checkpoint")
    # --model onnx falls back to the shipped model when the registry cannot be read, saying why in a note
    r = cellseg("infer", tiny_data / "images", "-o", tmp_path / "o", "--model", "onnx", "--tracking-uri", "file:" + str(tmp_path / "mlruns"),
                env={"MLFLOW_ALLOW_FILE_STORE": "false"})
    assert r.returncode == 0 and "which this MLflow refuses unless MLFLOW_ALLOW_FILE_STORE=true" in r.stderr, r.stderr
    assert "using the shipped model" in r.stderr and "Traceback" not in r.stderr


def test_resume_refuses_options_it_would_ignore(tmp_path):
    r = cellseg("train", "--resume", "0123abcd", "--epochs", "5", "--batch-size", "1", cwd=tmp_path)
    _one_line(r, "--resume 0123abcd continues the run with the config and data of its checkpoint; --epochs, --batch-size cannot change")
    r = cellseg("train", tmp_path / "missing", "--resume", "", cwd=tmp_path)  # `--resume $RUN_ID` with RUN_ID unset
    _one_line(r, "--resume: empty run id")  # not a new training (of the missing folder)
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow is touched


def test_infer_says_when_model_onnx_falls_back_to_the_shipped_model(tmp_path, tiny_data):
    image = sorted((tiny_data / "images").iterdir())[0]
    r = cellseg("infer", image, "-o", tmp_path / "out", "--model", "onnx", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("note: --model onnx: no registered champion ONNX") and "using the shipped model" in r.stderr


def test_val_fraction_defaults_to_the_models_own(tmp_path, tiny_data):
    import json

    from typer.testing import CliRunner

    from cellseg.cli import app
    from cellseg.config import Config, apply_overrides
    from cellseg.export import export_onnx
    from cellseg.model import build_model

    cfg = apply_overrides(Config(), {"data.val_fraction": 0.5, "model.depth": 1, "model.base_channels": 4})
    onnx_path = export_onnx(build_model(cfg.model).eval(), cfg, tmp_path / "half.onnx")
    runner = CliRunner()
    for extra, expected in (([], 0.5), (["--val-fraction", "0.2"], 0.2)):
        out = tmp_path / f"ev{expected}"
        res = runner.invoke(app, ["evaluate", str(tiny_data), "--model", str(onnx_path), "--split", "val", "--no-baseline", "-q", "-o", str(out), *extra])
        assert res.exit_code == 0, res.output
        params = json.loads((out / "summary.json").read_text())["params"]
        assert params["val_fraction"] == expected


@pytest.mark.parametrize("option, value, expected", [
    ("--overlap", "nan", "nan: expected a number from 0 to 0.9"),  # was "should be less than or equal to 0.9"
    ("--overlap", "0.95", "0.95: expected a number from 0 to 0.9"),
    ("--interior-threshold", "nan", "nan: expected a number from 0 to 1"),
    ("--foreground-threshold", "-0.1", "-0.1: expected a number from 0 to 1"),
    ("--min-score", "1.5", "1.5: expected a number from 0 to 1"),
])
def test_fraction_options_name_their_range(tmp_path, option, value, expected):
    from typer.testing import CliRunner

    from cellseg.cli import app

    res = CliRunner().invoke(app, ["infer", str(tmp_path), option, value])
    assert res.exit_code == 2 and expected in " ".join(res.output.replace("│", " ").split()), res.output


@pytest.mark.parametrize("args", [["data", "synth", ""], ["train", ""], ["infer", ""], ["infer", "x.png", "-o", ""],
                                  ["quantize", "m.onnx", ""], ["export", "-o", ""]], ids=lambda a: " ".join(a) or "-")
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, monkeypatch, args):
    """`cellseg data synth $OUT` with OUT unset wrote a dataset into the current folder."""
    from typer.testing import CliRunner

    from cellseg.cli import app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "empty path (an unset shell variable?)" in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_a_missing_optional_package_is_named_in_one_line(monkeypatch, capsys):
    """A tracking URI whose database driver is not installed ended in a traceback."""
    import sys

    from cellseg import cli, registry

    def no_driver(*a, **k):
        raise ModuleNotFoundError("No module named 'psycopg2'", name="psycopg2")

    monkeypatch.setattr(registry, "connect", no_driver)
    monkeypatch.setattr(sys, "argv", ["cellseg", "register", "--tracking-uri", "postgresql://u@db/mlflow"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == ("error: the Python package psycopg2-binary is not installed (pip install psycopg2-binary); "
                                         "what you asked for needs it (CELLSEG_DEBUG=1 shows where)\n")


def test_a_model_trained_on_a_channel_reads_that_channel_by_default(tmp_path, tiny_data, tiny_cfg):
    """train --channel 1 on 2-channel (CYX) TIFFs records the channel in the model; infer, evaluate
    and quantize then read that channel with no --channel (a --channel still overrides it)."""
    from typer.testing import CliRunner

    from cellseg.cli import app
    from cellseg.config import to_yaml
    from cellseg.data.dataset import list_pairs
    from cellseg.data.io import read_image
    from cellseg.inference import OnnxModel

    data = tmp_path / "two"
    (data / "images").mkdir(parents=True)
    shutil.copytree(tiny_data / "masks", data / "masks")
    noise = np.random.default_rng(0)
    for stem, image, _ in list_pairs(tiny_data):
        nuclei = read_image(image).astype(np.uint16)
        planes = np.stack([noise.integers(0, 255, nuclei.shape, dtype=np.uint16), nuclei])  # stain 0: not nuclei
        tifffile.imwrite(data / "images" / f"{stem}.tif", planes, imagej=True, metadata={"axes": "CYX"})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(to_yaml(tiny_cfg))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runner = CliRunner()
    train = ["train", str(data), "--config", str(cfg), "--tracking-uri", store, "-q"]
    res = runner.invoke(app, train)
    assert isinstance(res.exception, CellsegError) and "with 2 channels (CYX); pick the nuclear stain with --channel K" in str(res.exception)
    res = runner.invoke(app, [*train, "--channel", "1"])
    assert res.exit_code == 0, res.output
    run_id = res.output.split("run ")[1].split()[0]
    onnx_path = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", "--run-id", run_id, "-o", str(onnx_path), "--no-attach", "--tracking-uri", store])
    assert res.exit_code == 0, res.output
    model = OnnxModel(onnx_path)
    assert model.channel == 1 and model.metadata["cellseg.channel"] == "1"
    res = runner.invoke(app, ["infer", str(data / "images"), "-m", str(onnx_path), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["channel"] == 1
    res = runner.invoke(app, ["infer", str(data / "images"), "-m", str(onnx_path), "-o", str(tmp_path / "out0"), "-q", "--channel", "0"])
    assert res.exit_code == 0 and json.loads((tmp_path / "out0" / "summary.json").read_text())["channel"] == 0
    res = runner.invoke(app, ["evaluate", str(data), "-m", str(onnx_path), "-o", str(tmp_path / "ev"), "-q"])
    assert res.exit_code == 0, res.output  # the classic baseline reads channel 1 too
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["params"]["channel"] == 1
    res = runner.invoke(app, ["tune", str(data), "-m", str(onnx_path), "--channel", "0", "--dry-run", "-q"])
    assert isinstance(res.exception, CellsegError) and "was trained on channel 1, the one infer and evaluate read" in str(res.exception)
    res = runner.invoke(app, ["tune", str(data), "-m", str(onnx_path), "--dry-run", "-q"])
    assert "val (1 image)" in res.output  # channel 1 read and scored (this 2-step model may match no object)
    res = runner.invoke(app, ["quantize", str(onnx_path), str(data), "--calib", "2"])
    assert res.exit_code == 0, res.output
    assert OnnxModel(tmp_path / "m.int8.onnx").channel == 1


def test_report_folder_of_other_tta_or_scale_is_refused(tmp_path):
    from cellseg.cli import _check_report_folder

    data = tmp_path / "data"
    params = {"model": "m.onnx", "split": "val", "data": str(data.resolve()), "tta": True, "scale": 0.5}
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "summary.json").write_text(json.dumps({"params": params}))
    _check_report_folder(tmp_path / "ev", "m.onnx", data, "val", tta=True, scale=0.5)  # a rerun of it: replaced
    for tta, scale in ((False, 0.5), (True, 1.0)):
        with pytest.raises(CellsegError, match=r"\(split val, --tta, --scale 0.5\); choose another --output"):
            _check_report_folder(tmp_path / "ev", "m.onnx", data, "val", tta=tta, scale=scale)
    _check_report_folder(tmp_path / "ev", "m.onnx", data, "val", overwrite=True)
    del params["tta"], params["scale"]  # a report from before they were recorded: plain
    (tmp_path / "ev" / "summary.json").write_text(json.dumps({"params": params}))
    _check_report_folder(tmp_path / "ev", "m.onnx", data, "val")


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    from cellseg import cli

    def no_memory(**kwargs):
        raise MemoryError("Unable to allocate 3.73 GiB for an array with shape (1, 3, 10000, 10000) and data type float32")

    monkeypatch.setattr(cli, "app", no_memory)
    monkeypatch.delenv("CELLSEG_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: out of memory (Unable to allocate 3.73 GiB for an array with shape (1, 3, 10000, 10000)")


def test_local_infer_of_a_glob_says_ray_reads_globs(tmp_path):
    from typer.testing import CliRunner

    from cellseg.cli import app

    res = CliRunner().invoke(app, ["infer", str(tmp_path / "*.png"), "-q"])
    assert isinstance(res.exception, CellsegError)
    assert str(res.exception) == f"{tmp_path / '*.png'}: no such file or folder; globs and lists of paths are read by --engine ray, " \
                                 "the local engine takes one image or a folder"
