"""The MLflow Model Registry side of cellseg: best runs, registered versions, aliases, attached ONNX.

One registered model (default name `cellseg-unet`) holds every promoted training run. Its
versions are found by alias, never by stage; `champion` is the one served and used by
`cellseg predict --model onnx`. A version is one of two flavours (version tag `cellseg.flavor`):

* `pyfunc`: `cellseg.serving.CellsegPyfunc` around the run's exported ONNX; predicts instance
  labels, so `mlflow models serve -m models:/cellseg-unet@champion` serves labels. Registered
  whenever the run has an ONNX model attached (`attach_onnx`).
* `pytorch`: the run's logged PyTorch model (logits); registered only while no ONNX exists
  (e.g. by `cellseg train --register`). Attaching an ONNX later and calling `register_run`
  again adds a pyfunc version and moves the alias to it.

Registering the same model of the same run again reuses its version (and moves the alias back
to it) rather than adding a duplicate; attaching the bytes of the run's current ONNX again logs nothing new.

Every version is tagged with what inference and audits need: `run_id`, `dataset.hash`,
`best.<metric>` (best value over the epochs, not the last), `best.epoch`, `torch_model_uri`,
and, once an ONNX is attached, `onnx_model_uri` (the logged `mlflow.onnx` model) and
`onnx_artifact` (the plain .onnx file as a run artifact, what `champion_onnx` downloads).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from cellseg.errors import CellsegError, first_line
from cellseg.tracking import DATASET_HASH_TAG

MODEL_NAME = "cellseg-unet"
ALIAS = "champion"
VERSION_METRICS = ("val_iou", "val_seg", "val_map", "val_ap50")
TORCH_MODEL = "model"  # logged-model names given by train.py, attach_onnx and serving.log_pyfunc
ONNX_MODEL = "onnx"
PYFUNC_MODEL = "pyfunc"
ONNX_ARTIFACT_DIR = "onnx"
CHECKPOINT_ARTIFACT = "checkpoints/best.pt"
RUN_ONNX_TAG = "cellseg.onnx_artifact"  # run tag: artifact path of the attached plain .onnx file
RUN_ONNX_URI_TAG = "cellseg.onnx_model_uri"  # run tag: URI of the attached mlflow.onnx model


def lower_is_better(metric: str) -> bool:
    """Losses are minimised; every other cellseg metric (IoU, SEG, mAP, AP50) is maximised."""
    return metric.endswith("loss")


# ------------------------------------------------------------------------------------ connection


def connect(tracking_uri: str | None = None):
    """An MlflowClient for `tracking_uri` (set globally) or the current URI, checked first.

    CellsegError when an http(s) server does not answer or a sqlite store file does not
    exist: reading must not create an empty `mlflow.db` in the working folder.
    """
    import mlflow
    from mlflow import MlflowClient

    from cellseg import tracking

    uri = tracking_uri or mlflow.get_tracking_uri()
    tracking.check_reachable(uri)
    tracking.check_store_exists(uri, "the model was trained")
    if tracking_uri:  # only once checked: a bad URI must not replace a good one
        tracking.setup(tracking_uri)
    return MlflowClient()


@contextlib.contextmanager
def _mlflow_errors(what: str) -> Iterator[None]:
    """Turn MLflow's exceptions into one-line CellsegErrors naming `what` was asked."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise CellsegError(f"{what}: {first_line(exc)}") from None


def get_run(client, run_id: str):
    with _mlflow_errors(f"run {run_id}"):
        return client.get_run(run_id)


def holds_run(client, run_id: str) -> bool:
    """Whether the tracking store holds the run; CellsegError when it cannot tell (a locked database, ...)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise CellsegError(f"run {run_id}: {first_line(exc)}") from None
    return True


def run_dataset_hash(run_id: str, tracking_uri: str | None = None) -> str | None:
    """The run's `dataset.hash` tag (its training data's hash); None when the tag, the run or its
    tracking store is missing."""
    try:
        return get_run(connect(tracking_uri), run_id).data.tags.get(DATASET_HASH_TAG) or None
    except CellsegError:
        return None


# ------------------------------------------------------------------------------------------ runs


def metric_best(client, run_id: str, metric: str) -> float | None:
    """Best value of `metric` over the run's history (max, or min for losses); None if never logged."""
    values = [m.value for m in client.get_metric_history(run_id, metric)]
    values = [v for v in values if v == v]  # NaN epochs never win
    if not values:
        return None
    return min(values) if lower_is_better(metric) else max(values)


def best_metrics(client, run_id: str, metrics=VERSION_METRICS) -> dict[str, float]:
    """{metric: best value over epochs} for those of `metrics` the run logged."""
    out = {}
    for name in metrics:
        value = metric_best(client, run_id, name)
        if value is not None:
            out[name] = value
    return out


def best_run(experiment: str, metric: str = "val_map"):
    """The FINISHED run of `experiment` whose best epoch scored highest on `metric` (lowest for losses).

    The last logged value is the last epoch, not the best, so each run's metric history is
    read. Ties go to the most recent run. CellsegError when the experiment does not exist or
    none of its finished runs logged the metric.
    """
    client = connect()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CellsegError(f"experiment '{experiment}' does not exist in {_uri()}; check the name or the tracking URI")
    if exp.lifecycle_stage == "deleted":
        raise CellsegError(f"experiment '{experiment}' is deleted in {_uri()}; restore it (mlflow experiments restore "
                           f"--experiment-id {exp.experiment_id}) or name another")
    runs, token = [], None
    with _mlflow_errors(f"experiment '{experiment}'"):
        while True:
            page = client.search_runs(
                [exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1000, page_token=token,
                order_by=["attributes.start_time DESC"],
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
    best, best_value = None, None
    for run in runs:
        if metric not in run.data.metrics:  # cheap pre-filter before reading the history
            continue
        value = metric_best(client, run.info.run_id, metric)
        if value is None:
            continue
        better = best_value is None or (value < best_value if lower_is_better(metric) else value > best_value)
        if better:
            best, best_value = run, value
    if best is None:
        raise CellsegError(
            f"experiment '{experiment}': no FINISHED run logged metric '{metric}' "
            f"({len(runs)} finished run(s)); train one or pick another metric"
        )
    return best


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


# ------------------------------------------------------------------------------- logged models


def logged_model(client, run_id: str, name: str):
    """The newest complete (READY) LoggedModel called `name` whose source is the run, or None; one
    whose logging failed or was interrupted (FAILED, PENDING) holds no usable model."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    run = get_run(client, run_id)
    with _mlflow_errors(f"logged models of run {run_id}"):
        found = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id],
            filter_string=f"source_run_id='{run_id}' AND name='{name}'",
            order_by=[{"field_name": "creation_timestamp", "ascending": False}],
            max_results=100,
            output_format="list",
        )
    return next((m for m in found if m.status == LoggedModelStatus.READY), None)


def torch_model_uri(client, run_id: str) -> str | None:
    """URI of the run's logged PyTorch model (MLflow 3 LoggedModel), None when train did not log one."""
    found = logged_model(client, run_id, TORCH_MODEL)
    return found.model_uri if found else None


def onnx_attached(run) -> bool:
    return bool(run.data.tags.get(RUN_ONNX_TAG))


# ---------------------------------------------------------------------------------- registration


def version_tags(client, run, metric: str = "val_map") -> dict[str, str]:
    """Tags every registered version of a run carries (see the module docstring)."""
    run_id = run.info.run_id
    metrics = VERSION_METRICS if metric in VERSION_METRICS else (*VERSION_METRICS, metric)
    tags = {"run_id": run_id, "selection_metric": metric}
    tags.update({f"best.{k}": f"{v:.6g}" for k, v in best_metrics(client, run_id, metrics).items()})
    for key in (DATASET_HASH_TAG, "best.epoch"):
        if key in run.data.tags:
            tags[key] = run.data.tags[key]
    torch_uri = torch_model_uri(client, run_id)
    if torch_uri:
        tags["torch_model_uri"] = torch_uri
    if onnx_attached(run):
        tags["onnx_artifact"] = run.data.tags[RUN_ONNX_TAG]
        if run.data.tags.get(RUN_ONNX_URI_TAG):
            tags["onnx_model_uri"] = run.data.tags[RUN_ONNX_URI_TAG]
    return tags


def run_versions(client, name: str, run_id: str) -> list:
    """The versions of registered model `name` registered from run `run_id` ([] when `name` does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions(f"name='{name}' AND run_id='{run_id}'"))
    except MlflowException:
        return []


# what mlflow.register_model prints on stderr that our own "registered ... as models:/NAME/N" line says
_REGISTRY_CHATTER = ("Successfully registered model ", "Created version ", "Registered model ")


@contextlib.contextmanager
def _quiet_registration() -> Iterator[None]:
    """Hide MLflow's own registration lines (they repeat cellseg's); anything else it prints still shows."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().splitlines(keepends=True) if not line.startswith(_REGISTRY_CHATTER)]
        if kept:
            sys.stderr.write("".join(kept))


def register_model_uri(model_uri: str, run_id: str, name: str, alias: str | None, flavor: str, metric: str = "val_map"):
    """Register `model_uri` (a model logged by run `run_id`) as a version of `name`, tagged; point `alias` at it.

    A version of `name` already registered from this very model (same run, same source) is
    reused, its tags refreshed, instead of adding a duplicate version.
    """
    import mlflow

    client = connect()
    run = get_run(client, run_id)
    tags = {**version_tags(client, run, metric), "cellseg.flavor": flavor}
    with _mlflow_errors(f"registering {model_uri} as '{name}'"):
        same = [mv for mv in run_versions(client, name, run_id) if mv.source == model_uri]
        if same:
            mv = max(same, key=lambda v: int(v.version))
            for key, value in tags.items():
                client.set_model_version_tag(name, mv.version, key, value)
        else:
            with _quiet_registration():
                mv = mlflow.register_model(model_uri, name, tags=tags)
        if alias:
            client.set_registered_model_alias(name, alias, mv.version)
        return client.get_model_version(name, mv.version)


def _tag_float(tags: dict, key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, TypeError, ValueError):
        return None


def champion_change(before, after, metric: str = "val_map") -> tuple[str | None, str | None]:
    """(line naming the champion replaced and both scores, note when the new one scores worse),
    each None when there is nothing to say; `before` None when there was no champion."""
    if before is None or before.version == after.version:
        return None, None
    old, new = (_tag_float(v.tags, f"best.{metric}") for v in (before, after))
    scores = f" ({metric} {old:.4f} -> {new:.4f})" if old is not None and new is not None else ""
    change = f"champion: version {before.version} -> {after.version}{scores}"
    worse = old is not None and new is not None and ((new > old) if lower_is_better(metric) else (new < old))
    note = (f"note: the new champion scores worse on {metric} than version {before.version}; "
            f"models:/{after.name}/{before.version} is still there") if worse else None
    return change, note


def registration_notes(before, after, metric: str = "val_map") -> list[str]:
    """What registering `after` (moving the champion from `before`, None if there was none) should
    tell the user: the champion replaced with both scores, a note when it scores worse, and for a
    PyTorch version the command that makes the servable ONNX version."""
    from cellseg import tracking

    lines = [line for line in champion_change(before, after, metric) if line]
    if after.tags.get("cellseg.flavor") == "pytorch":  # (a run with an attached ONNX registers the pyfunc version)
        lines.append(f"note: this version is the PyTorch model (cellseg infer --model torch); `cellseg export -o FILE.onnx"
                     f"{tracking.name_option(after.name)}{tracking.uri_option()}` makes the ONNX version that serving "
                     "(mlflow models serve) and --model onnx use")
    return lines


def check_model_name(name: str) -> str:
    """`name` when it can be a registered model name used in models:/NAME URIs and registry
    searches, else CellsegError (empty, quotes, '/', ':', '@', control characters)."""
    from cellseg.config import MODEL_NAME_RULE, bad_model_name

    if bad_model_name(name):
        raise CellsegError(f"--name {name!r}: {MODEL_NAME_RULE}")
    return name


def register_run(run_id: str, name: str = MODEL_NAME, metric: str = "val_map", alias: str = ALIAS):
    """Register a training run as a new version of `name` and move `alias` (default `champion`) to it.

    With an ONNX attached to the run (`attach_onnx`) the version is the label-predicting pyfunc
    (`cellseg.serving.register_pyfunc`); otherwise it is the run's logged PyTorch model.
    Tags: see the module docstring; `metric` is recorded as the selection metric. Returns the
    ModelVersion (with its aliases and tags).
    """
    client = connect()
    run = get_run(client, run_id)
    if onnx_attached(run):
        from cellseg.serving import register_pyfunc

        return register_pyfunc(run_id, name=name, alias=alias, metric=metric)
    uri = torch_model_uri(client, run_id)
    if uri is None and run.info.status in ("RUNNING", "SCHEDULED"):
        raise CellsegError(f"run {run_id} is still running (its model is logged when training ends); register it then")
    if uri is None and run.info.status != "FINISHED":
        raise CellsegError(f"run {run_id} ended {run.info.status} before logging a model; register a finished run")
    if uri is None:
        raise CellsegError(
            f"run {run_id} has no logged PyTorch model (tracking.log_model was off); "
            "export and attach an ONNX model first (cellseg export), then register"
        )
    return register_model_uri(uri, run_id, name, alias, flavor="pytorch", metric=metric)


# ------------------------------------------------------------------------------------------ ONNX


@contextlib.contextmanager
def reopened_run(run_id: str) -> Iterator[None]:
    """Make run `run_id` the active MLflow run for the block, then end it with its old status.

    Already active: used as is. Another run active (a pipeline's parent): the run is reopened
    nested and the parent's experiment is made active again afterwards.
    """
    import mlflow

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    client = connect()
    run = get_run(client, run_id)
    # start_run refuses a run of another experiment than the active one
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    with _mlflow_errors(f"reopening run {run_id}"):
        mlflow.start_run(run_id=run_id, nested=active is not None)
    status = run.info.status if run.info.status in ("FINISHED", "FAILED", "KILLED") else "FINISHED"
    try:
        yield
    finally:
        from cellseg import tracking

        try:
            tracking.end_run(status, deliver=True)  # never left RUNNING by a Ctrl-C in the middle
        finally:
            if active is not None:
                mlflow.set_experiment(experiment_id=active.info.experiment_id)


def _onnx_requirements() -> list[str]:
    from importlib import metadata

    import mlflow
    import onnx

    reqs = [f"mlflow=={mlflow.__version__}", f"onnx=={onnx.__version__}"]
    for dist in ("onnxruntime-gpu", "onnxruntime"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
            break
        except metadata.PackageNotFoundError:
            continue
    return reqs


def onnx_signature(in_channels: int):
    """(N, C, H, W) float32 image -> (N, 3, H, W) float32 logits, N/H/W free."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, in_channels, -1, -1), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "logits")]),
    )


def attach_onnx(run_id: str, onnx_path: str | Path, name: str = MODEL_NAME, version: str | int | None = None) -> str:
    """Log an exported ONNX file on its training run and record it on registered versions; returns its model URI.

    On the run: an `mlflow.onnx` model named "onnx" (run by `mlflow.pyfunc` it returns logits)
    and the plain file as artifact `onnx/<sha256 prefix>/<filename>` (downloadable as is; a file
    re-tuned under the same name never replaces what an earlier version runs), plus the run tags
    `cellseg.onnx_artifact`/`cellseg.onnx_model_uri`. On the registry: version `version` of
    `name`, or when None every version registered from this run that has no ONNX yet, gets the
    tags `onnx_model_uri` and `onnx_artifact` (a version that has one keeps it: pinning a version
    pins the file it runs). A file exported from another run is refused. The bytes (and name) of
    the run's current ONNX attached again log nothing new: its model URI is returned.
    """
    import mlflow
    import onnx

    from cellseg.inference import OnnxModel

    onnx_path = Path(onnx_path)
    model = OnnxModel(onnx_path, device="cpu", threads=1)  # a cellseg model, checked before anything is logged
    if model.run_id and model.run_id != run_id:
        raise CellsegError(f"{onnx_path}: exported from run {model.run_id}, not run {run_id}; attach it to its own run")
    client = connect()
    targets = _versions_to_tag(client, run_id, name, version)
    artifact = onnx_artifact_path(onnx_path)
    run = get_run(client, run_id)
    if is_current_onnx(run, onnx_path):
        return _tag_versions(client, name, targets, run.data.tags[RUN_ONNX_URI_TAG], artifact)  # these bytes are attached already
    folder = artifact.rsplit("/", 1)[0]
    from cellseg.tracking import failed_if_interrupted

    with reopened_run(run_id), failed_if_interrupted():
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name=ONNX_MODEL,
            signature=onnx_signature(model.in_channels),
            pip_requirements=_onnx_requirements(),
            save_as_external_data=False,  # one self-contained file, as exported
            metadata={k: v for k, v in model.metadata.items() if k != "cellseg.config"},
        )
        mlflow.log_artifact(str(onnx_path), folder)
        mlflow.set_tags({RUN_ONNX_TAG: artifact, RUN_ONNX_URI_TAG: info.model_uri})
    return _tag_versions(client, name, targets, info.model_uri, artifact)


def is_current_onnx(run, onnx_path: str | Path) -> bool:
    """True when `onnx_path` (its bytes and name) is the ONNX attached to `run` last (`attach_onnx` logs it no more)."""
    tags = run.data.tags
    return bool(tags.get(RUN_ONNX_URI_TAG)) and tags.get(RUN_ONNX_TAG) == onnx_artifact_path(onnx_path)


def onnx_artifact_path(onnx_path: str | Path) -> str:
    """Run artifact path `attach_onnx` stores a file under: onnx/<sha256 prefix of its bytes>/<filename>."""
    onnx_path = Path(onnx_path)
    return f"{ONNX_ARTIFACT_DIR}/{hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:12]}/{onnx_path.name}"


def _tag_versions(client, name: str, versions: list, onnx_uri: str, artifact: str) -> str:
    for mv in versions:
        with _mlflow_errors(f"tagging version {mv.version} of '{name}'"):
            client.set_model_version_tag(name, mv.version, "onnx_model_uri", onnx_uri)
            client.set_model_version_tag(name, mv.version, "onnx_artifact", artifact)
    return onnx_uri


def _versions_to_tag(client, run_id: str, name: str, version) -> list:
    if version is not None:
        with _mlflow_errors(f"version {version} of registered model '{name}'"):
            mv = client.get_model_version(name, str(version))
        if mv.run_id != run_id:
            raise CellsegError(f"version {version} of '{name}' comes from run {mv.run_id}, not {run_id}; pass the right version")
        return [mv]
    return [mv for mv in run_versions(client, run_id=run_id, name=name) if not mv.tags.get("onnx_artifact")]


# --------------------------------------------------------------------------------------- lookups


def get_version(name: str = MODEL_NAME, alias: str | None = ALIAS, version: str | int | None = None):
    """The ModelVersion of `name` by alias (default) or by version number."""
    client = connect()
    if version is not None:
        with _mlflow_errors(f"models:/{name}/{version}"):
            return client.get_model_version(name, str(version))
    with _mlflow_errors(f"models:/{name}@{alias}"):
        return client.get_model_version_by_alias(name, alias)


def current_champion(name: str = MODEL_NAME):
    """The ModelVersion `@champion` of `name` points at, None when there is none (before registering:
    what `registration_notes` compares the new version with)."""
    try:
        return get_version(name, ALIAS)
    except CellsegError:  # no such model or alias yet
        return None


def cache_dir() -> Path:
    """Where downloaded registry files live: $CELLSEG_CACHE_DIR, else $XDG_CACHE_HOME/cellseg or ~/.cache/cellseg."""
    env = os.environ.get("CELLSEG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cellseg"


def download_artifact(run_id: str, artifact: str, key: str) -> Path:
    """Run artifact `artifact` as a local file under cache_dir()/key (downloaded once, atomically)."""
    import mlflow

    target = cache_dir() / re.sub(r"[^A-Za-z0-9._-]", "_", key) / Path(artifact).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        with _mlflow_errors(f"downloading artifact {artifact} of run {run_id}"):
            got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact, dst_path=tmp))
        if not got.is_file():
            raise CellsegError(f"artifact {artifact} of run {run_id} is not a file")
        os.replace(got, target)
    return target


def version_onnx(mv) -> Path | None:
    """Local path of the plain .onnx file of a registered version (downloaded), None when it has none."""
    client = connect()
    artifact = mv.tags.get("onnx_artifact")
    key = mv.tags.get("onnx_model_uri", "")
    if not artifact and mv.run_id:  # attached after registration, to a version of another name
        run = get_run(client, mv.run_id)
        artifact = run.data.tags.get(RUN_ONNX_TAG)
        key = run.data.tags.get(RUN_ONNX_URI_TAG, "")
    if not artifact or not mv.run_id:
        return None
    # the logged ONNX model's id changes with every attach: a re-export never reads a stale cache
    return download_artifact(mv.run_id, artifact, key.removeprefix("models:/") or f"run-{mv.run_id}")


def champion_onnx(name: str = MODEL_NAME, alias: str = ALIAS) -> Path:
    """Local path of the plain .onnx file of `models:/name@alias` (cached download).

    CellsegError when no registry is reachable, the model or alias does not exist, or that
    version has no ONNX attached.
    """
    mv = get_version(name, alias)
    path = version_onnx(mv)
    if path is None:
        raise CellsegError(
            f"models:/{name}@{alias} (version {mv.version}, run {mv.run_id}) has no ONNX model; "
            "export one (cellseg export) and attach it (cellseg.registry.attach_onnx)"
        )
    return path


def _checkpoint_key(run, size) -> str:
    """Cache key of a run's best.pt: changes whenever the run logs on (a `--resume`, a running
    run's new epochs: new metric values), so a cached copy of an earlier best checkpoint is never
    taken for it; stays when only tags or the run's end time change (attaching an ONNX). The
    status is in it: a run that ends uploads its final best.pt after its last metrics."""
    state = [run.info.status, size, sorted(run.data.metrics.items())]
    return f"run-{run.info.run_id}-{hashlib.sha256(json.dumps(state, default=str).encode()).hexdigest()[:12]}"


def run_checkpoint(run_id: str) -> Path:
    """Local path of the run's best checkpoint: artifact checkpoints/best.pt, else the local checkpoint folder."""
    client = connect()
    run = get_run(client, run_id)
    sizes = {a.path: a.file_size for a in client.list_artifacts(run_id, "checkpoints")}
    if CHECKPOINT_ARTIFACT in sizes:
        key = _checkpoint_key(run, sizes[CHECKPOINT_ARTIFACT])
        path = download_artifact(run_id, CHECKPOINT_ARTIFACT, key)
        for stale in cache_dir().glob(f"run-{run_id}-*"):  # earlier best checkpoints of this run
            with contextlib.suppress(OSError):  # left alone while another process may still read it
                if stale.name != key and time.time() - stale.stat().st_mtime > 600:
                    shutil.rmtree(stale, ignore_errors=True)
        return path
    local = run.data.tags.get("cellseg.checkpoint_dir")
    if local and (Path(local) / "best.pt").is_file():
        return Path(local) / "best.pt"
    raise CellsegError(f"run {run_id} has no best checkpoint (no {CHECKPOINT_ARTIFACT} artifact); it may have ended before its first epoch")
