"""Memory checks before segmenting a huge image: a clear per-image failure instead of an OOM kill."""

from __future__ import annotations

import os
from pathlib import Path

from cellseg.errors import CellsegError

# Peak memory of `cellseg infer` per image pixel beyond the decoded image, measured with
# /usr/bin/time on 4, 16 and 64 megapixel images (slope 13.6 bytes/px; +11.6 with --probs,
# which keeps three float32 probability planes). Rounded up.
BYTES_PER_PIXEL = 14
PROBS_BYTES_PER_PIXEL = 12


def _cgroup_free() -> int | None:
    """Bytes left under a cgroup v2 memory limit (containers), None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


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
