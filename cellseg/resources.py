"""Memory checks before segmenting a huge image: a clear per-image failure instead of an OOM kill."""

from __future__ import annotations

import os
from pathlib import Path

from cellseg.errors import CellsegError

# Peak memory of `cellseg infer` per image pixel above the loaded model. `make bench`'s memory
# check (bench/infer.py, 10,000² 16-bit TIFF) prints the measured value beside this estimate:
# 18.1 bytes/px at tile 768 / batch 1 (the defaults), 21.6 at tile 512 / batch 8, with a model that
# stores a minimum object score (the shipped one), whose float16 p(background) plane adds 2 bytes/px
# (16.1 and 19.6 without). --probs keeps three more float32 planes (12 bytes/px). Rounded up:
# refusing a borderline image beats an OOM kill.
BYTES_PER_PIXEL = 22
PROBS_BYTES_PER_PIXEL = 12


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2, no limit) -> None


def _stat(path: Path, key: str) -> int:
    """A counter of a cgroup memory.stat file (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[tuple[Path, bool]]:
    """(memory cgroup folder of this process, is cgroup v2) from /proc/self/cgroup, with its
    ancestors up to `root` (a limit may sit on a parent, e.g. a Slurm job or a systemd slice)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hier == "0" and not controllers:
            base, v2 = root, True
        elif "memory" in controllers.split(","):
            base, v2 = root / "memory", False
        else:
            continue
        d = base / rel.strip().lstrip("/")
        while True:
            found.append((d, v2))
            if d == base or base not in d.parents:
                break
            d = d.parent
    return found


def _cgroup_free(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes left under the tightest cgroup memory limit of this process (v2 or v1; containers,
    Slurm jobs), reclaimable file cache counted as free (as `docker stats` does); None without a limit."""
    free = None
    for d, v2 in _cgroup_dirs(root, proc_cgroup):
        limit = _read_int(d / ("memory.max" if v2 else "memory.limit_in_bytes"))
        used = _read_int(d / ("memory.current" if v2 else "memory.usage_in_bytes"))
        if limit is None or used is None or limit >= 2**60:  # v1 writes ~2^63 for "no limit"
            continue
        cache = _stat(d / "memory.stat", "inactive_file" if v2 else "total_inactive_file")
        left = max(0, limit - max(0, used - cache))
        free = left if free is None else min(free, left)
    return free


def available_memory() -> int | None:
    """Bytes of memory available to this process now (MemAvailable, bounded by a cgroup limit);
    None where the system does not say (the check is then skipped)."""
    free = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            free = None
    group = _cgroup_free()
    if group is not None:
        free = group if free is None else min(free, group)
    return free


def segmenting_bytes(height: int, width: int, probs: bool = False) -> int:
    """About how much memory segmenting an image of this size needs (probabilities kept or not)."""
    return height * width * (BYTES_PER_PIXEL + (PROBS_BYTES_PER_PIXEL if probs else 0))


def check_fits(path: str | Path, height: int, width: int, probs: bool = False) -> None:
    """CellsegError naming `path` when segmenting it would need more memory than is available."""
    need = segmenting_bytes(height, width, probs)
    free = available_memory()
    if free is None or need <= free:
        return
    raise CellsegError(
        f"{path}: {width}x{height} image ({height * width / 1e6:.1f} megapixels) needs about "
        f"{need / 2**30:.1f} GiB of memory to segment{' with --probs' if probs else ''} and "
        f"{free / 2**30:.1f} GiB are available; crop it into smaller images"
    )
