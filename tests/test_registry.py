"""Model Registry: best runs, versions with aliases and tags, attached ONNX, and every --model spec."""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient

from cellseg import registry, resolve
from cellseg.errors import CellsegError
from cellseg.inference import OnnxModel, TorchModel


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_data):
    """One tiny training run in a store of this module's own (the `tracking` fixture is per test)."""
    import mlflow.tracking.fluent as fluent

    from cellseg.config import Config, apply_overrides
    from cellseg.train import train

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("CELLSEG_CACHE_DIR", str(root / "cache"))
    mp.chdir(root)
    # restored afterwards: attach_onnx/train make the run's experiment the active one
    mp.setattr(fluent, "_active_experiment_id", getattr(fluent, "_active_experiment_id", None), raising=False)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    cfg = apply_overrides(
        Config(),
        {
            "data.path": str(tiny_data),
            "data.crop_size": 32,
            "model.depth": 2,
            "model.base_channels": 8,
            "train.epochs": 2,
            "train.batch_size": 2,
            "train.steps_per_epoch": 2,
            "train.val_steps": 2,
            "train.workers": 0,
            "train.checkpoint_dir": str(root / "ckpt"),
            "tracking.experiment": "registry-test",
        },
    )
    result = train(cfg, quiet=True)
    yield SimpleNamespace(uri=uri, root=root, result=result, run_id=result.run_id)
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)
    mp.undo()


@pytest.fixture(scope="module")
def onnx_file(store):
    from cellseg.export import export_onnx, load_net_from_checkpoint

    net, cfg, run_id = load_net_from_checkpoint(store.result.checkpoint_dir / "best.pt")
    return export_onnx(net, cfg, store.root / "exported" / "unet.onnx", run_id)


@pytest.fixture(scope="module")
def champion(store, onnx_file):
    """The run's ONNX attached and the run registered as `cellseg-unet` (a pyfunc version, alias champion)."""
    registry.attach_onnx(store.run_id, onnx_file)
    return registry.register_run(store.run_id)


def _best(run_id: str, metric: str) -> float:
    return max(m.value for m in MlflowClient().get_metric_history(run_id, metric))


def test_register_run_without_onnx_registers_torch_model(store):
    mv = registry.register_run(store.run_id, name="reg-torch")
    assert mv.aliases == ["champion"]
    tags = mv.tags
    assert tags["cellseg.flavor"] == "pytorch" and tags["run_id"] == store.run_id
    assert tags["torch_model_uri"] == store.result.model_uri and mv.source == store.result.model_uri
    run = MlflowClient().get_run(store.run_id)
    assert tags["dataset.hash"] == run.data.tags["dataset.hash"]
    for metric in ("val_iou", "val_seg", "val_map", "val_ap50"):
        assert float(tags[f"best.{metric}"]) == pytest.approx(_best(store.run_id, metric), abs=1e-5)
    assert "onnx_model_uri" not in tags
    # no ONNX yet: the version loads as PyTorch weights from the run's best.pt
    model = resolve.load_model("models:/reg-torch@champion", device="cpu")
    assert isinstance(model, TorchModel) and model.run_id == store.run_id and model.source == "registry"
    # registering the same model again adds no version; its tags are refreshed
    client = MlflowClient()
    client.set_model_version_tag("reg-torch", mv.version, "best.val_map", "-1")
    again = registry.register_run(store.run_id, name="reg-torch")
    assert again.version == mv.version and again.aliases == ["champion"]
    assert float(again.tags["best.val_map"]) == pytest.approx(_best(store.run_id, "val_map"), abs=1e-5)
    # another version took the alias: registering the run again moves it back, still without a duplicate
    other = client.create_model_version("reg-torch", f"runs:/{store.run_id}/elsewhere", run_id=store.run_id)
    client.set_registered_model_alias("reg-torch", "champion", other.version)
    back = registry.register_run(store.run_id, name="reg-torch")
    assert back.version == mv.version and back.aliases == ["champion"]
    assert client.get_model_version("reg-torch", other.version).aliases == []
    assert sorted(int(v.version) for v in client.search_model_versions("name='reg-torch'")) == [1, 2]


def test_registration_prints_no_mlflow_chatter(store, capfd):
    """MLflow's "Successfully registered model" / "Created version" lines repeat cellseg's own; other lines pass."""
    registry.register_run(store.run_id, name="reg-quiet")
    err = capfd.readouterr().err
    assert "Successfully registered model" not in err and "Created version" not in err, err
    with registry._quiet_registration():
        print("Created version '3' of model 'x'.", file=sys.stderr)
        print("WARNING mlflow: something worth seeing", file=sys.stderr)
    err = capfd.readouterr().err
    assert err == "WARNING mlflow: something worth seeing\n"


def test_an_interrupted_model_logging_leaves_a_failed_model_never_used(store, onnx_file, tmp_path, monkeypatch):
    """Ctrl-C inside MLflow's log_model (attaching an ONNX, logging the pyfunc): the logged models are
    FAILED, not PENDING forever, and registration never picks them (it reused such a pyfunc)."""
    import shutil

    from mlflow.entities import LoggedModelStatus

    from cellseg.export import store_postprocess
    from cellseg.serving import log_pyfunc, register_pyfunc

    other = tmp_path / "other.onnx"
    shutil.copy(onnx_file, other)
    store_postprocess(other, {"interior_threshold": 0.45})  # other bytes: attached anew

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    client = MlflowClient()
    exp = client.get_run(store.run_id).info.experiment_id
    before = {m.model_id for m in client.search_logged_models([exp])}
    registry.attach_onnx(store.run_id, onnx_file)
    with monkeypatch.context() as mp:
        mp.setattr(MlflowClient, "log_model_artifacts", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            registry.attach_onnx(store.run_id, other)
        with pytest.raises(KeyboardInterrupt):
            log_pyfunc(onnx_file, store.run_id)
    new = [m for m in client.search_logged_models([exp]) if m.model_id not in before and m.status != LoggedModelStatus.READY]
    assert sorted((m.name, m.status) for m in new) == [("onnx", LoggedModelStatus.FAILED), ("pyfunc", LoggedModelStatus.FAILED)]
    mv = register_pyfunc(store.run_id, name="reg-after-ctrl-c")
    assert client.get_logged_model(mv.source.split("/")[-1]).status == LoggedModelStatus.READY


def test_failed_if_interrupted_turns_sigterm_into_an_interrupt():
    """export and register have no SIGTERM handling of their own: inside the block it interrupts
    (the logged model is then marked FAILED) instead of killing the process at once."""
    import subprocess

    code = ("import os, signal, time\n"
            "from cellseg import tracking\n"
            "try:\n"
            "    with tracking.failed_if_interrupted():\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(5)\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted', signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout == "interrupted True\n", proc.stderr  # and the default action is back afterwards


def test_best_run_takes_best_epoch_of_finished_runs(store):
    exp = mlflow.set_experiment("best-run-test").experiment_id
    client = MlflowClient()

    def fake(values, status="FINISHED"):
        run = client.create_run(exp)
        for step, v in enumerate(values, 1):
            client.log_metric(run.info.run_id, "val_map", v, step=step)
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    peaked = fake([0.9, 0.1])  # best epoch high, last epoch low
    fake([0.5, 0.6])
    fake([0.99], status="FAILED")
    assert registry.best_run("best-run-test", "val_map").info.run_id == peaked
    with pytest.raises(CellsegError, match="no FINISHED run logged metric 'val_nope'"):
        registry.best_run("best-run-test", "val_nope")
    with pytest.raises(CellsegError, match="experiment 'no-such-experiment' does not exist"):
        registry.best_run("no-such-experiment")
    gone = client.create_experiment("deleted-experiment")
    client.delete_experiment(gone)  # it said "0 finished run(s)"
    with pytest.raises(CellsegError, match=rf"experiment 'deleted-experiment' is deleted in .*--experiment-id {gone}\) or name another"):
        registry.best_run("deleted-experiment")


def test_register_onnx_keeps_mlflows_error_unless_the_run_is_missing(store, onnx_file, monkeypatch):
    from typer.testing import CliRunner

    from cellseg.cli import app

    from mlflow.exceptions import MlflowException

    def locked(self, run_id):
        raise MlflowException("database is locked")

    monkeypatch.setattr(MlflowClient, "get_run", locked)
    res = CliRunner().invoke(app, ["register", "--onnx", str(onnx_file), "--tracking-uri", store.uri])
    assert isinstance(res.exception, CellsegError) and str(res.exception).endswith(": database is locked"), res.output


def test_attach_onnx_and_register_pyfunc_champion(store, onnx_file, champion):
    client = MlflowClient()
    run = client.get_run(store.run_id)
    assert champion.aliases == ["champion"] and champion.tags["cellseg.flavor"] == "pyfunc"
    onnx_uri = run.data.tags[registry.RUN_ONNX_URI_TAG]
    assert champion.tags["onnx_model_uri"] == onnx_uri
    assert champion.tags["torch_model_uri"] == store.result.model_uri
    assert re.fullmatch(r"onnx/[0-9a-f]{12}/unet\.onnx", champion.tags["onnx_artifact"])
    assert run.info.status == "FINISHED"  # reopening the run kept its status
    assert registry.logged_model(client, store.run_id, "onnx").model_uri == onnx_uri
    path = registry.champion_onnx()
    assert path.is_file() and path.name == "unet.onnx" and path.read_bytes() == onnx_file.read_bytes()
    assert OnnxModel(path, device="cpu").run_id == store.run_id
    assert registry.champion_onnx() == path  # cached


def test_attach_onnx_refuses_a_file_of_another_run(store, onnx_file, tmp_path):
    from cellseg.export import export_onnx, load_net_from_checkpoint

    net, cfg, _ = load_net_from_checkpoint(store.result.checkpoint_dir / "best.pt")
    other = export_onnx(net, cfg, tmp_path / "other.onnx", run_id="0" * 32)
    with pytest.raises(CellsegError, match="exported from run 0+, not run"):
        registry.attach_onnx(store.run_id, other)


def test_champion_onnx_errors(store):
    with pytest.raises(CellsegError, match="models:/no-such-model@champion"):
        registry.champion_onnx("no-such-model")


def test_load_model_every_spec(store, onnx_file, champion):
    best_pt = str(store.result.checkpoint_dir / "best.pt")
    expected = {
        str(onnx_file): (OnnxModel, "file"),
        best_pt: (TorchModel, "file"),
        "models:/cellseg-unet@champion": (OnnxModel, "registry"),
        f"models:/cellseg-unet/{champion.version}": (OnnxModel, "registry"),
        store.run_id: (TorchModel, "run"),
        f"runs:/{store.run_id}": (TorchModel, "run"),
        "torch": (TorchModel, "registry"),
        "onnx": (OnnxModel, "registry"),
    }
    for spec, (kind, source) in expected.items():
        model = resolve.load_model(spec, device="cpu", threads=1, tracking_uri=store.uri)
        assert isinstance(model, kind), spec
        assert model.source == source and model.describe, spec
        assert model.run_id == store.run_id and model.in_channels == 1 and model.size_multiple >= 1, spec


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_onnx_spec_falls_back_to_shipped_model(store, onnx_file, monkeypatch, tmp_path):
    monkeypatch.setattr(resolve, "DEFAULT_MODEL", onnx_file)
    for uri in (f"http://127.0.0.1:{_closed_port()}", f"sqlite:///{tmp_path / 'absent.db'}"):
        model = resolve.load_model("onnx", device="cpu", tracking_uri=uri)
        assert isinstance(model, OnnxModel) and model.source == "default"
        assert "no registered champion ONNX" in model.describe
        assert model.fallback.startswith("--model onnx: no registered champion ONNX") and model.fallback.endswith("using the shipped model")
    assert not getattr(resolve.load_model(str(onnx_file), device="cpu"), "fallback", None)
    assert not (tmp_path / "absent.db").exists()  # looking did not create a store
    assert resolve.load_model(None, device="cpu").source == "default"
    monkeypatch.setattr(resolve, "DEFAULT_MODEL", tmp_path / "missing.onnx")
    with pytest.raises(CellsegError, match="no shipped model at .*missing.onnx; train one"):
        resolve.load_model("default")


def test_unknown_and_bad_specs(store, tmp_path):
    with pytest.raises(CellsegError, match="not a model spec; use one of .*PATH.onnx.*models:/NAME@ALIAS"):
        resolve.load_model("weights.bin")
    with pytest.raises(CellsegError, match="expected models:/NAME@ALIAS or models:/NAME/VERSION"):
        resolve.load_model("models:/cellseg-unet")
    with pytest.raises(CellsegError, match="no such file"):
        resolve.load_model(str(tmp_path / "absent.onnx"))
    with pytest.raises(CellsegError, match="checkpoint not found"):
        resolve.load_model(str(tmp_path / "absent.pt"))
    with pytest.raises(CellsegError, match="models:/cellseg-unet@nope"):
        resolve.load_model("models:/cellseg-unet@nope", tracking_uri=store.uri)
    with pytest.raises(CellsegError, match="run f+"):
        resolve.load_model("f" * 32, tracking_uri=store.uri)


def test_cli_register_reports_the_champion_it_replaces(store):
    from typer.testing import CliRunner

    from cellseg.cli import app

    client = MlflowClient()
    # an earlier champion (another model of the run) that pretends to score higher: registering says so
    client.create_registered_model("reg-cli")
    first = client.create_model_version("reg-cli", f"runs:/{store.run_id}/elsewhere", run_id=store.run_id)
    client.set_registered_model_alias("reg-cli", "champion", first.version)
    client.set_model_version_tag("reg-cli", first.version, "best.val_map", "0.99")
    register = ["register", "--run-id", store.run_id, "--name", "reg-cli", "--tracking-uri", store.uri]
    res = CliRunner().invoke(app, register)
    assert res.exit_code == 0, res.output
    new = int(first.version) + 1
    assert f"registered run {store.run_id} as models:/reg-cli/{new} (alias champion)" in res.output
    assert f"champion: version {first.version} -> {new} (val_map 0.9900 -> " in res.output
    assert f"note: the new champion scores worse on val_map than version {first.version}; models:/reg-cli/{first.version} is still there" in res.output
    # the same command again: no duplicate version, nothing replaced
    res = CliRunner().invoke(app, register)
    assert res.exit_code == 0, res.output
    assert f"run {store.run_id}: this model is already models:/reg-cli/{new}; no new version" in res.output
    assert "champion:" not in res.output and len(client.search_model_versions("name='reg-cli'")) == 2
    # a loss is better lower: the first version back as champion with a (pretended) higher loss
    client.set_registered_model_alias("reg-cli", "champion", first.version)
    client.set_model_version_tag("reg-cli", first.version, "best.val_loss", "99")
    res = CliRunner().invoke(app, [*register, "--metric", "val_loss"])
    assert res.exit_code == 0 and f"champion: version {first.version} -> {new} (val_loss 99.0000 -> " in res.output
    assert "scores worse" not in res.output
    # a PyTorch version: the note names what makes the serving (ONNX) version; a run with an ONNX
    # attached (the `champion` fixture, when it ran first) registers the pyfunc version: no such note
    note = "note: this version is the PyTorch model (cellseg infer --model torch); `cellseg export -o FILE.onnx --name reg-cli "
    flavor = client.get_model_version("reg-cli", str(new)).tags["cellseg.flavor"]
    assert (note in res.output) == (flavor == "pytorch"), (flavor, res.output)
    assert "before its planned epochs" not in res.output
    # a run stopped by hand (KILLED) that logged its model: registered, with a note saying so
    client.set_terminated(store.run_id, "KILLED")
    try:
        res = CliRunner().invoke(app, ["register", "--run-id", store.run_id, "--name", "reg-killed", "--tracking-uri", store.uri])
        assert res.exit_code == 0 and f"note: run {store.run_id} ended KILLED, before its planned epochs (`cellseg train " \
                                      f"--resume {store.run_id} --tracking-uri {store.uri}` goes on)" in res.output, res.output
    finally:
        client.set_terminated(store.run_id, "FINISHED")


def test_register_names_a_run_that_failed_before_logging_a_model(store):
    client = MlflowClient()
    run = client.create_run(client.get_experiment_by_name("registry-test").experiment_id)
    running = client.create_run(run.info.experiment_id)
    with pytest.raises(CellsegError, match=f"run {running.info.run_id} is still running"):
        registry.register_run(running.info.run_id, name="reg-failed")
    client.set_terminated(run.info.run_id, "FAILED")
    with pytest.raises(CellsegError, match=f"run {run.info.run_id} ended FAILED before logging a model"):
        registry.register_run(run.info.run_id, name="reg-failed")


def test_run_checkpoint_is_downloaded_again_once_the_run_logs_on(store, tmp_path):
    """A cached best.pt is not taken for a run that logged a new one since (e.g. after `train --resume`)."""
    client = MlflowClient()
    run = client.create_run(client.get_experiment_by_name("registry-test").experiment_id)
    rid = run.info.run_id
    src = tmp_path / "checkpoints"
    src.mkdir()
    (src / "best.pt").write_bytes(b"epoch 1")
    client.log_artifacts(rid, str(src), "checkpoints")
    client.log_metric(rid, "val_iou", 0.1, step=1)
    client.set_terminated(rid, "KILLED")
    assert registry.run_checkpoint(rid).read_bytes() == b"epoch 1"
    first = registry.run_checkpoint(rid)
    assert first.read_bytes() == b"epoch 1"  # cached
    import os
    import time

    os.utime(first.parent, (time.time() - 3600, time.time() - 3600))  # an old copy: removed once replaced

    client.update_run(rid, "RUNNING")  # resumed: two more epochs, a new best checkpoint of the same size
    (src / "best.pt").write_bytes(b"epoch 3")
    client.log_artifacts(rid, str(src), "checkpoints")
    client.log_metric(rid, "val_iou", 0.4, step=3)
    client.set_terminated(rid, "FINISHED")
    path = registry.run_checkpoint(rid)
    assert path.read_bytes() == b"epoch 3"
    assert [p.name for p in registry.cache_dir().glob(f"run-{rid}-*")] == [path.parent.name]  # the stale copy removed
    client.set_tag(rid, "cellseg.onnx_artifact", "x")  # attaching an ONNX changes tags, not the checkpoint
    assert registry.run_checkpoint(rid) == path


def test_attaching_another_onnx_leaves_versions_that_have_one(store, onnx_file, champion, tmp_path):
    """A pinned version keeps running the ONNX it was registered with after a later export of its run."""
    import shutil

    from cellseg.export import store_postprocess

    pinned = registry.register_run(store.run_id, name="reg-pin")
    first = pinned.tags["onnx_artifact"]
    assert first.endswith("/unet.onnx")
    # the same file name, re-tuned: a new artifact; the pinned version still runs the old bytes
    retuned = shutil.copy(onnx_file, tmp_path / "unet.onnx")
    store_postprocess(retuned, {"interior_threshold": 0.9})
    registry.attach_onnx(store.run_id, retuned, name="reg-pin")
    client = MlflowClient()
    assert client.get_model_version("reg-pin", pinned.version).tags["onnx_artifact"] == first
    second = client.get_run(store.run_id).data.tags[registry.RUN_ONNX_TAG]
    assert second != first and second.endswith("/unet.onnx")
    newer = registry.register_run(store.run_id, name="reg-pin")
    assert newer.tags["onnx_artifact"] == second
    shutil.rmtree(registry.cache_dir())  # what another machine downloads
    old = registry.version_onnx(client.get_model_version("reg-pin", pinned.version))
    assert old.read_bytes() == onnx_file.read_bytes()
    assert OnnxModel(registry.version_onnx(newer), device="cpu").postprocess == {"interior_threshold": 0.9}


def test_cli_register_onnx_serves_the_tuned_file(store, onnx_file, champion, tmp_path):
    """export -> tune -> register --onnx: the champion serves the thresholds stored by tune."""
    import shutil

    from typer.testing import CliRunner

    from cellseg.cli import app
    from cellseg.export import store_postprocess

    tuned = shutil.copy(onnx_file, tmp_path / "tuned.onnx")
    store_postprocess(tuned, {"interior_threshold": 0.3, "foreground_threshold": 0.8, "min_size": 20})
    res = CliRunner().invoke(app, ["register", "--onnx", str(tuned), "--name", "reg-onnx", "--tracking-uri", store.uri])
    assert res.exit_code == 0, res.output
    mv = registry.get_version("reg-onnx", registry.ALIAS)
    assert mv.tags["cellseg.flavor"] == "pyfunc" and mv.tags["onnx_artifact"].endswith("/tuned.onnx")
    served = OnnxModel(registry.champion_onnx("reg-onnx"), device="cpu")
    assert served.postprocess == {"interior_threshold": 0.3, "foreground_threshold": 0.8, "min_size": 20}
    loaded = mlflow.pyfunc.load_model(f"models:/reg-onnx/{mv.version}").unwrap_python_model()
    assert loaded.model.postprocess == served.postprocess

    from cellseg.export import export_onnx, load_net_from_checkpoint

    net, cfg, _ = load_net_from_checkpoint(store.result.checkpoint_dir / "best.pt")
    orphan = export_onnx(net, cfg, tmp_path / "orphan.onnx", run_id=None)
    for args, message in (
        (["--onnx", str(orphan)], "records no training run"),
        (["--onnx", str(tuned), "--run-id", "0" * 32], f"exported from run {store.run_id}, not --run-id 000"),
        (["--onnx", str(tmp_path / "missing.onnx")], "no such file"),
    ):
        res = CliRunner().invoke(app, ["register", *args, "--name", "reg-onnx", "--tracking-uri", store.uri])
        assert isinstance(res.exception, CellsegError) and message in str(res.exception), (args, res.output)
    assert registry.get_version("reg-onnx", registry.ALIAS).version == mv.version


def test_cli_export_and_register_refuse_bad_names_and_runless_versions(store, tmp_path):
    from typer.testing import CliRunner

    from cellseg.cli import app
    from cellseg.export import export_onnx, load_net_from_checkpoint
    from cellseg.serving import log_pyfunc

    out = tmp_path / "x.onnx"
    for cmd, name in ((["export", "--run-id", store.run_id, "-o", str(out)], "my'model"), (["register", "--run-id", store.run_id], ""),
                      (["export", "--run-id", store.run_id, "-o", str(out)], "a/b")):
        res = CliRunner().invoke(app, [*cmd, "--name", name, "--tracking-uri", store.uri])
        assert isinstance(res.exception, CellsegError) and "a registered model name must be non-empty" in str(res.exception), res.output
    assert not out.exists()

    net, cfg, _ = load_net_from_checkpoint(store.result.checkpoint_dir / "best.pt")
    runless = export_onnx(net, cfg, tmp_path / "runless.onnx", run_id=None)
    log_pyfunc(runless, registered_model_name="runless")  # a version registered from a file, with no source run
    res = CliRunner().invoke(app, ["export", "--model-uri", "models:/runless/1", "-o", str(out), "--tracking-uri", store.uri])
    assert str(res.exception) == "models:/runless/1: version 1 has no source run, so no checkpoint to export (its ONNX is what it serves)"
    assert not out.exists()
    # a file of another store's run (the shipped model's): named, with the store that lacks its run
    shipped = Path(__file__).resolve().parents[1] / "models" / "cellseg-nuclei.onnx"
    res = CliRunner().invoke(app, ["register", "--onnx", str(shipped), "--tracking-uri", store.uri])
    assert isinstance(res.exception, CellsegError) and str(res.exception).startswith(f"{shipped}: exported from run "), res.output
    assert f"which the tracking store {store.uri} does not hold (another store's model?)" in str(res.exception)


def test_champion_change_lines():
    v = lambda version, score: SimpleNamespace(version=version, name="m", tags={"best.val_map": score})  # noqa: E731
    assert registry.champion_change(None, v("1", "0.5")) == (None, None)
    assert registry.champion_change(v("1", "0.5"), v("1", "0.5")) == (None, None)
    assert registry.champion_change(v("1", "0.5"), v("2", "0.6")) == ("champion: version 1 -> 2 (val_map 0.5000 -> 0.6000)", None)
    change, note = registry.champion_change(v("2", "0.6"), v("3", "0.4"))
    assert change.endswith("(val_map 0.6000 -> 0.4000)") and note == (
        "note: the new champion scores worse on val_map than version 2; models:/m/2 is still there")
    assert registry.champion_change(v("1", None), v("2", "0.6")) == ("champion: version 1 -> 2", None)


def test_export_of_a_checkpoint_without_a_data_hash_takes_its_runs_tag(store, tmp_path):
    """Checkpoints from before they held the data hash: export records the run's dataset.hash tag,
    and says so when neither is there (evaluate then cannot spot scoring training images)."""
    import torch
    from typer.testing import CliRunner

    from cellseg.checkpoint import load_checkpoint
    from cellseg.cli import app

    state = load_checkpoint(store.result.checkpoint_dir / "best.pt")
    tag = MlflowClient(store.uri).get_run(store.run_id).data.tags["dataset.hash"]
    assert state.pop("dataset_hash") == tag
    old = tmp_path / "old.pt"
    torch.save(state, old)
    for uri, expected in ((store.uri, tag), (f"sqlite:///{tmp_path / 'elsewhere.db'}", None)):  # run found / store gone
        out = tmp_path / f"{bool(expected)}.onnx"
        res = CliRunner().invoke(app, ["export", "--checkpoint", str(old), "-o", str(out), "--no-attach", "--tracking-uri", uri])
        assert res.exit_code == 0, res.output
        assert OnnxModel(out).metadata.get("cellseg.dataset_hash") == expected
        assert ("records no hash of its training data" in res.output) == (expected is None), res.output
        assert ("nor does its run's dataset.hash tag" in res.output) == (expected is None), res.output
    state.pop("run_id")  # nor a run to ask: the note says that instead
    torch.save(state, old)
    res = CliRunner().invoke(app, ["export", "--checkpoint", str(old), "-o", str(tmp_path / "orphan.onnx"), "--no-attach",
                                   "--tracking-uri", store.uri])
    assert res.exit_code == 0 and "records no hash of its training data (and names no training run)" in res.output, res.output
    mlflow.set_tracking_uri(store.uri)


def test_exporting_a_registered_run_again_adds_no_onnx_and_no_version(store, tmp_path):
    """`cellseg export` twice: the same bytes are attached once and registered once."""
    from typer.testing import CliRunner

    from cellseg.cli import app

    client = MlflowClient()
    registry.register_run(store.run_id, name="reg-export")
    experiment = client.get_run(store.run_id).info.experiment_id

    def counts():
        onnx_models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list",
                                                  filter_string=f"source_run_id='{store.run_id}' AND name='onnx'")
        return len(onnx_models), len(client.search_model_versions("name='reg-export'"))

    out = tmp_path / "again.onnx"
    export = ["export", "--run-id", store.run_id, "-o", str(out), "--overwrite", "--name", "reg-export", "--tracking-uri", store.uri]
    res = CliRunner().invoke(app, export)
    assert res.exit_code == 0, res.output
    assert f"logged ONNX on run {store.run_id}: " in res.output
    champion = registry.get_version("reg-export")
    assert champion.tags["onnx_artifact"] == registry.onnx_artifact_path(out)
    assert f"registered models:/reg-export/{champion.version} (pyfunc" in res.output
    before = counts()
    res = CliRunner().invoke(app, export)
    assert res.exit_code == 0, res.output
    uri = client.get_run(store.run_id).data.tags[registry.RUN_ONNX_URI_TAG]
    assert f"run {store.run_id} has this ONNX already: {uri}" in res.output
    assert f"already registered: models:/reg-export/{champion.version} (pyfunc" in res.output
    assert counts() == before and registry.get_version("reg-export").version == champion.version
    assert registry.attach_onnx(store.run_id, out, name="reg-export") == uri and counts() == before
