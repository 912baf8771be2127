"""Checkpoints as plain tensors and dicts, written atomically, loaded with weights_only=True."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import socket
from pathlib import Path

import torch

from cellseg.data.io import atomic_write
from cellseg.errors import CellsegError, in_cwd


def unwrap_state_dict(state: dict) -> dict:
    """Strip the `module.` prefix DistributedDataParallel adds to parameter names."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temp file in the same folder, then rename: a kill never leaves half a file."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _unpickling_detail(message: str) -> str:
    """' (module.Name)' of the object torch's weights-only loader refused, else ''.

    torch's message is many lines with terminal escapes and advice to re-load the file with
    weights_only=False (unsafe): only the name of the refused object is kept.
    """
    m = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.<>]+)", message)
    return f" ({m.group(1)})" if m else ""


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (weights_only=True); refuse pickled code with a clear error."""
    path = Path(path)
    if path.is_dir():
        raise CellsegError(f"{path}: is a folder; pass a checkpoint file in it (best.pt or last.pt)")
    if not path.is_file():
        raise CellsegError(f"{path}: checkpoint not found{in_cwd(path)}")
    if path.suffix.lower() == ".onnx":
        raise CellsegError(f"{path}: an ONNX model, not a PyTorch checkpoint (.pt); use it directly with --model")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip archive (or, before 1.6, a pickle)
        raise CellsegError(f"{path}: not a PyTorch checkpoint (best.pt / last.pt written by cellseg train)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = _unpickling_detail(str(exc))
        raise CellsegError(
            f"{path}: refused to load: the file holds pickled Python objects{what}, not plain tensors "
            "(only checkpoints written by cellseg load safely)"
        ) from None
    except Exception as exc:
        raise CellsegError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CellsegError(f"{path}: not a cellseg checkpoint (missing model weights or config)")
    return state


LOCK_NAME = "training.lock"
_HELD: set[str] = set()  # folders this process trains into: POSIX locks do not exclude their own process


@contextlib.contextmanager
def training_lock(folder: str | Path, what: str):
    """Held while this process trains into the checkpoint folder `folder`, so that a second trainer
    (`--resume` of a run still training) is refused with a CellsegError naming the holder.

    A POSIX record lock: the kernel drops it when the process dies (SIGKILL and OOM kills too, so a
    killed run stays resumable) and forked DataLoader workers do not inherit it. It holds across
    machines on file systems that lock (NFS mounted with locking); where locks are not available
    (Windows, a file system without them) training goes on unlocked. In a folder this user cannot
    write, an existing lock file is still checked (a shared lock), and none is taken.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(folder) / LOCK_NAME
    key = os.path.realpath(path)
    if key in _HELD:
        raise CellsegError(f"{what}: the run is already being trained by this process (it holds {path})")
    exclusive = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise CellsegError(f"{what}: cannot open {path} ({exc.strerror})") from None
        try:  # a folder (or lock file) this user cannot write: check for a holder without holding
            fd, exclusive = os.open(path, os.O_RDONLY), False
        except OSError:  # no lock file, and none can be made: no trainer holds one
            yield
            return
    try:
        try:
            fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            locked = True
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                raise CellsegError(
                    f"{what}: the run is still being trained by {holder} (it holds {path}); "
                    "stop that process first, or wait for it to end"
                ) from None
            locked = False  # ENOLCK and the like: no locking on this file system
        if locked and exclusive:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
            except OSError as exc:
                raise CellsegError(f"{what}: cannot write {path} ({exc.strerror})") from None
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)  # releases the lock
