"""One MLflow tracking server for every worker: a real `mlflow server` on a loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cellseg.config import apply_overrides
from cellseg.train import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, "mlflow server exited"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.poll() is not None


@pytest.mark.slow
def test_training_logs_to_a_shared_tracking_server(mlflow_server, tiny_cfg, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    cfg = apply_overrides(tiny_cfg, {"tracking.uri": mlflow_server, "tracking.experiment": "shared"})
    result = train(cfg, quiet=True)
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val_iou")] == [1, 2]
    # artifacts went through the server into its --artifacts-destination, not the client's disk
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert (tmp_path / "artifacts").is_dir() and any((tmp_path / "artifacts").rglob("best.pt"))
    model = mlflow.pytorch.load_model(result.model_uri)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_local_store_paths_that_cannot_be_right_are_refused(tmp_path, monkeypatch):
    from cellseg.errors import CellsegError
    from cellseg.tracking import check_reachable

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)

    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(f"sqlite:///{tmp_path / 'typo' / 'mlflow.db'}", r"does not exist \(a typo\?\)"),
             (f"sqlite:///{tmp_path}", "is a folder; name the database file"),
             (str(afile), f"is a file, not a tracking folder; use sqlite:///{afile}.db$"),
             (f"file://{afile}", "is a file, not a tracking folder")]
    import sqlite3

    sqlite3.connect(tmp_path / "store").execute("create table t (x)").connection.close()  # a database with no .db suffix
    (tmp_path / "mlflow.db").write_text("")
    cases += [(str(tmp_path / "store"), f"use sqlite:///{tmp_path / 'store'}$"),
              (str(tmp_path / "mlflow.db"), f"use sqlite:///{tmp_path / 'mlflow.db'}$"),
              ("sqlite://mlflow.db", "not a valid SQLite URL; a database file is sqlite:///RELATIVE/PATH.db"),
              ("sqlite:/x.db", "not a valid SQLite URL"),
              ("garbage", "a folder \\(MLflow file store\\), which this MLflow refuses unless MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///garbage.db"),
              (f"file:{tmp_path / 'runs'}", "MLFLOW_ALLOW_FILE_STORE=true"),
              ("foo://x", r"tracking URI foo://x: unknown scheme 'foo:'; MLflow stores are sqlite:///FILE.db, http\(s\)://HOST:PORT")]
    cases += [(f"sqlite:///{afile}", f"{afile} is not an SQLite database \\(another kind of file\\)")]  # was a 100-line traceback
    for uri, message in cases:
        with pytest.raises(CellsegError, match=message):
            check_reachable(uri)
    assert afile.read_text() == "x"
    from cellseg import tracking

    with monkeypatch.context() as m:  # a read-only folder (root ignores permission bits: as a read-only mount says)
        m.setattr(tracking.os, "access", lambda path, mode: Path(path) != tmp_path)
        with pytest.raises(CellsegError, match=f"folder {tmp_path} is read-only; the database cannot be created there"):
            check_reachable(f"sqlite:///{tmp_path / 'new.db'}")  # MLflow retried for minutes
        check_reachable(f"sqlite:///{tmp_path / 'store'}")  # an existing database there can still be read
    for uri in ("sqlite://", "sqlite:///:memory:", f"sqlite:///{tmp_path / 'x.db'}?timeout=20", "databricks", "databricks-uc",
                "uc", "databricks://profile"):  # in-memory, a query, and names MLflow reads as schemes: not refused
        check_reachable(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "yes")  # MLflow reads only true/false/1/0: said before it fails
    with pytest.raises(CellsegError, match="MLFLOW_ALLOW_FILE_STORE value must be one of"):
        check_reachable(f"file:{tmp_path / 'runs'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "TRUE")  # the user's opt-in: a folder store is theirs to use
    check_reachable(f"file:{tmp_path / 'runs'}")
    assert not (tmp_path / "typo").exists()
    check_reachable(f"sqlite:///{tmp_path / 'new.db'}")  # a new database in an existing folder is fine
    check_reachable(str(tmp_path))
    (tmp_path / "my dir").mkdir()
    check_reachable(f"sqlite:///{tmp_path}/my%20dir/x.db?timeout=20")  # escapes decoded, query ignored
