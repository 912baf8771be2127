"""Process helpers shared by the tests that signal training subprocesses."""

from __future__ import annotations

from pathlib import Path


def child_pids(pid: int) -> list[int]:
    """Pids of the live child processes of `pid`, whatever their process group or session."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def ignores_signal(pid: int, sig: int) -> bool:
    """True when process `pid` ignores `sig` (its SigIgn mask in /proc); False once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(ignored, 16) & (1 << (sig - 1)))
