"""Training end to end on tiny synthetic data, tracked in a temporary MLflow store."""

from __future__ import annotations

import contextlib
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from processes import child_pids, ignores_signal

from cellseg.checkpoint import load_checkpoint
from cellseg.config import apply_overrides
from cellseg.errors import CellsegError
from cellseg.train import train


def test_two_epoch_training_logs_everything(tracking, tiny_cfg):
    result = train(tiny_cfg, quiet=True)
    assert result.status == "FINISHED" and result.last_epoch == 2
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.depth"] == "2"
    for key in ("train_loss", "val_loss", "val_iou", "val_seg", "val_map", "lr", "curriculum_stage",
                "epoch_seconds", "train_images_per_s"):
        assert key in run.data.metrics, key
    steps = [m.step for m in MlflowClient().get_metric_history(result.run_id, "val_iou")]
    assert steps == [1, 2]
    tags = run.data.tags
    assert tags["cellseg.version"] and len(tags["dataset.hash"]) == 16 and tags["dataset.path"]
    arts = {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert {"config.yaml", "plots", "checkpoints", "overlays"} <= arts
    assert result.model_uri
    ckpt = load_checkpoint(result.checkpoint_dir / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["finished"]
    assert ckpt["dataset_hash"] == tags["dataset.hash"]  # carried into exported models
    assert (result.checkpoint_dir / "best.pt").exists()
    # the trainer held the folder's training lock (what refuses a --resume while it trains)
    assert (result.checkpoint_dir / "training.lock").read_text().startswith(f"pid {os.getpid()} on ")
    assert result.metric == "val_iou"


def test_resume_continues_same_run_without_duplicate_steps(tracking, tiny_cfg):
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 3})
    first = train(apply_overrides(cfg, {"train.epochs": 3}), quiet=True)
    # pretend the run was cut after epoch 1: rewind the checkpoint
    state = load_checkpoint(first.checkpoint_dir / "last.pt")
    assert state["epoch"] == 3
    with pytest.raises(CellsegError, match="already finished"):
        train(cfg, resume=first.run_id, quiet=True)


_HOLD_LOCK = """
import sys
from cellseg.checkpoint import training_lock
with training_lock(sys.argv[1], "test"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _lock_holder(folder) -> subprocess.Popen:
    """Another process holding `folder`'s training lock (until killed)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_resume_of_a_run_another_process_trains_is_refused(tracking, tiny_cfg):
    """Two trainers must not write into one run: while a process holds the run's training lock a
    --resume is refused and the run is left as it was; once that process dies, even by SIGKILL
    (which leaves the MLflow run RUNNING), the run resumes."""
    cfg = apply_overrides(tiny_cfg, {"early_stopping.metric": "val_map"})
    first = train(cfg, quiet=True)
    assert first.metric == "val_map"
    client = MlflowClient()
    client.set_terminated(first.run_id, "RUNNING")  # as a trainer still at work (or SIGKILLed) leaves it
    holder = _lock_holder(first.checkpoint_dir)
    try:
        with pytest.raises(CellsegError, match=rf"--resume {first.run_id}: the run is still being trained by pid {holder.pid} on "):
            train(tiny_cfg, resume=first.run_id, quiet=True)
        assert client.get_run(first.run_id).info.status == "RUNNING"
        holder.kill()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    result = train(tiny_cfg, resume=first.run_id, quiet=True)  # the checkpoint had finished: only the run's end is redone
    assert result.run_id == first.run_id and client.get_run(first.run_id).info.status == "FINISHED"
    assert result.metric == "val_map"  # the checkpoint's config, not the one passed in


def _wait_for(path, timeout=120.0):
    t0 = time.time()
    while not path.exists():
        if time.time() - t0 > timeout:
            raise TimeoutError(path)
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_mid_training_then_resume(tracking, tiny_cfg, tmp_path):
    """A real subprocess killed with SIGKILL resumes at the next epoch in the same run."""
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 4, "train.steps_per_epoch": 4})
    cfg_path = tmp_path / "cfg.yaml"
    from cellseg.config import to_yaml

    cfg_path.write_text(to_yaml(cfg))
    env = {**os.environ, "CELLSEG_DEBUG_STEP_DELAY": "0.4"}
    proc = subprocess.Popen([sys.executable, "-m", "cellseg", "train", "--config", str(cfg_path), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt_root = tmp_path / "ckpt"
    try:
        t0 = time.time()
        while not list(ckpt_root.glob("*/last.pt")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() - t0 < 120
            time.sleep(0.1)
        last = next(ckpt_root.glob("*/last.pt"))
        from cellseg.checkpoint import training_lock

        with pytest.raises(CellsegError, match=f"still being trained by pid {proc.pid} "):  # the trainer holds its lock
            with training_lock(last.parent, "test"):
                pass
        time.sleep(0.6)  # into epoch 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_id = last.parent.name
    done = load_checkpoint(last)["epoch"]
    assert done < 4
    best_before = load_checkpoint(last.parent / "best.pt")["model"]
    result = train(cfg, resume=run_id, quiet=True)
    assert result.run_id == run_id and result.last_epoch == 4
    client = MlflowClient()
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert steps == [1, 2, 3, 4]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert best_before  # the best checkpoint survived the kill


@pytest.mark.parametrize("sig, workers, target", [(signal.SIGINT, 0, "trainer"), (signal.SIGTERM, 2, "group"), (signal.SIGTERM, 2, "every")],
                         ids=["SIGINT", "SIGTERM-group-workers", "SIGTERM-every-process"])
def test_sigint_ends_epoch_and_marks_killed(tracking, tiny_cfg, tmp_path, sig, workers, target):
    """Ctrl-C; SIGTERM sent twice to the whole process group, as GNU timeout does; or SIGTERM
    sent to every process, DataLoader workers included, as Slurm does: the epoch ends, the run
    is KILLED and resumable.

    With workers, the signal goes out once the second epoch's workers have set up their signal
    handling, 20 steps (6 s) before that epoch ends, so each of them surely gets it (a signal in
    their start-up window is the next test's case)."""
    steps = 20 if workers else 3
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 50, "train.steps_per_epoch": steps, "train.workers": workers})
    from cellseg.config import to_yaml

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(to_yaml(cfg))
    env = {**os.environ, "CELLSEG_DEBUG_STEP_DELAY": "0.3"}
    proc = subprocess.Popen([sys.executable, "-m", "cellseg", "train", "--config", str(cfg_path), "-q"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ckpt_root = tmp_path / "ckpt"
    t0 = time.time()
    while not list(ckpt_root.glob("*/last.pt")):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() - t0 < 120
        time.sleep(0.1)
    # the next epoch's workers, once they have set up their signal handling (SIGINT ignored: bit 2 of SigIgn)
    while workers and not (workers_now := [pid for pid in child_pids(proc.pid) if ignores_signal(pid, signal.SIGINT)]):
        assert proc.poll() is None and time.time() - t0 < 120
        time.sleep(0.05)
    if target == "trainer":
        proc.send_signal(sig)
    elif target == "group":
        proc.send_signal(sig)
        os.killpg(proc.pid, sig)
    else:
        for pid in [proc.pid, *workers_now]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:  # a worker of an epoch that just ended
                pass
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    last = next(ckpt_root.glob("*/last.pt"))
    run = MlflowClient().get_run(last.parent.name)
    assert run.info.status == "KILLED"
    state = load_checkpoint(last)
    assert state["epoch"] < 50 and not state["finished"]
    assert "Traceback" not in err.decode()


_STUCK_WORKER = """
import os, signal, sys, time
from pathlib import Path
import torch.utils.data
import cellseg.data.dataset as ds

original = ds.TrainDataset.__getitem__
marks, batch = sys.argv[2], int(sys.argv[3])

def getitem(self, idx):
    # the last batch of an epoch is never delivered: its worker gets stuck in C code that no SIGTERM
    # reaches (blocked), so only SIGKILL ends it. It sends the trainer a SIGTERM as it gets stuck: the
    # trainer, 4 prefetched batches behind, stops after its current step without needing this one
    if torch.utils.data.get_worker_info() is not None and idx >= len(self) - batch:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        Path(marks, f"stuck-{os.getpid()}").touch()
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(3600)
    return original(self, idx)

ds.TrainDataset.__getitem__ = getitem
from cellseg.cli import main
sys.argv = ["cellseg", "train", "--config", sys.argv[1], "-q"]
main()
"""


@pytest.mark.slow
def test_a_worker_stuck_in_c_code_does_not_keep_the_trainer_from_exiting(tracking, tiny_cfg, tmp_path):
    """SIGTERM while a DataLoader worker hangs where no signal reaches it: the trainer ends the
    epoch, SIGKILLs the worker that torch's shutdown leaves alive and exits 130 with the run KILLED
    (Python's exit would otherwise wait for that worker forever)."""
    from cellseg.config import to_yaml

    cfg = apply_overrides(tiny_cfg, {"train.epochs": 3, "train.steps_per_epoch": 20, "train.workers": 2})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(to_yaml(cfg))
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "CELLSEG_DEBUG_STEP_DELAY": "0.3"}
    proc = subprocess.Popen([sys.executable, "-c", _STUCK_WORKER, str(cfg_path), str(marks), str(cfg.train.batch_size)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stuck = [int(p.name.split("-")[1]) for p in marks.glob("stuck-*")]
        alive = [pid for pid in stuck if Path(f"/proc/{pid}").exists()]
        for pid in alive:  # a failing run must not leave its stuck worker sleeping for an hour
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 130, err.decode()
    assert stuck and not alive
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert run.info.status == "KILLED"


_SLOW_WORKER_START = """
import os, sys, time
from pathlib import Path
import cellseg.train as t

original, marks = t._own_process_group, sys.argv[2]

def slow_start(worker_id):  # a worker's start made 2 s long: the window a signal must not kill it in
    Path(marks, f"start-{os.getpid()}").touch()
    time.sleep(2)
    original(worker_id)

t._own_process_group = slow_start
from cellseg.cli import main
sys.argv = ["cellseg", "train", "--config", sys.argv[1], "-q"]
main()
"""


def test_a_sigterm_to_every_process_as_workers_start_stops_the_run_cleanly(tracking, tiny_cfg, tmp_path):
    """Slurm-style SIGTERM to the trainer and to workers that have not yet set up their signal
    handling: the workers start with it blocked, so it waits for their handlers instead of
    killing them (which would fail the run); the run ends KILLED."""
    from cellseg.config import to_yaml

    cfg = apply_overrides(tiny_cfg, {"train.epochs": 3, "train.steps_per_epoch": 4, "train.workers": 2})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(to_yaml(cfg))
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WORKER_START, str(cfg_path), str(marks)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        t0 = time.time()
        while len(starting := list(marks.glob("start-*"))) < 2:
            assert proc.poll() is None and time.time() - t0 < 120, proc.stderr.read().decode()
            time.sleep(0.02)
        for pid in [proc.pid, *(int(p.name.split("-")[1]) for p in starting)]:
            os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err.decode()
    run = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(cfg.tracking.experiment).experiment_id])[0]
    assert run.info.status == "KILLED"
    assert "Traceback" not in err.decode()


_SIGTERM_IN = """
import importlib, os, signal, sys, time

def sigterm_in(spec):
    # MODULE:[CLASS.]NAME sends SIGTERM to this process in place of that function; with a trailing
    # '+' it then waits a little and calls the function (a signal that arrives in its middle)
    module, name = spec.rstrip("+").split(":")
    owner = importlib.import_module(module)
    if "." in name:
        cls, name = name.split(".")
        owner = getattr(owner, cls)
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        if spec.endswith("+"):
            time.sleep(2)
            return original(*args, **kwargs)
        time.sleep(10)
        raise AssertionError("SIGTERM ignored")

    setattr(owner, name, patched)

for spec in sys.argv[2:]:
    sigterm_in(spec)
from cellseg.cli import main
sys.argv = ["cellseg", "train", "--config", sys.argv[1], "-q"]
main()
"""


def _train_with_sigterm_in(cfg, tmp_path, *specs):
    """`cellseg train` in a subprocess, SIGTERM sent from inside the functions `specs` name; the run."""
    from cellseg.config import to_yaml

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(to_yaml(cfg))
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_IN, str(cfg_path), *specs], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1
    return runs[0], proc.stderr


@pytest.mark.parametrize("phase", ["_fit+", "log_torch_model"], ids=["startup", "final-model-logging"])
def test_sigterm_outside_the_epoch_loop_ends_run_killed(tracking, tiny_cfg, tmp_path, phase):
    """SIGTERM as the first epoch starts or while the final model is logged interrupts like Ctrl-C:
    exit code 130 and the MLflow run KILLED, not left RUNNING by an instant death. A run cut short
    while finishing resumes with the finishing alone."""
    # (2 epochs for the stop at startup: one that comes in the last epoch lets the run finish)
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 2 if phase == "_fit+" else 1, "train.steps_per_epoch": 1})
    run, err = _train_with_sigterm_in(cfg, tmp_path, f"cellseg.train:{phase}")
    rid = run.info.run_id
    if phase == "_fit+":  # the signal is acted on after the first step: a checkpoint to resume from
        assert (Path(cfg.train.checkpoint_dir) / rid / "last.pt").is_file()
        assert [m.step for m in MlflowClient().get_metric_history(rid, "train_loss")] == [1]
    assert run.info.status == "KILLED"
    assert f"interrupted: MLflow run {rid} ended KILLED; continue it with `cellseg train --resume {rid} --tracking-uri {tracking}`" in err
    if phase == "log_torch_model":  # training was over: resuming logs the model, trains no further epoch
        result = train(cfg, resume=rid, quiet=True)
        assert result.status == "FINISHED" and result.last_epoch == 1 and result.model_uri
        assert MlflowClient().get_run(rid).info.status == "FINISHED"
        assert [m.step for m in MlflowClient().get_metric_history(rid, "train_loss")] == [1]
        with pytest.raises(CellsegError, match="already finished at epoch 1"):
            train(cfg, resume=rid, quiet=True)


def test_an_interrupt_while_the_model_is_logged_leaves_no_pending_model(tracking, tiny_cfg, tmp_path):
    """SIGTERM inside MLflow's log_model, once it has created the logged model: the model is marked
    FAILED (MLflow does so for errors, not interrupts: it stayed PENDING), the run KILLED; resuming
    logs a READY one."""
    from mlflow.entities import LoggedModelStatus

    cfg = apply_overrides(tiny_cfg, {"train.epochs": 1, "train.steps_per_epoch": 1})
    run, err = _train_with_sigterm_in(cfg, tmp_path, "mlflow.tracking.client:MlflowClient.log_model_artifacts")
    rid = run.info.run_id
    assert run.info.status == "KILLED", err

    def statuses():
        models = MlflowClient().search_logged_models([run.info.experiment_id])
        return [m.status for m in models if m.source_run_id == rid]

    assert statuses() == [LoggedModelStatus.FAILED]
    assert train(cfg, resume=rid, quiet=True).status == "FINISHED"
    assert sorted(statuses(), key=str) == sorted([LoggedModelStatus.FAILED, LoggedModelStatus.READY], key=str)


def test_a_stop_in_the_last_epoch_lets_the_run_finish(tracking, tiny_cfg, monkeypatch):
    """Ctrl-C during the epoch that ends training (the last, or early stopping's): the run is
    FINISHED, its checkpoint says so, and no resume trains past the stop."""
    import cellseg.train as train_module

    real, sent = train_module.validate, []

    def validate_then_ctrl_c(*args, **kwargs):
        if not sent:  # in the epoch's validation (not the final one of the finished run)
            sent.append(os.kill(os.getpid(), signal.SIGINT))  # only sets the stop flag while training runs
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "validate", validate_then_ctrl_c)
    result = train(apply_overrides(tiny_cfg, {"train.epochs": 1}), quiet=True)
    assert result.status == "FINISHED" and result.last_epoch == 1
    assert load_checkpoint(result.checkpoint_dir / "last.pt")["finished"] is True
    assert MlflowClient().get_run(result.run_id).info.status == "FINISHED"


def test_a_stop_before_the_first_epoch_is_not_lost(tracking, tiny_cfg, tmp_path):
    """A signal while the run starts (data loading, MLflow setup) is acted on at the next check, not
    raised wherever it lands (in a garbage-collection callback it was ignored and training ran on);
    a run stopped before any checkpoint says there is nothing to resume."""
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 30, "train.steps_per_epoch": 1})
    run, err = _train_with_sigterm_in(cfg, tmp_path, "cellseg.train:dataset_hash+")  # the run exists, no epoch ran
    rid = run.info.run_id
    assert run.info.status == "KILLED" and not MlflowClient().get_metric_history(rid, "train_loss")
    assert err.strip().endswith(f"interrupted: MLflow run {rid} ended KILLED before its first epoch finished, "
                                "so there is nothing to resume; start a new run"), err
    from cellseg.config import to_yaml

    (tmp_path / "cfg.yaml").write_text(to_yaml(cfg))
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_IN, str(tmp_path / "cfg.yaml"), "cellseg.train:load_split+"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130 and proc.stderr.strip().endswith("interrupted"), proc.stderr  # before any run: none made
    assert len(MlflowClient().search_runs([run.info.experiment_id])) == 1


@pytest.mark.parametrize("deliver", [True, False])
def test_interrupts_held_notes_a_signal_then_delivers_or_drops_it(deliver):
    from cellseg.tracking import interrupts_held

    # Python's own Ctrl-C handler, as in a terminal: a shell without job control starts
    # background jobs (`make test &` in a script) with SIGINT ignored, and Python keeps that
    launched_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    finished = False
    try:
        with interrupts_held(deliver):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # a Python signal handler would run here
            finished = True
    except KeyboardInterrupt:
        assert deliver and finished
    else:
        assert not deliver and finished
    finally:
        restored = signal.signal(signal.SIGINT, launched_with)
    assert restored is signal.default_int_handler


def test_plotting_is_loaded_before_interrupts_are_caught():
    """A second Ctrl-C while matplotlib's C extensions first load (the end of an interrupted run
    logs its curves) aborted the interpreter: they load before the signal handlers go in."""
    code = (
        "import sys\n"
        "import cellseg.tracking as t\n"
        "def spy():\n"
        "    wanted = ('matplotlib.pyplot', 'matplotlib.backends._backend_agg', 'PIL.PngImagePlugin')\n"
        "    print('loaded' if all(m in sys.modules for m in wanted) else 'not loaded', flush=True)\n"
        "    raise SystemExit(0)\n"
        "t.sigterm_interrupts = spy\n"
        "from cellseg.config import Config\n"
        "from cellseg.train import train\n"
        "train(Config())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "loaded", r.stdout + r.stderr


def test_interruption_note_names_the_command_that_goes_on(tracking, tiny_cfg):
    import mlflow

    from cellseg.train import interruption_note

    cfg = apply_overrides(tiny_cfg, {"tracking.register_model": True, "tracking.model_name": "my nuclei"})
    assert interruption_note("r1", "KILLED", cfg) == f"interrupted: MLflow run r1 ended KILLED; continue it with `cellseg train --resume r1 --tracking-uri {tracking}`"
    assert f"`cellseg register --run-id r1 --name 'my nuclei' --tracking-uri {tracking}`" in interruption_note("r1", "FINISHED", cfg)
    for off in ({"tracking.register_model": False}, {"tracking.log_model": False}):  # nothing to register
        assert interruption_note("r1", "FINISHED", apply_overrides(cfg, off)) == "interrupted: MLflow run r1 had ended FINISHED"
    mlflow.set_tracking_uri("sqlite:///mlflow.db")  # the default store goes unnamed
    try:
        assert interruption_note("r1", None, cfg).endswith("`cellseg train --resume r1`")
        here = Path.cwd()  # a relative store is named absolutely: the command works from any folder
        for relative, absolute in (("sqlite:///other.db", f"sqlite:///{here / 'other.db'}"), ("file:runs", f"file://{here / 'runs'}"),
                                   ("./runs", str(here / "runs"))):
            mlflow.set_tracking_uri(relative)
            assert interruption_note("r1", None, cfg).endswith(f"`cellseg train --resume r1 --tracking-uri {absolute}`")
    finally:
        mlflow.set_tracking_uri(tracking)


def test_a_second_sigterm_while_the_run_is_ended_does_not_leave_it_running(tracking, tiny_cfg, tmp_path):
    """SIGTERM while logging the final model, then another while MLflow marks the run KILLED."""
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 1, "train.steps_per_epoch": 1})
    run, err = _train_with_sigterm_in(cfg, tmp_path, "cellseg.train:log_torch_model",
                                      "mlflow.tracking.client:MlflowClient.set_terminated+")
    assert run.info.status == "KILLED", err


def test_sigterm_while_registering_says_the_run_finished(tracking, tiny_cfg, tmp_path):
    """The run had ended FINISHED when the signal came: the message says so and how to register it."""
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 1, "train.steps_per_epoch": 1, "tracking.register_model": True})
    run, err = _train_with_sigterm_in(cfg, tmp_path, "cellseg.registry:register_run")
    rid = run.info.run_id
    assert run.info.status == "FINISHED"
    assert (f"MLflow run {rid} had ended FINISHED; its registration was cut short: "
            f"`cellseg register --run-id {rid} --tracking-uri {tracking}` registers it") in err
    assert "ended KILLED" not in err


def test_dataset_smaller_than_batch(tracking, tiny_cfg):
    cfg = apply_overrides(tiny_cfg, {"train.batch_size": 64})
    cfg.train.steps_per_epoch = None
    with pytest.raises(CellsegError, match="smaller than one batch of 64"):
        train(cfg, quiet=True)


def test_unreachable_tracking_server_fails_fast(tiny_cfg, monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    cfg = apply_overrides(tiny_cfg, {"tracking.uri": f"http://127.0.0.1:{port}"})
    t0 = time.time()
    with pytest.raises(CellsegError, match=f"MLflow tracking server http://127.0.0.1:{port} is unreachable"):
        train(cfg, quiet=True)
    assert time.time() - t0 < 10


def test_validation_scores_with_the_postprocess_section(tracking, tiny_cfg, monkeypatch):
    import cellseg.validate as validate_mod

    seen = []
    real = validate_mod.probabilities_to_instances
    monkeypatch.setattr(validate_mod, "probabilities_to_instances", lambda probs, **kw: (seen.append(kw), real(probs, **kw))[1])
    options = {"interior_threshold": 0.2, "foreground_threshold": 0.8, "min_size": 3}
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 1, **{f"postprocess.{k}": v for k, v in options.items()}})
    result = train(cfg, quiet=True)
    assert seen and all(kw == options for kw in seen)
    params = MlflowClient().get_run(result.run_id).data.params
    assert params["postprocess.interior_threshold"] == "0.2" and params["postprocess.min_size"] == "3"
    with pytest.raises(CellsegError, match="postprocess.foreground_threshold"):
        apply_overrides(tiny_cfg, {"postprocess.foreground_threshold": 1.5})


def test_dataset_class_balance_logs_the_weights_it_trains_with(tracking, tiny_cfg):
    from cellseg.data.dataset import load_split
    from cellseg.data.targets import dataset_class_weights

    cfg = apply_overrides(tiny_cfg, {"train.epochs": 1, "targets.class_balance": "dataset"})
    result = train(cfg, quiet=True)
    params = MlflowClient().get_run(result.run_id).data.params
    train_samples, _ = load_split(cfg, cfg.data.path)
    want = dataset_class_weights([s.labels for s in train_samples])
    assert params["targets.class_balance"] == "dataset"
    assert [float(w) for w in params["targets.class_weights"].split(", ")] == pytest.approx(want, rel=1e-3)
    assert want[2] > want[1] > want[0] > 0  # boundary rarest, background commonest


def test_ema_weights_are_checkpointed_and_resume_exactly(tracking, tiny_cfg):
    import torch

    cfg = apply_overrides(tiny_cfg, {"train.epochs": 3, "train.ema_decay": 0.9})
    straight = train(cfg, quiet=True)
    done = load_checkpoint(straight.checkpoint_dir / "last.pt")
    assert int(done["ema"]["n_averaged"]) == 3 * cfg.train.steps_per_epoch
    # "model" (what export, evaluation and the logged model read) is the moving average, not the raw weights
    assert any(not torch.equal(done["model"][k], done["train_model"][k]) for k in done["model"])
    assert not any(k.startswith("module.") for k in done["model"])
    # its BatchNorm statistics were recomputed for the averaged weights on this epoch's batches
    # (4 crops = 2 batches of 2), not averaged from the raw network's
    tracked = {int(v) for k, v in done["model"].items() if k.endswith("num_batches_tracked")}
    assert tracked == {2}

    # the same run cut after epoch 2, then resumed: identical raw and averaged weights
    first = train(apply_overrides(cfg, {"train.epochs": 2}), quiet=True)
    path = first.checkpoint_dir / "last.pt"
    state = load_checkpoint(path)
    state["finished"] = False
    state["config"]["train"]["epochs"] = 3
    torch.save(state, path)
    resumed = train(cfg, resume=first.run_id, quiet=True)
    assert resumed.last_epoch == 3
    again = load_checkpoint(path)
    for key in ("model", "train_model"):
        for name, value in done[key].items():
            torch.testing.assert_close(again[key][name], value, atol=1e-6, rtol=0)
    assert int(again["ema"]["n_averaged"]) == int(done["ema"]["n_averaged"])
    assert again["dataset_hash"] == done["dataset_hash"] and again["dataset_hash"]  # kept across the resume


def test_register_without_the_logged_model_is_refused_before_training(tracking, tiny_cfg):
    import mlflow

    cfg = apply_overrides(tiny_cfg, {"tracking.register_model": True, "tracking.log_model": False})
    with pytest.raises(CellsegError, match=r"^tracking.register_model \(--register\) needs tracking.log_model"):
        train(cfg, quiet=True)
    assert mlflow.get_experiment_by_name(tiny_cfg.tracking.experiment) is None  # no run was made
    # a draw weight with a full pass over the images would do nothing: refused as well
    cfg = apply_overrides(tiny_cfg, {"data.bright_weight": 2.0})
    cfg.train.steps_per_epoch = None
    with pytest.raises(CellsegError, match=r"^data.bright_weight 2 needs train.steps_per_epoch \(--steps-per-epoch\)"):
        train(cfg, quiet=True)
    assert mlflow.get_experiment_by_name(tiny_cfg.tracking.experiment) is None


def test_resume_says_when_its_data_moved_or_changed(tracking, tiny_cfg, tiny_data, tmp_path, capsys, monkeypatch):
    import mlflow
    import torch

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    first = train(apply_overrides(tiny_cfg, {"data.path": str(data)}), quiet=True)
    path = first.checkpoint_dir / "last.pt"
    state = load_checkpoint(path)
    state["finished"] = False
    state["config"]["train"]["epochs"] = 3
    torch.save(state, path)
    data.rename(tmp_path / "moved")
    with pytest.raises(CellsegError, match=f"{data}: dataset folder not found: run {first.run_id} trains on this folder "
                                           r"\(recorded in its checkpoint\); put the data back there to resume it$"):
        train(tiny_cfg, resume=first.run_id, quiet=True)
    (tmp_path / "moved").rename(data)
    state["config"]["data"]["path"] = "data"  # typed relative to tmp_path: resumed from another folder, still found
    torch.save(state, path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    image = sorted((data / "images").iterdir())[0]
    image.write_bytes(sorted((data / "images").iterdir())[1].read_bytes())  # one image replaced
    capsys.readouterr()
    assert train(tiny_cfg, resume=first.run_id, quiet=True).last_epoch == 3
    old = state["dataset_hash"]
    assert f"note: {data} changed since run {first.run_id} began (data hash {old}, now " in capsys.readouterr().err
    assert mlflow.get_run(first.run_id).data.tags["dataset.hash"] == old

    # a checkpoint from before checkpoints held the hash: the run's tag still tells the data changed
    for epochs in (4, 5):
        state = load_checkpoint(path)
        del state["dataset_hash"]
        state["finished"] = False
        state["config"]["train"]["epochs"] = epochs
        torch.save(state, path)
        if epochs == 5:  # and with no tag either: said, and tagged with the data as it is now
            mlflow.tracking.MlflowClient().delete_tag(first.run_id, "dataset.hash")
        assert train(tiny_cfg, resume=first.run_id, quiet=True).last_epoch == epochs
        err = capsys.readouterr().err
        if epochs == 4:
            assert f"note: {data} changed since run {first.run_id} began (data hash {old}, now " in err
        else:
            now = mlflow.get_run(first.run_id).data.tags["dataset.hash"]
            assert now != old
            assert f"note: run {first.run_id} recorded no hash of its data, so whether {data} changed since it began " \
                   f"cannot be checked; it is tagged with the data as it is now (dataset.hash {now})" in err


def test_unwritable_checkpoint_dir_fails_before_a_run_exists(tracking, tiny_cfg, tmp_path):
    import mlflow

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = apply_overrides(tiny_cfg, {"train.checkpoint_dir": str(blocker / "ckpt")})
    with pytest.raises(CellsegError, match=f"train.checkpoint_dir {blocker / 'ckpt'}: cannot write checkpoints there "
                                           rf"\({blocker} is a file, not a folder\)$"):
        train(cfg, quiet=True)
    assert mlflow.get_experiment_by_name(tiny_cfg.tracking.experiment) is None  # no run, not even a FAILED one


def test_a_child_run_stays_in_its_parents_experiment(tracking, tiny_cfg):
    import mlflow

    mlflow.set_experiment("parent-exp")
    with mlflow.start_run() as parent:
        result = train(tiny_cfg, quiet=True)  # the config names another experiment
    child = mlflow.get_run(result.run_id)
    assert child.info.experiment_id == parent.info.experiment_id
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.params["tracking.experiment"] == "parent-exp"  # where it really is


def test_under_mlflow_run_the_launched_experiment_is_checked(tracking, monkeypatch):
    import mlflow

    from cellseg import tracking as tr

    mlflow.set_experiment("launched")
    with mlflow.start_run() as run:
        pass
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    assert tr.launched_experiment() == "launched"
    tr.check_launched_experiment("launched")
    with pytest.raises(CellsegError, match="experiment 'other': `mlflow run` made this run in experiment 'launched'.*--experiment-name other"):
        tr.check_launched_experiment("other")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    with pytest.raises(CellsegError, match=f"MLFLOW_RUN_ID {'0' * 32}: not a run of"):
        tr.launched_experiment()
    monkeypatch.delenv("MLFLOW_RUN_ID")
    assert tr.launched_experiment("anything") is None


def test_training_lock_refuses_a_second_holder_in_this_process_and_checks_read_only_folders(tmp_path, monkeypatch):
    """A POSIX lock does not exclude its own process, so a second training of the same folder in
    one process is refused by name; a folder this user cannot write still shows a holder."""
    import cellseg.checkpoint
    from cellseg.checkpoint import training_lock

    with training_lock(tmp_path, "first"):
        with pytest.raises(CellsegError, match="already being trained by this process"):
            with training_lock(tmp_path, "second"):
                pass
    holder = _lock_holder(tmp_path)  # the first lock was released on leaving it: another process takes it
    try:
        real_open = os.open

        def read_only(path, flags, *a):  # as in a folder of another user (root ignores real permissions)
            if flags & (os.O_RDWR | os.O_WRONLY):
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, flags, *a)

        monkeypatch.setattr(cellseg.checkpoint.os, "open", read_only)
        with pytest.raises(CellsegError, match=f"still being trained by pid {holder.pid} "):
            with training_lock(tmp_path, "read-only"):
                pass
        (tmp_path / "empty").mkdir()
        with training_lock(tmp_path / "empty", "no lock file"):
            pass  # no lock file and none can be made: nothing to check, training goes on
        monkeypatch.undo()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with training_lock(tmp_path, "after"):  # the holder is gone
        pass


def test_resume_names_the_store_it_searched_and_makes_none(tracking, tiny_cfg, tmp_path, monkeypatch):
    """--resume from the wrong folder: the error names the store; no empty mlflow.db is left there."""
    import mlflow

    MlflowClient().search_experiments()  # the session's store exists
    with pytest.raises(CellsegError, match=f"--resume 3fcbdada: no such MLflow run in {tracking} "):
        train(tiny_cfg, resume="3fcbdada", quiet=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    try:
        with pytest.raises(CellsegError, match=f"no MLflow store at {elsewhere / 'mlflow.db'} .*where run 3fcbdada was trained"):
            train(tiny_cfg, resume="3fcbdada", quiet=True)
    finally:
        mlflow.set_tracking_uri(tracking)
    assert list(elsewhere.iterdir()) == []


def test_train_register_says_what_it_registered(tracking, tiny_cfg, capsys):
    """--register prints what `cellseg register` does: the champion it replaced and, for a PyTorch
    version, how to make the servable ONNX one (it moved @champion off a pyfunc version silently)."""
    cfg = apply_overrides(tiny_cfg, {"train.epochs": 1, "train.steps_per_epoch": 1, "tracking.register_model": True,
                                     "tracking.model_name": "reg-notes"})
    train(cfg, quiet=True)
    err = capsys.readouterr().err
    assert "champion: version" not in err and "note: this version is the PyTorch model" in err  # the first version
    second = train(cfg, quiet=True)
    err = capsys.readouterr().err
    version = MlflowClient().get_model_version_by_alias("reg-notes", "champion").version
    assert f"champion: version {int(version) - 1} -> {version} (val_map " in err and second.run_id


def test_resume_takes_data_dir_only_when_it_is_the_runs_own(tracking, tiny_cfg, tiny_data, tmp_path):
    """`torchrun ... train DATA --resume RUN` (the first command, with --resume added): the same folder
    is accepted (it was refused: 'DATA_DIR cannot change'); another folder is refused."""
    import torch

    first = train(tiny_cfg, quiet=True)
    path = first.checkpoint_dir / "last.pt"
    state = load_checkpoint(path)
    state["finished"] = False
    state["config"]["train"]["epochs"] = 3
    torch.save(state, path)
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    with pytest.raises(CellsegError, match=f"^{other}: run {first.run_id} trains on {tiny_data} \\(recorded in its checkpoint\\)"):
        train(tiny_cfg, data_dir=str(other), resume=first.run_id, quiet=True)
    assert train(tiny_cfg, data_dir=str(tiny_data), resume=first.run_id, quiet=True).last_epoch == 3

    # a run given its folder beside the config (as the pipelines do: data.path unset) resumes on that folder
    loose = tiny_cfg.model_copy(deep=True)
    loose.data.path = None
    second = train(loose, data_dir=str(other), quiet=True)
    path = second.checkpoint_dir / "last.pt"
    state = load_checkpoint(path)
    assert state["config"]["data"]["path"] is None
    state["finished"] = False
    state["config"]["train"]["epochs"] = 3
    torch.save(state, path)
    assert train(loose, data_dir=str(other), resume=second.run_id, quiet=True).last_epoch == 3  # (it said "synthetic")
    import mlflow

    assert mlflow.get_run(second.run_id).data.tags["dataset.path"] == str(other)
