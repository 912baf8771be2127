"""The training loop: one file, single process or DDP under torchrun, tracked in MLflow.

`train(cfg)` is everything `cellseg train` does. Only rank 0 talks to MLflow and writes
checkpoints; decisions that must be global (curriculum switch, early stopping, a Ctrl-C)
are taken from metrics every rank shares.

Data-parallel training on one machine (gloo on CPU, NCCL on CUDA, one process per GPU):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m cellseg train DATA --config cfg.yaml

(`mlflow run . -e train_ddp -P nproc=2` does the same.) Set OMP_NUM_THREADS yourself, to about
cores / nproc: torchrun otherwise sets it to 1 for every process and prints a warning saying so.
`train.batch_size` is per process (an effective batch of batch_size x nproc), and so is
`train.steps_per_epoch` (each process takes that many steps, on different images).
Under DDP:

- rank 0 alone sets up MLflow, creates (or reopens, with --resume) the one run of the job,
  validates, logs and writes checkpoints; the other ranks never call MLflow and print nothing.
  A failure in rank 0's share of the work becomes an error on every rank, so none hangs.
- --resume RUN_ID: rank 0 reads the run's last.pt and broadcasts it; every rank starts from it.
- validation metrics, the Ctrl-C flag (all-reduced every step and at every epoch end) and so
  the curriculum stage, early stopping and the learning rate (a function of the epoch) are the
  same on every rank, so all ranks run the same epochs and stop together.
- at the end every rank hashes its parameters; they must agree (else CellsegError) and rank 0
  logs the hash as the `ddp.param_checksum` tag.
- checkpoints hold the bare network's weights (no `module.` prefix): they load in a single
  process, in `cellseg export`, or in a DDP run of any world size. With train.ema_decay the
  moving average is "model" (validated, exported) and the raw weights are "train_model"; only
  rank 0, which validates and saves, keeps the average (of the weights every rank shares) and
  recomputes its BatchNorm statistics.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from cellseg import distributed as dist
from cellseg import tracking
from cellseg.checkpoint import load_checkpoint, save_checkpoint, training_lock, unwrap_state_dict
from cellseg.config import Config, DataConfig, to_yaml, validate_config
from cellseg.data.dataset import TrainDataset, class_weights_for, dataset_hash, load_split, quadrants
from cellseg.data.io import make_writable_folder
from cellseg.errors import CellsegError
from cellseg.loss import weighted_cross_entropy
from cellseg.model import build_model
from cellseg.schedule import Curriculum, EarlyStopping, learning_rate
from cellseg.validate import prepare, validate

CHECKPOINT_TAG = "cellseg.checkpoint_dir"
# seconds slept after each step: lets the interruption tests kill a tiny run mid-epoch
_STEP_DELAY = float(os.environ.get("CELLSEG_DEBUG_STEP_DELAY", "0") or 0)


@dataclass
class TrainResult:
    """What a training run did. Under DDP only rank 0 has a `run_id` (None on the other ranks)."""

    run_id: str | None
    status: str  # FINISHED or KILLED
    best_epoch: int
    best_score: float
    last_epoch: int
    checkpoint_dir: Path
    history: list[dict] = field(default_factory=list)
    model_uri: str | None = None
    metric: str = "val_iou"  # early_stopping.metric of the run's config: what best_score is


def interruption_note(run_id: str, status: str | None, cfg: Config, checkpoint: Path | None = None) -> str:
    """What an interrupted `cellseg train` says: how the run ended and the command that goes on from
    there (with the store's --tracking-uri unless it is the default). `cfg`: the run's configuration
    (a resumed run's comes from its checkpoint: KeyboardInterrupt.run_config). `checkpoint`: the run's
    last.pt (KeyboardInterrupt.run_checkpoint); when it was never written there is nothing to resume."""
    uri = tracking.uri_option()
    if checkpoint is not None and status != "FINISHED" and not Path(checkpoint).is_file():
        return (f"interrupted: MLflow run {run_id} ended {status or 'KILLED'} before its first epoch finished, "
                "so there is nothing to resume; start a new run")
    if status == "FINISHED":  # interrupted after the run ended (while registering it)
        if not (cfg.tracking.register_model and cfg.tracking.log_model):
            return f"interrupted: MLflow run {run_id} had ended FINISHED"
        return (f"interrupted: MLflow run {run_id} had ended FINISHED; its registration was cut short: "
                f"`cellseg register --run-id {run_id}{tracking.name_option(cfg.tracking.model_name)}{uri}` "
                "registers it and makes it the champion")
    return f"interrupted: MLflow run {run_id} ended {status or 'KILLED'}; continue it with `cellseg train --resume {run_id}{uri}`"


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CellsegError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    return torch.device(name)


def resolve_data_dir(cfg: Config, data_dir: str | None) -> Path:
    """The dataset folder: the argument, the config, or the embedded synthetic dataset."""
    path = data_dir or cfg.data.path
    if path:
        return Path(path).expanduser().resolve()
    from cellseg.data.synth import ensure_default_dataset

    return ensure_default_dataset(n=cfg.data.synth_n, size=cfg.data.synth_size, seed=0)


def _auto_workers(requested: int) -> int:
    """DataLoader workers: the request, or (-1) up to 4 from this process's share of the cores."""
    if requested >= 0:
        return requested
    return max(0, min(4, (os.cpu_count() or 1) // dist.local_world_size() - 1))


WORKER_GRACE_S = 10  # a DataLoader worker outlives a SIGTERM by this long (see _own_process_group)


def _exit_after_grace(signum, frame):
    """A worker's SIGTERM: exit (SIGALRM's default action) WORKER_GRACE_S seconds later, unless the
    trainer has stopped the worker by then; a later SIGTERM does not postpone it."""
    pending = signal.alarm(WORKER_GRACE_S)
    if pending:
        signal.alarm(pending)


def _stop_workers(batches) -> None:
    """Shut an epoch's DataLoader workers down now, SIGKILLing any that torch's shutdown leaves
    alive (it asks, waits 5 s, terminate()s, waits 5 s more, per worker): one stuck in C code never
    runs its SIGTERM handler, and Python's exit would wait for it forever. A Ctrl-C meanwhile
    kills them at once."""
    workers = list(getattr(batches, "_workers", ()))  # torch's multiprocessing iterator (none with 0 workers)
    if not workers:
        return
    try:
        batches._shutdown_workers()
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _own_process_group(_worker_id: int) -> None:
    """DataLoader worker init: leave the trainer's process group, ignore SIGINT and outlive a
    SIGTERM by WORKER_GRACE_S, so a stop request sent to the whole group (`timeout`, torchrun,
    Ctrl-C) or to every process (Slurm's job end, scancel, preemption) stops the trainer first: it
    ends the epoch and shuts its workers down (a worker killed first would fail the run). The
    grace, not an ignored SIGTERM, so the trainer's own terminate() of a stuck worker still ends
    it. Workers start with both signals blocked (`_workers_start_shielded`): one that came before
    this function is delivered here, to these handlers."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_after_grace)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


@contextmanager
def _workers_start_shielded():
    """SIGINT and SIGTERM blocked in the trainer's main thread while the DataLoader starts its
    workers: they inherit the mask, so a signal in their first milliseconds waits for
    `_own_process_group` instead of killing them. The trainer's own signals are not lost: other
    threads take them, or they are delivered when the mask is restored. (Forked workers, Linux's
    default: a forkserver start method would give workers the server's mask, unshielded.)"""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set())  # the mask as it is
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _StopFlag:
    """First Ctrl-C (SIGINT) or SIGTERM to the trainer or its process group (`kill`, `timeout`,
    torchrun) asks the loop to end the epoch cleanly, so the run ends KILLED, resumable; a second
    one more than a second later interrupts at once. DataLoader workers ignore SIGINT and outlive
    SIGTERM by a grace period (`_own_process_group`), so a signal sent to every process, as Slurm
    does, stops the run the same way."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not in the main thread
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.requested:
            self.requested, self._first = True, now
        elif now - self._first > 1.0:  # GNU timeout signals the command and then its group: one stop
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        self.release()

    def release(self) -> None:
        """Signals act at once again (the handlers from before), e.g. while the run is being finished."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any rank (a collective: every rank must call it)."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def _on_main(fn):
    """`fn()` run by rank 0 alone, its result handed to every rank (a plain call in a single process).

    When rank 0 fails, it re-raises and the other ranks raise a CellsegError naming the failure
    instead of waiting forever in the broadcast.
    """
    if not torch.distributed.is_initialized():
        return fn()
    box = (None, None)
    if dist.is_main():
        try:
            box = (fn(), None)
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, CellsegError) else f"{type(exc).__name__}: {exc}"
            dist.broadcast_object((None, reason or type(exc).__name__))
            raise
    result, error = dist.broadcast_object(box)
    if error is not None:
        raise CellsegError(f"rank {dist.rank()} stops: rank 0 failed ({error})")
    return result


def param_checksum(net: torch.nn.Module) -> str:
    """'sha256=<16 hex> sum=<float64 sum>' of the network's parameters (names, shapes, exact bytes).

    Equal on every DDP rank when the replicas are in sync. Buffers are left out: BatchNorm
    running statistics are each rank's own between DDP's broadcasts (unless SyncBatchNorm).
    """
    h = hashlib.sha256()
    total = 0.0
    with torch.no_grad():
        for name, p in getattr(net, "module", net).named_parameters():
            t = p.detach().cpu().contiguous()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            total += float(t.double().sum())
    return f"sha256={h.hexdigest()[:16]} sum={total:.17g}"


def _check_replicas(net: torch.nn.Module, last_epoch: int, status: str) -> str | None:
    """Under DDP: gather every rank's (last epoch, status, parameter checksum); CellsegError if they differ."""
    if not torch.distributed.is_initialized():
        return None
    mine = {"last_epoch": last_epoch, "status": status, "params": param_checksum(net)}
    everyone = dist.all_gather_object(mine)
    if any(r != everyone[0] for r in everyone):
        listing = "; ".join(f"rank {i}: {r}" for i, r in enumerate(everyone))
        raise CellsegError(f"DDP ranks ended out of sync (a bug; please report it): {listing}")
    return mine["params"]


def _load_resume_state(run_id: str, locks: ExitStack) -> tuple[dict, Path]:
    """The checkpoint of run `run_id` and its folder, whose training lock `locks` then holds."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        import mlflow

        raise CellsegError(f"--resume {run_id}: no such MLflow run in {tracking.absolute_uri(mlflow.get_tracking_uri())} "
                           f"({str(exc).splitlines()[0]})") from None
    ckpt_dir = run.data.tags.get(CHECKPOINT_TAG)
    if not ckpt_dir:
        raise CellsegError(f"--resume {run_id}: the run has no cellseg checkpoint (tag {CHECKPOINT_TAG} missing)")
    if Path(ckpt_dir).is_dir():  # else load_checkpoint says what is missing
        locks.enter_context(training_lock(ckpt_dir, f"--resume {run_id}"))
    state = load_checkpoint(Path(ckpt_dir) / "last.pt")
    if state.get("finished") and run.info.status == "FINISHED":
        raise CellsegError(f"--resume {run_id}: the run already finished at epoch {state['epoch']}")
    data = state.get("config", {}).get("data", {})
    started_on = run.data.tags.get("dataset.path")  # absolute, where the run began
    if data.get("path") and not os.path.isabs(os.path.expanduser(data["path"])) and started_on:
        data["path"] = started_on  # a relative path was typed in another folder than this one, maybe
    if not data.get("path") and started_on and not _is_synthetic(started_on, data):
        data["path"] = started_on  # its folder was passed beside the config (pipelines, train(data_dir=...))
    return state, Path(ckpt_dir)


def _is_synthetic(folder: str, data: dict) -> bool:
    """True when `folder` is the built-in synthetic dataset a checkpoint's data config (a dict) draws."""
    from cellseg.data.synth import default_dataset_dir

    defaults = DataConfig()
    synthetic = default_dataset_dir(int(data.get("synth_n", defaults.synth_n)), data.get("synth_size", defaults.synth_size), 0)
    return Path(folder).resolve() == synthetic.resolve()


def train(
    cfg: Config,
    data_dir: str | None = None,
    resume: str | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Train a U-Net as configured; returns the run id, best epoch and score.

    Raises CellsegError for bad data, configuration or an unreachable tracking server.
    """
    if resume is not None and not resume.strip():  # `--resume $RUN_ID` with RUN_ID unset: not a new run
        raise CellsegError("--resume: empty run id (pass the id of the MLflow run to continue)")
    if resume is None and cfg.tracking.register_model and not cfg.tracking.log_model:
        # (checked for new runs only: a checkpoint of an older run may hold this pair and must still load)
        raise CellsegError("tracking.register_model (--register) needs tracking.log_model: the registered version is the logged model")
    if resume is None and cfg.data.bright_weight != 1 and cfg.train.steps_per_epoch is None:
        raise CellsegError(f"data.bright_weight {cfg.data.bright_weight:g} needs train.steps_per_epoch (--steps-per-epoch): "
                           "a full pass draws every image once, whatever its weight")
    device = resolve_device(cfg.train.device)
    distributed = dist.init(device.type)
    if distributed and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank())
        torch.cuda.set_device(device)
    main = dist.is_main()
    world = dist.world_size()
    # matplotlib's C extensions load now, not at the end of an interrupted run: a second Ctrl-C
    # during their first import (logging the curves) aborted the interpreter ("Fatal Python error")
    from cellseg.plots import preload

    preload()

    try:
        # a Ctrl-C from here on only sets a flag, acted on between steps (in an epoch: at its end):
        # raised at once, it could land in a garbage-collection callback, be ignored, and training ran on
        with tracking.sigterm_interrupts(), _StopFlag() as stop, ExitStack() as locks:
            return _train(cfg, data_dir, resume, quiet, device, main, world, locks, stop)
    except BaseException as exc:
        if distributed:
            # the traceback would keep _fit's DDP module, hence the process group, alive past cleanup()
            traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        dist.cleanup()


def _check_sync_batchnorm(cfg: Config, device: torch.device, world: int) -> None:
    """train.sync_batchnorm under DDP needs CUDA: on CPU torch refuses it (DistributedDataParallel raises
    "SyncBatchNorm layers only work with GPU modules"). Fail before a run is created, on every rank,
    rather than after, or than silently train with per-process BatchNorm. (A single process ignores it.)"""
    if world > 1 and cfg.train.sync_batchnorm and device.type != "cuda":
        raise CellsegError(
            f"train.sync_batchnorm: SyncBatchNorm needs CUDA; torch {torch.__version__} does not run it on "
            f"{device.type} (gloo). Set train.sync_batchnorm to false for CPU training"
        )


def _train(cfg, data_dir, resume, quiet, device, main, world, locks, stop) -> TrainResult:
    _check_sync_batchnorm(cfg, device, world)

    def check_stop() -> None:  # every rank calls it at the same points
        if _any_rank(stop.requested, device):
            raise KeyboardInterrupt

    def setup():  # rank 0 only: the other ranks never talk to MLflow
        if resume:  # a lookup: not in a new, empty store made in the wrong folder
            tracking.check_store_exists(tracking.resolve_tracking_uri(cfg.tracking.uri), f"run {resume} was trained")
        tracking.setup(cfg.tracking.uri)
        return _load_resume_state(resume, locks) if resume else (None, None)

    resume_state, ckpt_dir = _on_main(setup)
    check_stop()
    if resume:
        cfg = validate_config(resume_state["config"], f"checkpoint of run {resume}")
        recorded = resolve_data_dir(cfg, None) if cfg.data.path else None  # (not generating the synthetic set)
        if data_dir is not None and resolve_data_dir(cfg, data_dir) != recorded:  # the same folder may be named again
            raise CellsegError(f"{data_dir}: run {resume} trains on {recorded or 'the built-in synthetic dataset'} (recorded in "
                               "its checkpoint); resume it there (leave DATA_DIR out), or start a new run on this folder")
    _check_sync_batchnorm(cfg, device, world)

    torch.manual_seed(cfg.train.seed)
    if world > 1:
        _on_main(lambda: resolve_data_dir(cfg, data_dir))  # the synthetic default is generated once
    root = resolve_data_dir(cfg, data_dir)
    try:
        train_samples, val_samples = load_split(cfg, root)
    except CellsegError as exc:
        if resume and not root.is_dir():
            raise CellsegError(f"{exc}: run {resume} trains on this folder (recorded in its checkpoint); "
                               "put the data back there to resume it") from None
        raise
    if cfg.train.tiles == 4:
        train_samples = [q for s in train_samples for q in quadrants(s)]
    if len(train_samples) < cfg.train.batch_size * world and not cfg.train.steps_per_epoch:
        raise CellsegError(
            f"{root}: {len(train_samples)} training images (after the validation split) is smaller than one batch "
            f"of {cfg.train.batch_size}{' x ' + str(world) + ' processes' if world > 1 else ''}; "
            "add images, lower --batch-size, or set train.steps_per_epoch"
        )
    class_weights = class_weights_for(train_samples, cfg)  # None unless targets.class_balance is "dataset"
    val_items = prepare(val_samples[: cfg.train.val_steps] if cfg.train.val_steps else val_samples, cfg.targets, class_weights)
    check_stop()

    def start_run():  # rank 0 only
        import mlflow

        if resume:
            now = dataset_hash(root)  # before the run is RUNNING again
            run = mlflow.get_run(resume)
            # checkpoints older than the dataset_hash key: the run's tag holds the hash it began with
            recorded = resume_state.get("dataset_hash") or run.data.tags.get(tracking.DATASET_HASH_TAG)
            if not recorded:
                print(f"note: run {resume} recorded no hash of its data, so whether {root} changed since it began "
                      f"cannot be checked; it is tagged with the data as it is now (dataset.hash {now})", file=sys.stderr)
            elif now != recorded:
                print(f"note: {root} changed since run {resume} began (data hash {recorded}, now {now}); training goes "
                      f"on with the files as they are, and the run keeps its dataset.hash tag {recorded}", file=sys.stderr)
            mlflow.set_experiment(experiment_id=run.info.experiment_id)
            mlflow.start_run(run_id=resume)
            if not recorded:
                mlflow.set_tag(tracking.DATASET_HASH_TAG, now)
            return resume, ckpt_dir, recorded or now
        _check_checkpoint_dir(cfg.train.checkpoint_dir)  # before a run exists that would end FAILED
        parent = mlflow.active_run()
        if os.environ.get("MLFLOW_RUN_ID") and parent is None:
            # launched by `mlflow run`, which already made the run (and chose the experiment)
            run = mlflow.start_run()
        elif parent is not None:
            # inside a pipeline's parent run: a nested child run in the parent's experiment
            run = mlflow.start_run(run_name=cfg.tracking.run_name, nested=True, experiment_id=parent.info.experiment_id)
        else:
            mlflow.set_experiment(cfg.tracking.experiment)
            run = mlflow.start_run(run_name=cfg.tracking.run_name)
        try:
            new_dir = Path(cfg.train.checkpoint_dir).expanduser().resolve() / run.info.run_id
            new_dir.mkdir(parents=True, exist_ok=True)
            locks.enter_context(training_lock(new_dir, f"run {run.info.run_id}"))  # a --resume now is refused
            params = _flat_params(cfg, world)
            params["tracking.experiment"] = tracking.experiment_of(run.info.run_id)  # where the run really is
            if class_weights is not None:  # targets.class_balance "dataset": the w_c it trains with
                params["targets.class_weights"] = ", ".join(f"{w:.4g}" for w in class_weights)
            mlflow.log_params(params)
            data_hash = dataset_hash(root)
            mlflow.set_tags({**tracking.run_tags(str(root), data_hash), CHECKPOINT_TAG: str(new_dir)})
            tracking.log_text_artifact(to_yaml(cfg), "config.yaml")
        except BaseException as exc:
            tracking.end_run(_end_status(exc))
            raise
        return run.info.run_id, new_dir, data_hash

    run_id, ckpt_dir, data_hash = _on_main(start_run)
    try:
        check_stop()
        return _fit(cfg, train_samples, val_items, device, run_id, ckpt_dir, resume_state, quiet, stop, data_hash, class_weights)
    except BaseException as exc:
        if main:
            import mlflow

            if mlflow.active_run() and mlflow.active_run().info.run_id == run_id:
                exc.run_status = _end_status(exc)
                tracking.end_run(exc.run_status)
            if isinstance(exc, KeyboardInterrupt):  # for the CLI's message (run_status: set where the run ended)
                exc.run_id, exc.run_config, exc.run_checkpoint = run_id, cfg, Path(ckpt_dir) / "last.pt"
        raise


def _end_status(exc: BaseException) -> str:
    """MLflow status of a run that `exc` ended: KILLED when interrupted (Ctrl-C, SIGTERM), else FAILED."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


def _check_checkpoint_dir(folder: str) -> None:
    """CellsegError naming train.checkpoint_dir when it cannot be created or written."""
    try:
        make_writable_folder(Path(folder).expanduser())
    except OSError as exc:
        path = Path(folder).expanduser()
        blocker = next((p for p in (path, *path.parents) if os.path.exists(p) and not os.path.isdir(p)), None)  # (never raise)
        why = f"{blocker} is a file, not a folder" if blocker is not None else (exc.strerror or type(exc).__name__)
        raise CellsegError(f"train.checkpoint_dir {folder}: cannot write checkpoints there ({why})") from None


def _flat_params(cfg: Config, world: int) -> dict[str, str]:
    from cellseg.config import flatten

    params = flatten(cfg)
    params["train.world_size"] = str(world)
    return params


def _fit(cfg, train_samples, val_items, device, run_id, ckpt_dir, resume_state, quiet, stop, data_hash=None, class_weights=None) -> TrainResult:
    from cellseg.progress import EpochProgress

    main = dist.is_main()
    world = dist.world_size()
    if main:
        import mlflow
    net = build_model(cfg.model).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate(cfg.schedule, 1), weight_decay=cfg.train.weight_decay)
    curriculum, stopper = Curriculum(cfg.curriculum), EarlyStopping(cfg.early_stopping)
    history: list[dict] = []
    start_epoch = 1
    # only rank 0 validates, checkpoints and exports: the other ranks keep no average
    ema = _ema_model(net, cfg.train.ema_decay) if main else None
    if resume_state is not None:
        net.load_state_dict(resume_state.get("train_model", resume_state["model"]))
        if ema is not None and "ema" in resume_state:
            ema.load_state_dict(resume_state["ema"])
        optimizer.load_state_dict(resume_state["optimizer"])
        curriculum.load_state_dict(resume_state["curriculum"])
        stopper.load_state_dict(resume_state["early_stopping"])
        history = list(resume_state["history"])
        torch.set_rng_state(resume_state["torch_rng"])
        start_epoch = int(resume_state["epoch"]) + 1
        if main:
            _log_missing_steps(run_id, history)
    if world > 1:
        # train.sync_batchnorm is off by default: each process normalises over its own batch of
        # train.batch_size images, the batch a single-process run of the same config sees, so DDP keeps
        # the single-process BatchNorm statistics at no communication cost. SyncBatchNorm (CUDA only,
        # see _check_sync_batchnorm) normalises over batch_size x world images at the price of a
        # collective per BN layer in every forward and backward: worth it when a GPU holds 1-2 images.
        if cfg.train.sync_batchnorm:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    bare = net.module if world > 1 else net
    scored = ema.module if ema is not None else bare  # the weights validated, checkpointed and exported

    use_amp = cfg.train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    dataset = TrainDataset(train_samples, cfg, seed=cfg.train.seed, class_weights=class_weights)  # computed once, in _train
    per_epoch = (cfg.train.steps_per_epoch * cfg.train.batch_size * world) if cfg.train.steps_per_epoch else None
    dataset.set_epoch(start_epoch, curriculum.elastic, per_epoch)
    sampler = DistributedSampler(dataset, shuffle=False, drop_last=True) if world > 1 else None
    workers = _auto_workers(cfg.train.workers)
    loader_kwargs = dict(
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        drop_last=len(dataset) // world >= 2 * cfg.train.batch_size,
        pin_memory=device.type == "cuda",
        worker_init_fn=_own_process_group if workers else None,
    )
    progress = EpochProgress(enabled=main and not quiet)
    status, last_epoch, epoch = "FINISHED", start_epoch - 1, start_epoch - 1
    stopped = False
    # a run whose training ended but whose finishing step (final model, registration) was cut short
    # resumes with that step alone
    final_epoch = start_epoch - 1 if resume_state is not None and resume_state.get("finished") else cfg.train.epochs
    with progress:
        for epoch in range(start_epoch, final_epoch + 1):
            lr = learning_rate(cfg.schedule, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            dataset.set_epoch(epoch, curriculum.elastic, per_epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = DataLoader(dataset, **loader_kwargs)
            net.train()
            t0 = time.perf_counter()
            losses, n_images, data_s = [], 0, 0.0
            task = progress.start(epoch, cfg.train.epochs, len(loader))
            t_data = time.perf_counter()
            with _workers_start_shielded():
                batches = iter(loader)
            try:
                for image, target, weight in batches:
                    data_s += time.perf_counter() - t_data
                    image, target, weight = image.to(device), target.to(device), weight.to(device)
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        loss = weighted_cross_entropy(net(image), target, weight)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    if ema is not None:
                        ema.update_parameters(bare)
                    losses.append(float(loss.detach()))
                    n_images += image.shape[0]
                    progress.advance(task, losses[-1])
                    if _STEP_DELAY:
                        time.sleep(_STEP_DELAY)
                    if _any_rank(stop.requested, device):
                        stop.requested = True
                        break
                    t_data = time.perf_counter()
            finally:
                _stop_workers(batches)
            train_loss = dist.all_reduce_mean(float(np.mean(losses)) if losses else float("nan"), device)
            seconds = time.perf_counter() - t0

            if main and ema is not None:
                _refresh_batchnorm(scored, dataset, cfg.train.batch_size, device)
            metrics, shown = (validate(scored, val_items, device, cfg.train.tiles, postprocess=cfg.postprocess.model_dump()) if main else ({}, []))
            metrics.update(
                epoch=epoch,
                train_loss=train_loss,
                lr=lr,
                curriculum_stage=curriculum.stage,
                epoch_seconds=seconds,
                train_images_per_s=n_images * world / max(seconds, 1e-9),
                data_wait_fraction=data_s / max(seconds, 1e-9),
            )
            # rank 0's metrics everywhere: every rank takes the same curriculum and stopping decisions
            metrics = dist.broadcast_object(metrics)
            # a Ctrl-C that reached some rank after its last step (e.g. during validation) counts everywhere
            stop.requested = _any_rank(stop.requested, device)
            switched = curriculum.update(epoch, metrics)
            is_best, should_stop = stopper.update(epoch, metrics)
            history.append(metrics)
            last_epoch = epoch
            finished = should_stop or epoch == cfg.train.epochs  # training is over, even if a stop came during the epoch
            stopped = finished or stop.requested
            if main:
                state = _state(bare, optimizer, curriculum, stopper, history, cfg, epoch, run_id,
                               finished=finished, ema=ema, data_hash=data_hash)
                save_checkpoint(ckpt_dir / "last.pt", state)
                if is_best:
                    save_checkpoint(ckpt_dir / "best.pt", state)
                mlflow.log_metrics({k: float(v) for k, v in metrics.items() if k != "epoch"}, step=epoch)
                if switched:
                    mlflow.set_tag("curriculum.switch_epoch", str(epoch))
                if epoch % cfg.train.overlay_every == 0 and shown:
                    _log_overlay(shown, f"overlays/epoch_{epoch:04d}.png", f"epoch {epoch}")
                progress.epoch_done(metrics, is_best, switched)
            if should_stop and main:
                mlflow.set_tag("early_stopping.epoch", str(epoch))
            if stop.requested and not finished:
                status = "KILLED"
            if stopped:
                break
    stop.release()  # training is over: a Ctrl-C while the final model is logged or registered interrupts at once

    checksum = _check_replicas(bare, last_epoch, status)
    model_uri = None
    if main:
        if checksum:
            mlflow.set_tag("ddp.param_checksum", checksum)
        model_uri = _finish_run(cfg, ckpt_dir, history, curriculum, stopper, val_items, device, status, run_id)
    dist.barrier()
    return TrainResult(
        run_id=run_id if main else None,
        status=status,
        best_epoch=stopper.best_epoch,
        best_score=stopper.best,
        last_epoch=last_epoch,
        checkpoint_dir=Path(ckpt_dir),
        history=history,
        model_uri=model_uri,
        metric=cfg.early_stopping.metric,
    )


def _ema_model(net: torch.nn.Module, decay: float):
    """An exponential moving average of `net`'s weights (None when decay is 0)."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    # weights only: BatchNorm statistics of averaged weights are recomputed (_refresh_batchnorm), as
    # in SWA; averaged running statistics belong to other weights and mis-scale the activations
    return AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


@torch.no_grad()
def _refresh_batchnorm(net: torch.nn.Module, dataset, batch_size: int, device: torch.device, batches: int = 16) -> None:
    """Recompute `net`'s BatchNorm running statistics as the plain average over `batches` training
    batches (the first items of this epoch's dataset, augmented as in training): SWA's `update_bn`."""
    from torch.optim.swa_utils import update_bn

    n = min(len(dataset), batches * batch_size)
    if n == 0:  # update_bn would reset the statistics and measure nothing
        return
    crops = (
        torch.from_numpy(np.stack([dataset.augmented_crop(i)[0] for i in range(start, min(start + batch_size, n))]).astype(np.float32))[:, None]
        for start in range(0, n, batch_size)
    )
    update_bn(crops, net, device)


def _state(net, optimizer, curriculum, stopper, history, cfg, epoch, run_id, finished, ema=None, data_hash=None) -> dict:
    """A checkpoint. "model" holds the weights that were validated (the moving average when
    train.ema_decay is on, then "train_model" and "ema" hold what resuming needs);
    "dataset_hash" identifies the training data (carried into exported models)."""
    extra = {}
    if ema is not None:
        extra = {"train_model": unwrap_state_dict(net.state_dict()), "ema": ema.state_dict()}
        net = ema.module
    return {
        **extra,
        "model": unwrap_state_dict(net.state_dict()),
        "optimizer": optimizer.state_dict(),
        "curriculum": curriculum.state_dict(),
        "early_stopping": stopper.state_dict(),
        "history": history,
        "config": cfg.model_dump(),
        "epoch": epoch,
        "run_id": run_id,
        "dataset_hash": data_hash,
        "finished": finished,
        "torch_rng": torch.get_rng_state(),
        "cellseg_version": __import__("cellseg").__version__,
    }


def _log_missing_steps(run_id: str, history: list[dict]) -> None:
    """Metrics of checkpointed epochs that a kill kept from reaching MLflow."""
    import mlflow

    from cellseg.tracking import logged_metric_steps

    done = logged_metric_steps(run_id, "train_loss")
    for h in history:
        if h["epoch"] not in done:
            mlflow.log_metrics({k: float(v) for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))


def _log_overlay(shown, artifact_name: str, title: str) -> None:
    import mlflow

    from cellseg.plots import validation_overlay

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / Path(artifact_name).name
        validation_overlay(shown, str(p), title)
        mlflow.log_artifact(str(p), str(Path(artifact_name).parent))


def _finish_run(cfg, ckpt_dir, history, curriculum, stopper, val_items, device, status, run_id) -> str | None:
    """Curves, best-epoch overlay, best checkpoint and the logged PyTorch model; ends the run.

    The best weights go into a fresh plain network (never the training one: under DDP that could
    hold SyncBatchNorm layers, and it must stay equal on every rank).
    """
    import mlflow

    from cellseg.plots import learning_curves

    with tempfile.TemporaryDirectory() as d:
        curves = Path(d) / "progress.png"
        learning_curves(history, str(curves), curriculum.switch_epoch)
        mlflow.log_artifact(str(curves), "plots")
    best_path = ckpt_dir / "best.pt"
    model_uri = None
    if best_path.exists():
        best = load_checkpoint(best_path)
        net = build_model(cfg.model).to(device)
        net.load_state_dict(best["model"])
        mlflow.log_artifact(str(best_path), "checkpoints")
        _, shown = validate(net, val_items[:3], device, cfg.train.tiles, postprocess=cfg.postprocess.model_dump())
        if shown:
            _log_overlay(shown, f"overlays/best_epoch_{best['epoch']:04d}.png", f"best epoch {best['epoch']}")
        mlflow.set_tags({"best.epoch": str(stopper.best_epoch), f"best.{cfg.early_stopping.metric}": f"{stopper.best:.4f}"})
        if cfg.tracking.log_model:
            model_uri = log_torch_model(net.cpu().eval(), cfg)
    try:
        tracking.end_run(status, deliver=True)  # an interrupt meanwhile is raised after the run is ended
        if cfg.tracking.register_model and model_uri and status == "FINISHED":
            from cellseg import registry

            before = registry.current_champion(cfg.tracking.model_name)
            mv = registry.register_run(run_id, cfg.tracking.model_name)
            for line in registry.registration_notes(before, mv):  # as `cellseg register` says them
                print(line, file=sys.stderr)
    except BaseException as exc:
        exc.run_status = status  # the run had ended so
        raise
    return model_uri


def log_torch_model(net: torch.nn.Module, cfg: Config) -> str:
    """Log the network with mlflow.pytorch (signature + input example) under the artifact name 'model'."""
    import mlflow
    from mlflow.models import infer_signature

    from cellseg.tracking import pip_requirements

    example = np.zeros((2, cfg.model.in_channels, 64, 64), dtype=np.float32)
    with torch.no_grad():
        out = net(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, out)
    with tracking.failed_if_interrupted():
        info = mlflow.pytorch.log_model(
            net,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
        )
    return info.model_uri
