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
    resources.check_fits("a.tif", 10_000, 10_000)  # 1.3 GiB
    with pytest.raises(CellsegError, match=r"^a\.tif: 10000x10000 image \(100\.0 megapixels\) needs about 2\.4 GiB of memory to segment with --probs and 2\.0 GiB are available; crop it"):
        resources.check_fits("a.tif", 10_000, 10_000, probs=True)
    with pytest.raises(CellsegError, match=r"^wsi\.tif: 40000x30000 image \(1200\.0 megapixels\) needs about 15\.6 GiB"):
        resources.check_fits("wsi.tif", 30_000, 40_000)
    monkeypatch.setattr(resources, "available_memory", lambda: None)  # the system does not say: no check
    resources.check_fits("wsi.tif", 30_000, 40_000)


def test_a_cgroup_limit_bounds_the_free_memory(monkeypatch):
    monkeypatch.setattr(resources, "_cgroup_free", lambda: 1024)
    assert resources.available_memory() == 1024
