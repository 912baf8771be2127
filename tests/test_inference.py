"""Tiled inference: tile placement, Gaussian blending, batching across images, providers."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellseg.config import Config
from cellseg.errors import CellsegError
from cellseg.inference import (
    check_threads,
    TileBatcher,
    balanced_tile,
    TorchModel,
    available_providers,
    cuda_usable,
    gaussian_window,
    predict_many,
    predict_tiled,
    tile_positions,
)
from cellseg.model import UNet, predict_logits


class PixelModel:
    """Logits from a per-pixel function of the input: tiling must not change the result at all."""

    size_multiple = 8
    in_channels = 1

    def __init__(self):
        self.batch_shapes = []

    @staticmethod
    def logits(x: np.ndarray) -> np.ndarray:
        c = x[:, 0]
        return np.stack([np.sin(3 * c), 2 * c - 1, -(c**2)], axis=1).astype(np.float32)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 4
        assert batch.shape[2] % 8 == 0 and batch.shape[3] % 8 == 0
        self.batch_shapes.append(batch.shape)
        return self.logits(batch)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def _expected(image: np.ndarray) -> np.ndarray:
    return _softmax(PixelModel.logits(image[None, None])[0])


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w), dtype=np.float32) * 2 - 0.5


# ------------------------------------------------------------------------------- tile positions


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 3000),
    tile=st.integers(1, 700),
    overlap=st.floats(0.0, 0.95),
    align=st.sampled_from([1, 1, 4, 8, 16]),
)
def test_tile_positions_cover_the_range_and_end_flush(size, tile, overlap, align):
    pos = tile_positions(size, tile, overlap, align)
    if size <= tile:
        assert pos == [0]
        return
    assert pos[0] == 0 and pos[-1] == size - tile
    assert all(b > a for a, b in zip(pos, pos[1:]))
    a = align if align <= tile else 1
    step = max(a, int(tile * (1 - overlap)) // a * a, 1)
    assert all(b - a <= step for a, b in zip(pos, pos[1:]))  # never a gap, never less overlap than asked
    covered = np.zeros(size, bool)
    for p in pos:
        covered[p : p + tile] = True
    assert covered.all()
    if (size - tile) % a == 0:
        assert all(p % a == 0 for p in pos)


def test_tile_positions_rejects_bad_overlap():
    with pytest.raises(CellsegError, match="overlap"):
        tile_positions(100, 10, 1.0)


# ------------------------------------------------------------------------------ gaussian window


@pytest.mark.parametrize("tile", [(64, 64), (512, 512), (40, 96), (1, 1), (8, 200)])
def test_gaussian_window_positive_peaked_symmetric_cached(tile):
    w = gaussian_window(tile)
    assert w.shape == tile and w.dtype == np.float32
    assert (w > 0).all() and w.max() == pytest.approx(1.0)
    np.testing.assert_allclose(w, w[::-1, ::-1])
    assert gaussian_window(tile) is w and not w.flags.writeable
    if min(tile) >= 64:
        assert w[0, 0] < 0.01 and w[tile[0] // 2, tile[1] // 2] > 0.99


# ------------------------------------------------------------------------------- predict_tiled


@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (300, 7), (1000, 37), (130, 200)])
def test_tiled_equals_whole_image_for_a_per_pixel_model(shape):
    img = _image(*shape)
    probs = predict_tiled(PixelModel(), img, tile=64, overlap=0.25, batch_size=4)
    assert probs.shape == (3, *shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, _expected(img), atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    h=st.integers(1, 300),
    w=st.integers(1, 300),
    tile=st.integers(8, 128),
    overlap=st.sampled_from([0.0, 0.125, 0.5]),
    margin=st.sampled_from([0, 5, 32]),
)
def test_output_shape_equals_input_shape(h, w, tile, overlap, margin):
    img = _image(h, w, seed=h * 1000 + w)
    probs = predict_tiled(PixelModel(), img, tile=tile, overlap=overlap, batch_size=3, margin=margin)
    assert probs.shape == (3, h, w)
    np.testing.assert_allclose(probs, _expected(img), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)


def test_small_image_is_one_shrunk_tile():
    model = PixelModel()
    predict_tiled(model, _image(20, 30), tile=512, margin=32)
    # 20 + 64 -> 88 and 30 + 64 -> 94 -> 96 (multiple of 8): a single tile of the padded image
    assert model.batch_shapes == [(1, 1, 88, 96)]


def test_tiles_are_batched():
    model = PixelModel()
    predict_tiled(model, _image(200, 200), tile=64, overlap=0.125, batch_size=4, margin=0)
    n_tiles = sum(s[0] for s in model.batch_shapes)
    assert n_tiles == 16 and all(s[0] == 4 for s in model.batch_shapes)


def test_wrong_channel_count_is_refused():
    with pytest.raises(CellsegError, match="channel"):
        predict_tiled(PixelModel(), np.zeros((2, 40, 40), np.float32))


@pytest.fixture(scope="module")
def unet_model():
    torch.manual_seed(0)
    net = UNet(1, 3, depth=2, base_channels=8)
    with torch.no_grad():
        net.head[-1].weight.mul_(20)  # sharper probabilities than a fresh init gives, so differences show
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tiles: threads only contend on a shared machine
    yield TorchModel(net, Config(), device="cpu")
    torch.set_num_threads(threads)


def test_tiled_unet_agrees_with_a_single_whole_image_pass(unet_model):
    img = _image(150, 190, seed=4)
    whole = predict_tiled(unet_model, img, tile=1024)  # one tile holding the whole padded image
    tiled = predict_tiled(unet_model, img, tile=64, overlap=0.25, batch_size=8)
    diff = np.abs(tiled - whole)
    assert diff.mean() < 1e-2 and diff.max() < 0.1, (diff.mean(), diff.max())
    # and far from the image border, the mirror margin changes nothing compared to a plain pass
    with torch.no_grad():
        plain = torch.softmax(predict_logits(unet_model.net, torch.from_numpy(img)[None, None]), 1)[0].numpy()
    assert np.abs(whole - plain)[:, 40:-40, 40:-40].max() < 1e-4


# -------------------------------------------------------------------------------- predict_many


def test_predict_many_batches_across_images_and_matches_predict_tiled():
    shapes = [(100, 90), (40, 30), (150, 200)]
    images = [(f"img{i}", _image(*s, seed=i)) for i, s in enumerate(shapes)]
    model = PixelModel()
    out = dict(predict_many(model, iter(images), tile=64, overlap=0.125, batch_size=8))
    assert set(out) == {"img0", "img1", "img2"}
    for key, img in images:
        assert out[key].shape == (3, *img.shape)
        np.testing.assert_allclose(out[key], predict_tiled(PixelModel(), img, tile=64, overlap=0.125), atol=1e-6)
    # each image has its own balanced tile shape, and a batch holds tiles of one shape
    assert all(1 <= s[0] <= 8 for s in model.batch_shapes)
    assert len({s[2:] for s in model.batch_shapes}) >= 2


def test_predict_many_fills_batches_across_images_of_one_size():
    images = [(f"img{i}", _image(100, 90, seed=i)) for i in range(3)]
    model = PixelModel()
    out = dict(predict_many(model, iter(images), tile=64, overlap=0.125, batch_size=8))
    assert sorted(out) == ["img0", "img1", "img2"]
    # 164 x 154 padded (32 px margin): 3 x 3 tiles of 64 x 64 per image, 27 in all:
    # batches of 8 across images, all full but the last (image by image: 2 + 2 + 2 each)
    assert [s[0] for s in model.batch_shapes] == [8, 8, 8, 3]
    assert {s[2:] for s in model.batch_shapes} == {(64, 64)}


def test_balanced_tile_keeps_the_tile_count_and_computes_fewer_pixels():
    for size in (100, 584, 760, 2112, 10064):
        n = len(tile_positions(size, 512, 0.125, 8))
        side = balanced_tile(size, 512, 0.125, 8)
        assert side % 8 == 0 or side == size
        assert side <= 512 and len(tile_positions(size, side, 0.125, 8)) == n
        if size > 512:
            assert side < 512  # every size here has room to shrink
    assert balanced_tile(584, 512, 0.125, 8) == 312  # 2 x 312 px instead of 2 x 512 px


def test_predict_many_with_unet_matches_predict_tiled(unet_model):
    images = [(i, _image(h, w, seed=10 + i)) for i, (h, w) in enumerate([(70, 90), (30, 20), (120, 64)])]
    out = dict(predict_many(unet_model, images, tile=64, overlap=0.25, batch_size=6))
    for key, img in images:
        np.testing.assert_allclose(out[key], predict_tiled(unet_model, img, tile=64, overlap=0.25), atol=1e-5)


def test_predict_many_reads_images_lazily():
    pulled = []

    def images():
        for i in range(50):
            pulled.append(i)
            yield i, _image(100, 100, seed=i)

    it = predict_many(PixelModel(), images(), tile=64, overlap=0.125, batch_size=4, margin=0)
    key, _ = next(it)
    assert key == 0 and len(pulled) <= 2  # not the whole dataset in memory
    assert [k for k, _ in it] == list(range(1, 50))


def test_tile_batcher_step_returns_finished_images():
    b = TileBatcher(PixelModel(), tile=64, overlap=0.0, batch_size=2, margin=0)
    b.add("a", _image(64, 128))  # two tiles
    b.add("b", _image(64, 64))  # one tile
    assert b.pending == 3
    assert [k for k, _ in b.step()] == ["a"]
    assert [k for k, _ in b.step()] == ["b"]
    assert b.pending == 0 and b.step() == []


# ----------------------------------------------------------------------------------- providers


def test_available_providers_cpu():
    assert available_providers("cpu") == ["CPUExecutionProvider"]


def test_available_providers_auto_is_quiet(capfd):
    providers = available_providers("auto")
    assert providers[-1] == "CPUExecutionProvider"
    if not cuda_usable():  # this machine: no GPU, although onnxruntime-gpu lists CUDA
        assert providers == ["CPUExecutionProvider"]
        with pytest.raises(CellsegError, match="--device cuda"):
            available_providers("cuda")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_available_providers_rejects_unknown_device():
    with pytest.raises(CellsegError, match="expected auto, cpu, cuda"):
        available_providers("gpu")


def test_mask_sink_matches_thresholding_the_whole_probabilities():
    from cellseg.inference import MaskSink
    from cellseg.postprocess import threshold_probabilities

    img = _image(300, 170, seed=3)
    probs = predict_tiled(PixelModel(), img, tile=64, overlap=0.25)
    ((_, (seeds, fg)),) = predict_many(PixelModel(), [("a", img)], tile=64, overlap=0.25,
                                        sink=lambda key, h, w: MaskSink(h, w, 0.4, 0.6))
    want_seeds, want_fg = threshold_probabilities(probs, 0.4, 0.6)
    np.testing.assert_array_equal(seeds, want_seeds)
    np.testing.assert_array_equal(fg, want_fg)


def test_accumulator_of_a_tall_image_stays_a_band():
    """Rows are finished and handed on as tile rows complete: the accumulator never holds the image."""
    import cellseg.inference as inf

    seen = []
    real_add = inf._Job.add

    def add(self, *a, **k):
        real_add(self, *a, **k)
        if self.acc is not None:
            seen.append(self.acc.shape[1])

    img = _image(2000, 100, seed=5)
    from unittest import mock

    with mock.patch.object(inf._Job, "add", add):
        probs = predict_tiled(PixelModel(), img, tile=128, overlap=0.125, batch_size=4)
    assert probs.shape == (3, 2000, 100)
    assert max(seen) <= 2 * 128  # at most two tile rows open at once, never 2000 rows
    np.testing.assert_allclose(probs, predict_tiled(PixelModel(), img, tile=2048), atol=1e-5)


def test_flip_average_is_flip_equivariant_and_keeps_attributes(unet_model):
    from cellseg.inference import FlipAverage

    tta = FlipAverage(unet_model)
    assert tta.size_multiple == unet_model.size_multiple and tta.low_percentile == unet_model.low_percentile
    x = _image(64, 48, seed=7)[None, None]
    out = tta(x)
    assert out.shape == (1, 3, 64, 48)
    # averaging over the flip group makes the output of a flipped input the flipped output
    np.testing.assert_allclose(tta(np.ascontiguousarray(x[..., ::-1])), out[..., ::-1], atol=1e-5)
    assert not np.allclose(out, unet_model(x), atol=1e-6)  # a random U-Net is not flip-invariant


def test_thread_counts_are_bounded_by_the_machine(tmp_path):
    import os

    from cellseg import resolve

    most = 4 * (os.cpu_count() or 1)
    assert check_threads(0) == 0 and check_threads(most) == most
    for bad, msg in ((-1, "expected 0"), (most + 1, f"use at most {most}"), (100000, f"use at most {most}")):
        with pytest.raises(CellsegError, match=msg):
            check_threads(bad)
    before = torch.get_num_threads()
    with pytest.raises(CellsegError, match=f"--threads {most + 1}"):
        resolve._torch(tmp_path / "any.pt", "cpu", most + 1, "file", "x")  # refused before torch is touched
    assert torch.get_num_threads() == before
