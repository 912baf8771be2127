"""DDP under torchrun: real processes, CPU + gloo, 2 ranks, tiny synthetic data.

The tracking URI is passed with --tracking-uri (which only rank 0 reads) and MLFLOW_TRACKING_URI is
unset, so a rank other than 0 touching MLflow would fall back to ./mlflow.db: the tests check that
no such file appears. Every job runs under a timeout: a rank that stopped alone would hang the others.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from processes import child_pids

from cellseg.checkpoint import load_checkpoint
from cellseg.config import apply_overrides, to_yaml

TIMEOUT = 240
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ddp_uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('ddp_mlflow') / 'tracking.db'}"


def _torchrun() -> list[str]:
    script = Path(sys.executable).with_name("torchrun")
    return [str(script)] if script.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _env(tmp_path: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    # TMPDIR: torchrun's log folders and every temp file stay under pytest's tmp_path
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp), MPLBACKEND="Agg", **extra)
    return env


def _launch(tmp_path: Path, args: list[str], **env) -> subprocess.Popen:
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node=2", "-m", "cellseg", "train", *args, "-q"]
    return subprocess.Popen(cmd, cwd=cwd, env=_env(tmp_path, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_all(proc: subprocess.Popen, workers: set[int]) -> None:
    for pid in workers | set(child_pids(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.communicate()


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_all(proc, set())
        pytest.fail(f"torchrun job still running after {timeout}s: a rank is waiting for another (hang)")
    return proc.returncode, out, err


def _write_cfg(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(to_yaml(cfg))
    return path


def _only_run(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"{len(runs)} runs in one torchrun job"
    return client, runs[0]


def _ddp_cfg(tiny_cfg, **overrides):
    return apply_overrides(tiny_cfg, {"train.device": "cpu", "tracking.log_model": False, **overrides})


@pytest.mark.slow
def test_ddp_training_one_run_ranks_in_sync_checkpoint_exports(tiny_cfg, tiny_data, ddp_uri, tmp_path):
    from cellseg.export import check_parity, export_onnx, load_net_from_checkpoint
    from cellseg.model import build_model
    from cellseg.train import param_checksum

    # a learning rate of ~0 leaves val_loss to BatchNorm drift: with patience 1 early stopping fires
    # (at epoch 2 for this seeded run) and every rank has to stop in that same epoch
    cfg = _ddp_cfg(tiny_cfg, **{"train.epochs": 4, "early_stopping.metric": "val_loss", "early_stopping.patience": 1,
                                "schedule.until": [4], "schedule.lrs": [1e-9]})
    proc = _launch(tmp_path, [str(tiny_data), "--config", str(_write_cfg(tmp_path, cfg)), "--tracking-uri", ddp_uri])
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]

    client, run = _only_run(ddp_uri, cfg.tracking.experiment)
    assert run.info.status == "FINISHED"
    # rank 1 prints nothing: one summary line, no warning about OMP_NUM_THREADS, no traceback
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"run {run.info.run_id} FINISHED"), out
    assert "Traceback" not in err and "OMP_NUM_THREADS" not in err, err[-3000:]
    assert not (tmp_path / "cwd" / "mlflow.db").exists(), "a rank other than 0 used MLflow's default store"
    assert run.data.params["train.world_size"] == "2"

    tags = run.data.tags
    stop_epoch = int(tags["early_stopping.epoch"])
    assert stop_epoch < 4
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps == list(range(1, stop_epoch + 1))
    ckpt_dir = Path(tags["cellseg.checkpoint_dir"])
    last = load_checkpoint(ckpt_dir / "last.pt")
    assert last["epoch"] == stop_epoch and last["finished"]

    # every rank's (last epoch, status, parameter hash) agreed, else the job fails; rank 0 logged the hash
    assert re.fullmatch(r"sha256=[0-9a-f]{16} sum=\S+", tags["ddp.param_checksum"]), tags["ddp.param_checksum"]
    net = build_model(cfg.model)
    net.load_state_dict(last["model"])
    assert param_checksum(net) == tags["ddp.param_checksum"]  # the hash is that of the final weights

    # the DDP checkpoint is plain: it loads in this single process and exports
    best = load_checkpoint(ckpt_dir / "best.pt")
    assert not any(k.startswith("module.") for k in best["model"])
    net, net_cfg, run_id = load_net_from_checkpoint(ckpt_dir / "best.pt")
    assert run_id == run.info.run_id and net_cfg.model.depth == 2
    onnx_path = export_onnx(net, net_cfg, tmp_path / "ddp.onnx", run_id=run_id)
    assert check_parity(net, onnx_path, shapes=((1, 1, 64, 64), (2, 1, 48, 80))) <= 1e-4


@pytest.mark.slow
def test_resume_under_torchrun_after_workers_die(tiny_cfg, tiny_data, ddp_uri, tmp_path):
    from cellseg.model import build_model
    from cellseg.train import param_checksum

    # with a moving average of the weights: rank 0 alone keeps it, checkpoints it and resumes it
    cfg = _ddp_cfg(tiny_cfg, **{"train.epochs": 3, "early_stopping.patience": 10, "train.ema_decay": 0.9})
    cfg_path = _write_cfg(tmp_path, cfg)
    proc = _launch(tmp_path, [str(tiny_data), "--config", str(cfg_path), "--tracking-uri", ddp_uri],
                   CELLSEG_DEBUG_STEP_DELAY="0.5")
    ckpt_root = Path(cfg.train.checkpoint_dir)
    workers: set[int] = set()
    try:
        t0 = time.time()
        while not list(ckpt_root.glob("*/last.pt")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() - t0 < TIMEOUT, "no checkpoint"
            workers |= set(child_pids(proc.pid))
            time.sleep(0.1)
        # a preemption: torchrun passes SIGTERM on; the workers end the epoch and mark the run KILLED
        proc.send_signal(signal.SIGTERM)
        rc, _, err = _finish(proc, 60)
        assert rc != 0
    finally:
        if proc.poll() is None:
            _kill_all(proc, workers)
    last = next(ckpt_root.glob("*/last.pt"))
    run_id = last.parent.name
    assert load_checkpoint(last)["epoch"] < 3
    client = MlflowClient(tracking_uri=ddp_uri)
    assert client.get_run(run_id).info.status == "KILLED"

    rc, out, err = _finish(_launch(tmp_path, ["--resume", run_id, "--tracking-uri", ddp_uri]))
    assert rc == 0, err[-3000:]
    assert len(out.strip().splitlines()) == 1 and f"run {run_id} FINISHED" in out, out
    client, run = _only_run(ddp_uri, cfg.tracking.experiment)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2, 3]
    final = load_checkpoint(last)
    assert final["epoch"] == 3 and "ema" in final
    # the ranks agreed on the raw weights; the checkpoint's "model" is their average
    net = build_model(cfg.model)
    net.load_state_dict(final["train_model"])
    assert param_checksum(net) == run.data.tags["ddp.param_checksum"]
    net.load_state_dict(final["model"])
    assert param_checksum(net) != run.data.tags["ddp.param_checksum"]
    assert not (tmp_path / "cwd" / "mlflow.db").exists()


def test_sync_batchnorm_on_cpu_is_refused_before_a_run(tiny_cfg, tmp_path, monkeypatch):
    """torch refuses SyncBatchNorm on CPU ("SyncBatchNorm layers only work with GPU modules", raised by
    DistributedDataParallel): train() says so on every rank before MLflow is touched. In-process, with
    rank 1 of 2 faked (a real 2-process launch costs 10 s for the same check)."""
    import cellseg.train as train_mod
    from cellseg.errors import CellsegError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train_mod.dist, "init", lambda device_type: True)
    monkeypatch.setattr(train_mod, "_on_main", lambda fn: pytest.fail("got past the SyncBatchNorm check"))
    cfg = _ddp_cfg(tiny_cfg, **{"train.sync_batchnorm": True})
    with pytest.raises(CellsegError, match="train.sync_batchnorm: SyncBatchNorm needs CUDA"):
        train_mod.train(cfg, quiet=True)
    monkeypatch.setenv("WORLD_SIZE", "1")  # a single process ignores the option
    monkeypatch.setenv("RANK", "0")
    train_mod._check_sync_batchnorm(cfg, train_mod.torch.device("cpu"), 1)


def test_mlproject_train_ddp_entry_point_launches_torchrun(monkeypatch):
    import torch.distributed.run as torchrun
    from test_train_entry import _launched

    from pipelines import train_entry

    monkeypatch.setenv("OMP_NUM_THREADS", "")  # (restored afterwards: torchrun_train sets it in this process)
    monkeypatch.delenv("OMP_NUM_THREADS")
    started = []
    monkeypatch.setattr(torchrun, "run", started.append)
    with pytest.raises(SystemExit) as done:
        _launched(monkeypatch, "train_ddp", {"nproc": "3", "data": "/data/x", "epochs": 5, "steps_per_epoch": 2})
    assert done.value.code == 0
    (ns,) = started
    assert (ns.standalone, ns.nproc_per_node, ns.module, ns.training_script) == (True, "3", True, "cellseg")
    assert ns.training_script_args == ["train", "--epochs=5", "--steps-per-epoch=2", "--quiet", "--", "/data/x"]
    assert ns.redirects == "1:3,2:3"  # ranks 1 and 2 write to log files; rank 0 speaks on the console
    assert os.environ["OMP_NUM_THREADS"] == "1"  # torchrun's own default, set so it does not warn
    assert not Path(ns.log_dir).exists()  # the log folder is removed afterwards
    assert train_entry.torchrun_train(1, ["x"]) == 0 and started[-1].redirects == "0"  # (torchrun's default: none)


def test_torchrun_failures_end_in_one_error_not_a_traceback(monkeypatch, capsys):
    """The first failure decides: rank 0's own error is already on the console; another rank's
    hidden output is shown with a one-line summary; an interrupt gives 128 + the signal."""
    import signal as signals

    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from pipelines.train_entry import torchrun_train

    monkeypatch.setenv("OMP_NUM_THREADS", "")  # (restored afterwards: torchrun_train sets it in this process)
    monkeypatch.delenv("OMP_NUM_THREADS")

    def failing(codes: dict[int, int]):
        def run(ns):
            log = Path(ns.log_dir) / "run_x" / "attempt_0" / "1" / "stderr.log"
            log.parent.mkdir(parents=True)
            log.write_text("Traceback ...\nerror: only rank 1 sees this\n")
            raise ChildFailedError("cellseg", {r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=code, error_file="")
                                               for r, code in codes.items()})
        return run

    rank1 = ("Traceback ...\nerror: only rank 1 sees this\n"
             "error: cellseg train under torchrun: rank 1 of 2 failed (exit code 3)\n")
    monkeypatch.setattr(torchrun, "run", failing({0: 2, 1: -signals.SIGTERM}))  # rank 1 stopped by torchrun
    assert torchrun_train(2, []) == 2
    assert capsys.readouterr().err == ""  # rank 0 printed its error itself
    monkeypatch.setattr(torchrun, "run", failing({0: -signals.SIGTERM, 1: 3}))
    assert torchrun_train(2, []) == 3
    assert capsys.readouterr().err == rank1
    monkeypatch.setattr(torchrun, "run", failing({0: 1, 1: 3}))  # rank 0 fell over rank 1 (a broken collective)
    assert torchrun_train(2, []) == 1
    assert capsys.readouterr().err == rank1  # rank 1's own error is not hidden behind rank 0's

    def interrupted(ns):
        raise SignalException("got signal", signals.SIGTERM)

    monkeypatch.setattr(torchrun, "run", interrupted)
    assert torchrun_train(2, []) == 128 + signals.SIGTERM and capsys.readouterr().err == ""


def test_train_ddp_refuses_a_bad_dataset_once(tmp_path):
    """Every rank refuses a missing dataset: one error line (rank 0's), exit status 2, no torchrun traceback."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.train_entry", "--entry", "train_ddp", "--nproc=2",
                           f"--data={tmp_path / 'missing'}"], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: {tmp_path / 'missing'}: dataset folder not found\n"
