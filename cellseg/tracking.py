"""Everything MLflow: tracking URI, runs, params/tags/metrics, artifacts, logged models.

Kept out of the training math: `train.py` calls these functions at epoch boundaries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from cellseg import __version__
from cellseg.errors import CellsegError, first_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI given, else MLFLOW_TRACKING_URI, else the embedded sqlite store in the working dir."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _check_local_store(uri: str) -> None:
    """A sqlite file must sit in an existing folder (MLflow would create a typo'd path silently);
    a file-store path must not be a plain file."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and not (uri.startswith("sqlite:///") or uri.split("?", 1)[0] == "sqlite://"):
        raise CellsegError(f"tracking URI {uri}: not a valid SQLite URL; a database file is sqlite:///RELATIVE/PATH.db "
                           "or sqlite:////ABSOLUTE/PATH.db (three or four slashes)")
    if parsed.scheme == "sqlite":
        # as SQLAlchemy reads it: percent-escapes decoded, query (?timeout=...) dropped
        path = Path(unquote(uri[len("sqlite:///"):].split("?", 1)[0])) if uri.startswith("sqlite:///") else None
        if path is None or str(path) in ("", ":memory:"):
            return
        if path.is_dir():
            raise CellsegError(f"tracking URI {uri}: {path} is a folder; name the database file (sqlite:///FOLDER/mlflow.db)")
        if not path.parent.is_dir():
            raise CellsegError(f"tracking URI {uri}: folder {path.parent} does not exist (a typo?); create it first")
        if path.is_file() and path.stat().st_size and not _is_sqlite(path):
            raise CellsegError(f"tracking URI {uri}: {path} is not an SQLite database (another kind of file); name a new "
                               "or an MLflow .db file")
        if not path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):  # MLflow would retry for minutes
            raise CellsegError(f"tracking URI {uri}: folder {path.parent} is read-only; the database cannot be created there")
    elif parsed.scheme in ("", "file") and uri not in _SCHEME_WORDS:
        path = Path(parsed.path if parsed.scheme == "file" else uri)
        if path.exists() and not path.is_dir():
            database = path if path.suffix == ".db" or _is_sqlite(path) else Path(f"{path}.db")
            raise CellsegError(f"tracking URI {uri}: {path} is a file, not a tracking folder; use sqlite:///{database}")
        if not _file_store_allowed():
            raise CellsegError(f"tracking URI {uri}: a folder (MLflow file store), which this MLflow refuses unless "
                               f"MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///{path.name or 'mlflow'}.db or an http(s) server")


_SCHEME_WORDS = ("databricks", "databricks-uc", "uc")  # tracking URIs with no ':' that are not folders


def _file_store_allowed() -> bool:
    """Whether the installed MLflow opens a folder (file) store: before 3.13 always; from 3.13 only
    with MLFLOW_ALLOW_FILE_STORE set (read as MLflow reads it)."""
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:
        return True
    try:
        return bool(MLFLOW_ALLOW_FILE_STORE.get())
    except ValueError as exc:  # a value MLflow cannot read: MLflow would fail on it later
        raise CellsegError(str(exc)) from None


def _is_sqlite(path: Path) -> bool:
    """True when `path` starts with the SQLite file header."""
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def check_reachable(uri: str, timeout: float = 3.0) -> None:
    """Fail fast, before any training work, when an http(s) tracking server does not answer or a
    local store's path cannot be right."""
    parsed = urlparse(uri)
    if parsed.scheme.split("+")[0] not in _store_schemes():  # MLflow's message says 'model registry' and is cut off
        raise CellsegError(f"tracking URI {uri}: unknown scheme '{parsed.scheme}:'; MLflow stores are sqlite:///FILE.db, "
                           "http(s)://HOST:PORT (mlflow server), a database URL (postgresql://, mysql://, mssql://) or a folder")
    if parsed.scheme not in ("http", "https"):
        _check_local_store(uri)
        return
    host = parsed.hostname or "localhost"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise CellsegError(
            f"MLflow tracking server {uri} is unreachable ({exc.strerror or exc}); "
            "start it (mlflow server ...) or set MLFLOW_TRACKING_URI / --tracking-uri"
        ) from None


def _store_schemes() -> set[str]:
    """URI schemes the installed MLflow has a tracking store for ('' is a folder)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):  # a private registry: its fallback, MLflow 3's list
        return {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc"}


def check_store_exists(uri: str, where: str) -> None:
    """Before reading from a store: CellsegError when a sqlite store's file does not exist (MLflow
    would create an empty `mlflow.db` in the working folder and answer 'not found'). `where`: what
    the store to point at holds, e.g. 'the model was trained'."""
    if uri.startswith("sqlite:///"):
        db = unquote(uri[len("sqlite:///"):].split("?")[0])
        if db and db != ":memory:" and not Path(db).is_file():
            raise CellsegError(
                f"no MLflow store at {Path(db).resolve()} (tracking URI {uri}); "
                f"set MLFLOW_TRACKING_URI / --tracking-uri to the store where {where}"
            )


def setup(uri: str | None = None) -> str:
    """Point MLflow at the resolved URI (checked first) and quiet its retries; returns the URI."""
    import mlflow

    uri = resolve_tracking_uri(uri)
    check_reachable(uri)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    mlflow.set_tracking_uri(uri)
    return uri


def uri_option() -> str:
    """' --tracking-uri URI' (shell-quoted) naming the current store in a printed command; '' for
    the default store. The URI MLflow uses, whether it came from a config, an option or the environment."""
    import shlex

    import mlflow

    uri = mlflow.get_tracking_uri()
    return "" if uri == DEFAULT_TRACKING_URI else f" --tracking-uri {shlex.quote(absolute_uri(uri))}"


def name_option(model_name: str) -> str:
    """' --name NAME' (shell-quoted) naming a registered model in a printed command; '' for the default."""
    import shlex

    from cellseg.registry import MODEL_NAME

    return "" if model_name == MODEL_NAME else f" --name {shlex.quote(model_name)}"


def absolute_uri(uri: str) -> str:
    """`uri` with a relative local store made absolute (sqlite:///runs.db, file:mlruns, ./mlruns): a
    printed command then works from any folder. Server, in-memory and absolute URIs are returned as
    they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file://" + str(Path(uri.removeprefix("file:")).resolve())
    if ":" not in uri and ("/" in uri or Path(uri).exists()):  # a folder; not a name like 'databricks'
        return str(Path(uri).resolve())
    return uri


def experiment_of(run_id: str) -> str:
    """The name of the experiment run `run_id` is in (MlflowException when there is no such run)."""
    import mlflow

    return mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name


def launched_experiment(requested: str | None = None) -> str | None:
    """Under `mlflow run` (MLFLOW_RUN_ID set): the name of the experiment mlflow made the run in.
    CellsegError when `requested` names another one (the run exists before our code starts).
    None outside `mlflow run`. Call after `setup`."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        name = experiment_of(run_id)
    except MlflowException as exc:
        raise CellsegError(f"MLFLOW_RUN_ID {run_id}: not a run of {mlflow.get_tracking_uri()} ({first_line(exc)})") from None
    if requested and requested != name:
        raise CellsegError(
            f"experiment {requested!r}: `mlflow run` made this run in experiment {name!r} before training "
            f"started; choose it with `mlflow run --experiment-name {requested}`"
        )
    return name


def check_launched_experiment(requested: str | None, uri: str | None = None) -> None:
    """Before any work: under `mlflow run`, an experiment asked for (--experiment) must be the one
    mlflow made the run in (`launched_experiment`). Nothing to check outside `mlflow run`."""
    if requested and os.environ.get("MLFLOW_RUN_ID"):
        setup(uri)
        launched_experiment(requested)


def git_commit() -> str | None:
    """The git commit of the cellseg source tree, if it is a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


DATASET_HASH_TAG = "dataset.hash"  # the training data's content hash (data.dataset.dataset_hash)


def run_tags(data_path: str, data_hash: str) -> dict[str, str]:
    tags = {"cellseg.version": __version__, "dataset.path": data_path, DATASET_HASH_TAG: data_hash}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def log_text_artifact(text: str, name: str, artifact_path: str | None = None) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        p.write_text(text)
        mlflow.log_artifact(str(p), artifact_path)


def logged_metric_steps(run_id: str, key: str) -> set[int]:
    """Steps already logged for a metric (used on resume so no step is written twice)."""
    from mlflow import MlflowClient

    return {m.step for m in MlflowClient().get_metric_history(run_id, key)}


def pip_requirements() -> list[str]:
    """Requirements written into logged models (no slow inference of them)."""
    import mlflow
    import numpy
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy>={numpy.__version__.split('.')[0]}", f"mlflow=={mlflow.__version__}", "scipy", "opencv-python-headless", "onnxruntime-gpu"]


@contextmanager
def failed_if_interrupted():
    """Around an MLflow `log_model`: the logged model it created is marked FAILED when Ctrl-C or
    SIGTERM cuts it short (MLflow marks it so for errors only; an interrupt left it PENDING for good)."""
    import mlflow

    def last_id() -> str | None:  # (MLflow's last model of this process may be in another store: not found)
        with contextlib.suppress(Exception):
            return getattr(mlflow.last_logged_model(), "model_id", None)
        return None

    before = last_id()
    try:
        with sigterm_interrupts():  # (export, register: SIGTERM would otherwise end the process at once)
            yield
    except BaseException:
        with contextlib.suppress(Exception):
            from mlflow.entities import LoggedModelStatus

            now = last_id()
            if now is not None and now != before and mlflow.get_logged_model(now).status == LoggedModelStatus.PENDING:
                mlflow.MlflowClient().finalize_logged_model(now, LoggedModelStatus.FAILED)
        raise


@contextmanager
def interrupts_held(deliver: bool):
    """Ctrl-C and SIGTERM noted, not raised, while MLflow marks a run ended (an interrupt in the
    middle would leave it RUNNING). Afterwards a noted one is re-sent to the process when `deliver`,
    else dropped (the run is being stopped already). Ctrl-\\ (SIGQUIT) still quits at once."""
    noted = []
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: noted.append(signum))
    except ValueError:  # not in the main thread: signals never reach this code
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if deliver:
        for sig in dict.fromkeys(noted):
            signal.raise_signal(sig)


def end_run(status: str, deliver: bool = False) -> None:
    """mlflow.end_run(status) that a Ctrl-C or SIGTERM cannot cut short (see interrupts_held)."""
    import mlflow

    with interrupts_held(deliver):
        mlflow.end_run(status=status)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so code that ends its MLflow run on an
    interrupt (training outside its epoch loop, a pipeline's parent run) ends it KILLED instead of
    being left RUNNING by an instant death. Only where SIGTERM has its default action, in the main thread."""
    installed = False
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _raise_interrupt)
            installed = True
    except ValueError:  # not in the main thread
        pass
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
