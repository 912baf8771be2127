"""Memory checks before segmenting a huge image."""

from __future__ import annotations

import pytest

from cellseg import resources
from cellseg.errors import CellsegError


def test_available_memory_is_read_from_the_system():
    free = resources.available_memory()
    assert free is None or free > 0
    resources.check_fits("small.png", 64, 64)  # no error on any machine that runs the tests


def test_an_image_larger_than_the_free_memory_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 2 * 2**30)
    resources.check_fits("a.tif", 9_500, 9_500)  # 1.8 GiB
    with pytest.raises(CellsegError, match=r"^a\.tif: 9500x9500 image \(90\.2 megapixels\) needs about 2\.9 GiB of memory to segment with --probs and 2\.0 GiB are available; crop it"):
        resources.check_fits("a.tif", 9_500, 9_500, probs=True)
    with pytest.raises(CellsegError, match=r"^wsi\.tif: 40000x30000 image \(1200\.0 megapixels\) needs about 24\.6 GiB"):
        resources.check_fits("wsi.tif", 30_000, 40_000)
    monkeypatch.setattr(resources, "available_memory", lambda: None)  # the system does not say: no check
    resources.check_fits("wsi.tif", 30_000, 40_000)


def test_a_cgroup_limit_bounds_the_free_memory(monkeypatch):
    monkeypatch.setattr(resources, "_cgroup_free", lambda: 1024)
    assert resources.available_memory() == 1024


def _files(folder, **values):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in values.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_cgroup_v2_limit_counts_reclaimable_cache_as_free(tmp_path):
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    proc.write_text("0::/job/step\n")
    gib = 2**30
    # the job's limit is 4 GiB, 3.9 GiB "used" of which 3 GiB is inactive file cache
    _files(root / "job", memory_max=str(4 * gib), memory_current=str(int(3.9 * gib)), memory_stat=f"anon 1\ninactive_file {3 * gib}\n")
    _files(root / "job" / "step", memory_max="max", memory_current="100")
    free = resources._cgroup_free(root, proc)
    assert free == 4 * gib - (int(3.9 * gib) - 3 * gib)
    proc.write_text("0::/\n")  # inside a cgroup namespace: the root itself
    _files(root, memory_max=str(gib), memory_current=str(gib // 2))
    assert resources._cgroup_free(root, proc) == gib // 2


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    root = tmp_path / "cgroup"
    proc = tmp_path / "proc_cgroup"
    proc.write_text("9:name=systemd:/\n4:memory:/slurm/job1\n")
    _files(root / "memory" / "slurm" / "job1", memory_limit_in_bytes="1000000", memory_usage_in_bytes="600000",
           memory_stat="total_rss 1\ntotal_inactive_file 100000\n")
    assert resources._cgroup_free(root, proc) == 1000000 - 500000
    _files(root / "memory" / "slurm" / "job1", memory_limit_in_bytes="9223372036854771712")  # v1's "no limit"
    assert resources._cgroup_free(root, proc) is None
    assert resources._cgroup_free(root, tmp_path / "missing") is None
