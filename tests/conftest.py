"""Shared fixtures: a tiny synthetic dataset, a temporary MLflow store, a tiny config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(autouse=True)
def _no_inherited_mlflow_run(monkeypatch):
    """mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID to os.environ; a test that ran it must
    not hand it to the next test's subprocesses (`mlflow run --experiment-name` refuses both)."""
    for key in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI to os.environ (MLflow 3): a test that
    pointed MLflow at a server, closed since, must not send the next test's subprocesses there."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """`--threads 1` of a PyTorch model sets torch's process-wide thread count: a test that loads one
    must not change how the next test's training sums (and so what it learns)."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """8 synthetic 64x64 images with masks."""
    from cellseg.data.synth import write_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    write_dataset(root, n=8, size=(64, 64), seed=0)
    return root


@pytest.fixture(scope="session")
def mlflow_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def tracking(mlflow_dir, monkeypatch, tmp_path) -> str:
    """A sqlite tracking store shared by the session; artifacts and cwd under tmp paths."""
    import mlflow

    uri = f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(mlflow_dir)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def tiny_cfg(tiny_data, tmp_path, request):
    """A config that trains in seconds: depth-2 8-channel U-Net, 32-px crops, 2 steps an epoch."""
    from cellseg.config import Config, apply_overrides

    return apply_overrides(
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
            "train.checkpoint_dir": str(tmp_path / "ckpt"),
            "tracking.experiment": f"test-{request.node.name}"[:200],
        },
    )
