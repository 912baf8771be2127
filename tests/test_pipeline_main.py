"""The end-to-end pipeline behind `make demo` and the MLproject `main` entry point."""

import pytest
from mlflow import MlflowClient

from cellseg.config import apply_overrides
from cellseg.errors import CellsegError
from cellseg.inference import OnnxModel
from pipelines.main import run_pipeline


@pytest.mark.slow
def test_pipeline_trains_exports_evaluates_registers(tracking, tiny_cfg, tiny_data, tmp_path):
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 12, "train.steps_per_epoch": 4})  # enough to match a few objects
    out = run_pipeline(cfg, str(tiny_data), tmp_path / "m.onnx", quiet=True)
    model = OnnxModel(out["onnx"])
    assert model.run_id == out["run_id"]
    # thresholds tuned on the validation split are stored in the model and used by its evaluation
    assert set(model.postprocess) == {"interior_threshold", "foreground_threshold", "min_size", "min_score"}
    import json

    params = json.loads((tmp_path / "m-eval" / "summary.json").read_text())["params"]
    assert params["postprocess.min_size"] == model.postprocess["min_size"]
    assert 0.0 <= out["val"]["iou"] <= 1.0 and out["val"]["n_images"] >= 1
    client = MlflowClient()
    champion = client.get_model_version_by_alias("cellseg-unet", "champion")
    assert str(champion.version) == str(out["version"]) and champion.run_id == out["run_id"]
    assert champion.tags["cellseg.flavor"] == "pyfunc"
    # one registry version per pipeline run (not a PyTorch one plus a pyfunc one)
    assert [v.version for v in client.search_model_versions("name='cellseg-unet'") if v.run_id == out["run_id"]] == [champion.version]
    assert (tmp_path / "m-eval" / "per_image.csv").exists()


@pytest.mark.parametrize("how", ["epoch-ended", "second-interrupt"])
def test_an_interrupted_training_is_not_exported_or_registered(tracking, tiny_cfg, tiny_data, tmp_path, monkeypatch, capsys, how):
    """A first Ctrl-C ends the epoch (the run comes back KILLED); a second one, or SIGTERM outside
    the epoch loop, raises KeyboardInterrupt. Either way: exit 130, nothing exported or registered,
    and the commands that go on say which tracking store holds the run."""
    import cellseg.train as train_mod

    real = train_mod.train

    def interrupted(cfg, **kw):
        result = real(cfg, **kw)
        if how == "epoch-ended":
            result.status = "KILLED"
            return result
        exc = KeyboardInterrupt()
        exc.run_id, exc.run_status = result.run_id, "KILLED"
        raise exc

    monkeypatch.setattr(train_mod, "train", interrupted)
    versions = _versions()
    assert _stopped_pipeline(tiny_cfg, tracking, tiny_data, tmp_path / "m.onnx") == 130 and not (tmp_path / "m.onnx").exists()
    err = capsys.readouterr().err
    assert "ended KILLED; continue it with `cellseg train --resume " in err and "nothing exported or registered" in err
    assert err.count(f"--tracking-uri {tracking}") == 2, err  # in the resume and the export commands
    assert _versions() == versions


def _versions() -> int:
    return len(MlflowClient().search_model_versions("name='cellseg-unet'"))


def _stopped_pipeline(tiny_cfg, tracking, data, output) -> int:
    """The exit status of run_pipeline, which must stop (SystemExit), on `tracking`'s store."""
    from cellseg.config import apply_overrides

    with pytest.raises(SystemExit) as exit_:
        run_pipeline(apply_overrides(tiny_cfg, {"tracking.uri": tracking}), str(data), output, quiet=True)
    return exit_.value.code


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupt_after_training_says_what_is_left_to_do(tracking, tiny_cfg, tiny_data, tmp_path, monkeypatch, capsys, how):
    """Ctrl-C or SIGTERM while thresholds are tuned: exit 130 with one line (no traceback) naming the
    finished run and the commands that do the rest; the exported file stays, nothing is registered."""
    import os
    import signal
    import time

    import cellseg.evaluate as evaluate_mod

    def interrupted(*a, **kw):
        if how == "sigterm":
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "a SIGTERM would kill the process"
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_mod, "tune_thresholds", interrupted)
    versions = _versions()
    assert _stopped_pipeline(tiny_cfg, tracking, tiny_data, tmp_path / "m.onnx") == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    run_id = OnnxModel(tmp_path / "m.onnx").run_id  # exported before the interrupt
    assert err.startswith(f"interrupted during tune: MLflow run {run_id} had ended FINISHED; the pipeline has not registered it; go on with "), err
    assert f"`cellseg tune {tiny_data} -m {tmp_path / 'm.onnx'}`, then `cellseg register --onnx {tmp_path / 'm.onnx'} --tracking-uri {tracking}`" in err
    assert _versions() == versions
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_the_next_hint_names_the_model_file_absolutely(tracking, tmp_path, monkeypatch, capsys):
    """`mlflow run` works in the project folder: a relative path printed there fails in the user's."""
    import pipelines.main as pm

    monkeypatch.chdir(tmp_path)
    val = {"iou": 0.8, "seg": 0.7, "ap50": 0.9, "map": 0.6}
    monkeypatch.setattr(pm, "run_pipeline", lambda *a, **k: {"run_id": "r1", "onnx": "outputs/demo.onnx", "model_name": "m",
                                                           "version": "1", "val": val})
    pm.main(["--epochs", "1"])
    assert f"(or --model {tmp_path / 'outputs' / 'demo.onnx'})" in capsys.readouterr().out


def test_a_model_that_matches_nothing_is_not_registered(tracking, tiny_cfg, tiny_data, tmp_path):
    """Two steps of training find no object at any threshold: refused as `cellseg tune` refuses it
    (it was tuned to mAP 0, evaluated and made the champion)."""
    cfg = apply_overrides(tiny_cfg, {"tracking.model_name": "matches-nothing"})
    with pytest.raises(CellsegError, match="matched no object on the validation split at any threshold"):
        run_pipeline(cfg, str(tiny_data), tmp_path / "m.onnx", quiet=True)
    assert OnnxModel(tmp_path / "m.onnx").postprocess == {} and not (tmp_path / "m-eval").exists()
    assert MlflowClient().search_model_versions("name='matches-nothing'") == []
