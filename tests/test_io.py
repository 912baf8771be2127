"""Reading images and masks in the formats microscopes write, and refusing bad files by name."""

import os
import warnings

import cv2
import numpy as np
import pytest
import tifffile

from cellseg.data.io import decode_image, image_shape, normalize_percentile, read_image, read_mask, read_pixels, semantic_to_instances, write_labels_tiff
from cellseg.errors import CellsegError


def test_png_grey_and_rgb(tmp_path):
    grey = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(64, 48)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    assert read_image(tmp_path / "g.png").shape == (64, 48)
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 2] = 90  # pure blue stain (RGB order) stays visible
    cv2.imwrite(str(tmp_path / "c.png"), rgb[..., ::-1])
    img = read_image(tmp_path / "c.png")
    assert img.shape == (10, 12) and np.allclose(img, 30)
    pixels = read_pixels(str(tmp_path / "c.png"))  # channels as stored, RGB order, for callers that need colour
    assert pixels.shape == (10, 12, 3) and pixels.dtype == np.uint8 and np.array_equal(pixels, rgb)
    with pytest.raises(CellsegError, match=r"nope.png: no such file"):
        read_pixels(tmp_path / "nope.png")


def _he_like(size=64):
    """RGB uint8, H&E-like: near-white background, a pink (eosin) band, purple nuclei."""
    yy, xx = np.mgrid[:size, :size]
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[:] = (235, 228, 240)
    rgb[:, : size // 3] = (225, 150, 200)
    for cy, cx in ((16, 16), (40, 44), (48, 14)):
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = (110, 50, 150)
    return rgb


def test_colour_with_a_bright_background_reads_as_its_darkest_channel(tmp_path):
    """Transmitted-light colour (H&E): the darkest channel of each pixel (the stain's absorbance),
    PNG and planar RGB TIFF alike; a dark-background colour image (fluorescence) stays the mean, as
    a pure blue stain has nothing in its darkest channel; grey stored as RGB reads as its grey."""
    rgb = _he_like()
    cv2.imwrite(str(tmp_path / "he.png"), rgb[..., ::-1])
    tifffile.imwrite(tmp_path / "he.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    for name in ("he.png", "he.tif"):
        img = read_image(tmp_path / name)
        assert img.dtype == np.float32 and np.array_equal(img, rgb.min(axis=-1))
    assert decode_image((tmp_path / "he.png").read_bytes(), "he.png").tolist() == rgb.min(axis=-1).tolist()  # the Ray engine's path
    assert read_image(tmp_path / "he.png", keep_integer=True).dtype == np.uint8  # infer keeps it small
    dapi = np.zeros((64, 64, 3), np.uint8)
    dapi[20:40, 20:40, 2] = 200
    cv2.imwrite(str(tmp_path / "dapi.png"), dapi[..., ::-1])
    assert np.allclose(read_image(tmp_path / "dapi.png"), dapi.mean(axis=-1))
    grey = rgb.mean(axis=-1).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "grey_rgb.png"), np.repeat(grey[..., None], 3, axis=-1))
    assert np.array_equal(read_image(tmp_path / "grey_rgb.png"), grey)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.float32])
def test_tiff_bit_depths(tmp_path, dtype):
    arr = (np.arange(100).reshape(10, 10) * 3).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", arr)
    assert np.array_equal(read_image(tmp_path / "a.tif"), arr.astype(np.float32))


def test_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 60
    rgba[..., 3] = 255
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    assert np.allclose(read_image(tmp_path / "a.png"), 60)


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CellsegError, match=r"empty.png: empty file \(0 bytes\)"):
        read_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("hello, not an image")
    with pytest.raises(CellsegError, match="text.png: cannot decode image"):
        read_image(tmp_path / "text.png")
    with pytest.raises(CellsegError, match="missing.tif: no such file"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "a.bmp").write_bytes(b"xx")
    with pytest.raises(CellsegError, match="unsupported file type '.bmp'"):
        read_image(tmp_path / "a.bmp")
    nan = np.ones((5, 5), np.float32)
    nan[2, 2] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    with pytest.raises(CellsegError, match="nan.tif: image contains NaN or infinite values"):
        read_image(tmp_path / "nan.tif")
    huge = np.ones((5, 5))
    huge[1, 1] = 1e300  # finite, but not in float32: said so, without numpy's overflow warning
    tifffile.imwrite(tmp_path / "huge.tif", huge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CellsegError, match=r"huge.tif: values up to 1e\+300, beyond float32's range; rescale the image"):
            read_image(tmp_path / "huge.tif")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 16, 16), np.uint16))
    tifffile.imwrite(tmp_path / "zc.tif", np.zeros((2, 3, 16, 16), np.uint8))
    with pytest.MonkeyPatch.context() as mp:  # refused from the header: a huge stack's pixels are never read
        mp.setattr(tifffile.TiffPageSeries, "asarray", lambda *a, **k: pytest.fail("pixels read"))
        with pytest.raises(CellsegError, match="stack.tif: 5 planes of 16x16"):
            read_image(tmp_path / "stack.tif")
        with pytest.raises(CellsegError, match=r"zc.tif: 4-D image of shape \(2, 3, 16, 16\); expected a 2-D grey or RGB image"):
            read_image(tmp_path / "zc.tif")
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((20, 16, 2), np.uint16), photometric="minisblack", planarconfig="contig")
    with pytest.raises(CellsegError, match=r"two.tif: 20x16 image with 2 channels \(YXS\); pick the nuclear stain with --channel K \(or train with it: the model then reads it\), or save it"):
        read_image(tmp_path / "two.tif")


def test_a_channel_is_picked_not_averaged(tmp_path):
    """Stain channels (ImageJ CYX, YXC) are never averaged like colours: --channel picks one, and
    of an RGB image it picks a colour (the blue of DAPI) instead of the mean."""
    planes = np.stack([np.full((20, 24), 10 * (i + 1), np.uint16) for i in range(3)])
    tifffile.imwrite(tmp_path / "cyx.tif", planes, imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "yxc.tif", np.moveaxis(planes[:2], 0, -1), metadata={"axes": "YXC"})
    rgb = np.moveaxis(planes, 0, -1).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb[..., ::-1])
    for name, axes, n in (("cyx.tif", "CYX", 3), ("yxc.tif", "YXC", 2)):
        with pytest.raises(CellsegError) as e:
            read_image(tmp_path / name)
        assert str(e.value) == (f"{tmp_path / name}: 20x24 image with {n} channels ({axes}); pick the nuclear stain "
                                "with --channel K (or train with it: the model then reads it), or save it as its own 2-D image")
        assert read_image(tmp_path / name, channel=1).tolist() == planes[1].tolist()
        with pytest.raises(CellsegError, match=f"{name}: channel {n} \\(--channel, or the one the model was trained on\\): the image has {n} channels \\(0 to {n - 1}\\)$"):
            read_image(tmp_path / name, channel=n)
    assert read_image(tmp_path / "rgb.png").mean() == 20  # colours averaged by default
    assert read_image(tmp_path / "rgb.png", channel=2, keep_integer=True).tolist() == planes[2].tolist()
    assert decode_image((tmp_path / "cyx.tif").read_bytes(), "cyx.tif", channel=0).mean() == 10  # the Ray engine's path
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), planes[0].astype(np.uint8))
    assert read_image(grey, channel=2).mean() == 10  # a grey image is its own channel


def test_samples_of_a_grey_tiff_are_channels_not_colours(tmp_path):
    """A min-is-black TIFF page with 3 samples (no axes metadata) holds stains: refused without
    --channel, like ImageJ's CYX; RGB-tagged samples stay colours; a grey page's alpha is dropped."""
    planes = np.stack([np.full((20, 24), 10 * (i + 1), np.uint16) for i in range(3)])
    tifffile.imwrite(tmp_path / "contig.tif", np.moveaxis(planes, 0, -1), photometric="minisblack", planarconfig="contig", metadata=None)
    tifffile.imwrite(tmp_path / "planar.tif", planes, photometric="minisblack", planarconfig="separate", metadata=None)
    for name, axes in (("contig.tif", "YXS"), ("planar.tif", "SYX")):
        with pytest.raises(CellsegError) as e:
            read_image(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: 20x24 image with 3 channels ({axes}); pick the nuclear stain")
        assert read_image(tmp_path / name, channel=2).tolist() == planes[2].tolist()
    tifffile.imwrite(tmp_path / "rgb.tif", planes.astype(np.uint8), photometric="rgb", planarconfig="separate")
    assert read_image(tmp_path / "rgb.tif").mean() == 20  # colours: averaged
    opaque = np.full((20, 24), 65535, np.uint16)
    tifffile.imwrite(tmp_path / "alpha.tif", np.stack([planes[0], opaque], -1), photometric="minisblack", extrasamples=["unassalpha"])
    assert read_image(tmp_path / "alpha.tif").tolist() == planes[0].tolist()
    # two stains and an alpha: the alpha is dropped, the stains stay stains
    tifffile.imwrite(tmp_path / "two_alpha.tif", np.stack([planes[0], planes[1], opaque], -1), photometric="minisblack",
                     extrasamples=["unspecified", "unassalpha"])
    with pytest.raises(CellsegError, match="two_alpha.tif: 20x24 image with 2 channels"):
        read_image(tmp_path / "two_alpha.tif")
    assert read_image(tmp_path / "two_alpha.tif", channel=1).tolist() == planes[1].tolist()
    # a mask saved as a grey page with equal samples reads as labels, like an RGB one
    labels = np.zeros((20, 24), np.uint16)
    labels[2:8, 3:9], labels[10:15, 12:20] = 1, 2
    tifffile.imwrite(tmp_path / "mask3.tif", np.stack([labels] * 3, -1), photometric="minisblack", planarconfig="contig")
    assert read_mask(tmp_path / "mask3.tif").tolist() == labels.tolist()


def test_a_complex_tiff_is_refused_not_cut_to_its_real_part(tmp_path):
    tifffile.imwrite(tmp_path / "fft.tif", np.full((8, 8), 1 + 2j, np.complex64))
    with pytest.raises(CellsegError, match=r"fft.tif: complex-valued image \(complex64\); expected real intensities$"):
        read_image(tmp_path / "fft.tif")


def test_a_jpeg_mask_is_refused(tmp_path):
    """JPEG's compression changes label values: objects merge and appear (evaluate scored such masks)."""
    labels = np.zeros((32, 32), np.uint8)
    labels[4:12, 4:12], labels[16:28, 10:20] = 1, 2
    cv2.imwrite(str(tmp_path / "m.jpg"), labels)
    with pytest.raises(CellsegError, match=r"m.jpg: a JPEG mask: JPEG compression changes the labels .*save masks as PNG or TIFF$"):
        read_mask(tmp_path / "m.jpg")


def test_truncated_png(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "t.png"), img)
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(CellsegError, match="t.png: cannot decode image"):
        read_image(tmp_path / "t.png")


def test_normalize_percentile():
    img = np.linspace(0, 1000, 9999, dtype=np.float32).reshape(101, 99)
    out = normalize_percentile(img, 1, 99)
    assert out.dtype == np.float32
    assert abs(np.percentile(out, 1)) < 1e-4 and abs(np.percentile(out, 99) - 1) < 1e-4
    assert np.all(normalize_percentile(np.full((4, 4), 7.0)) == 0)


def test_masks_instance_and_semantic(tmp_path):
    lab = np.zeros((20, 20), np.uint16)
    lab[2:6, 2:6] = 3
    lab[10:15, 10:15] = 70000 % 65536
    cv2.imwrite(str(tmp_path / "m.png"), lab)
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == np.int32 and set(np.unique(out)) == {0, 3, 70000 % 65536}
    sem = np.zeros((12, 20), np.uint8)
    sem[2:10, 2:8] = 1
    sem[2:10, 8] = 2  # edge between two touching cells
    sem[2:10, 9:15] = 1
    inst = semantic_to_instances(sem)
    assert inst.max() == 2 and (inst[2:10, 8] > 0).all()
    cv2.imwrite(str(tmp_path / "s.png"), sem)
    assert read_mask(tmp_path / "s.png", semantic=True).max() == 2
    with pytest.raises(CellsegError, match="semantic mask has values above 2"):
        read_mask(tmp_path / "m.png", semantic=True)


def test_float_mask_with_fractions_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.full((4, 4), 0.5, np.float32))
    with pytest.raises(CellsegError, match="f.tif: mask has non-integer values"):
        read_mask(tmp_path / "f.tif")


def test_labels_tiff_dtype(tmp_path):
    lab = np.zeros((4, 4), np.int64)
    lab[0, 0] = 5
    write_labels_tiff(tmp_path / "a.tif", lab)
    assert tifffile.imread(tmp_path / "a.tif").dtype == np.uint16
    lab[1, 1] = 70000
    write_labels_tiff(tmp_path / "b.tif", lab)
    back = tifffile.imread(tmp_path / "b.tif")
    assert back.dtype == np.uint32 and back[1, 1] == 70000
    assert not list(tmp_path.glob(".*tmp*"))


def test_inverted_if_bright_turns_bright_backgrounds_dark():
    from cellseg.data.io import inverted_if_bright

    rng = np.random.default_rng(0)
    dark = rng.uniform(0.0, 0.2, (64, 80)).astype(np.float32)
    dark[20:30, 20:30] = 1.0  # a bright nucleus on a dark background: unchanged
    out = dark.copy()
    assert inverted_if_bright(out) is False
    np.testing.assert_array_equal(out, dark)
    bright = 1.0 - dark  # brightfield-like: a dark nucleus on a bright background
    out = bright.copy()
    assert inverted_if_bright(out) is True  # in place
    np.testing.assert_allclose(out, dark, atol=1e-6)
    assert out[25, 25] > out[5, 5]  # the nucleus is the bright part now
    out = bright.copy()
    assert inverted_if_bright(out, enabled=False) is False
    np.testing.assert_array_equal(out, bright)
    # through normalize_percentile, for raw uint16 pixels
    raw = (bright * 60000).astype(np.uint16)
    norm = normalize_percentile(raw, 1, 99.8, invert_bright=True)
    assert norm[25, 25] > 0.9 and np.median(norm) < 0.5
    assert np.median(normalize_percentile(raw, 1, 99.8)) > 0.5


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_percentile_range_of_integer_images_matches_numpy(dtype):
    from cellseg.data.io import percentile_range

    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 1000, 100_003):
        img = rng.integers(0, np.iinfo(dtype).max, (n, 1)).astype(dtype)
        for q in ((1, 99.8), (0, 100), (13, 71)):
            np.testing.assert_allclose(percentile_range(img, *q), np.percentile(img.astype(np.float32), q), rtol=1e-12)


def test_read_image_keep_integer(tmp_path):
    img = (np.arange(60 * 70).reshape(60, 70) % 4000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", img)
    kept = read_image(tmp_path / "a.tif", keep_integer=True)
    assert kept.dtype == np.uint16 and np.array_equal(kept, img)
    assert read_image(tmp_path / "a.tif").dtype == np.float32
    np.testing.assert_allclose(normalize_percentile(kept), normalize_percentile(read_image(tmp_path / "a.tif")), atol=1e-6)


def test_binary_masks_are_refused_by_name(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[2:8, 2:8] = 255
    mask[2:8, 9:15] = 255  # one object cut by a 1-px line: two pieces, still one instance
    cv2.imwrite(str(tmp_path / "cut.png"), mask)
    assert read_mask(tmp_path / "cut.png").max() == 255
    mask[20:30, 20:30] = 255
    cv2.imwrite(str(tmp_path / "binary.png"), mask)
    with pytest.raises(CellsegError, match=r"binary.png: one label \(255\) covers 3 separate objects: a binary mask"):
        read_mask(tmp_path / "binary.png")
    mask[20:30, 20:30] = 7
    cv2.imwrite(str(tmp_path / "two.png"), mask)  # two labels: instance masks
    assert set(np.unique(read_mask(tmp_path / "two.png"))) == {0, 7, 255}
    # a 3-class mask (0 background, 1 cell, 2 edge) without --semantic-masks: many cells under label 1
    sem = np.zeros((40, 40), np.uint8)
    for r, c in ((2, 2), (2, 20), (20, 2), (20, 20)):
        sem[r : r + 10, c : c + 10] = 2
        sem[r + 1 : r + 9, c + 1 : c + 9] = 1
    cv2.imwrite(str(tmp_path / "sem.png"), sem)
    with pytest.raises(CellsegError, match=r"sem.png: label 1 covers 4 separate objects .* train on it with data.semantic_masks: true in the --config file, evaluate it with --semantic-masks$"):
        read_mask(tmp_path / "sem.png")
    assert read_mask(tmp_path / "sem.png", semantic=True).max() == 4
    pair = np.zeros((40, 40), np.uint8)
    pair[2:12, 2:12], pair[20:30, 20:30] = 1, 2  # two instances labelled 1 and 2
    cv2.imwrite(str(tmp_path / "pair.png"), pair)
    assert set(np.unique(read_mask(tmp_path / "pair.png"))) == {0, 1, 2}
    mask[mask == 7] = 0
    mask[30:33, 35:38] = 255  # a small speck beside the object is not another object
    cv2.imwrite(str(tmp_path / "speck.png"), mask)
    assert read_mask(tmp_path / "speck.png").max() == 255


def test_an_intensity_image_is_refused_as_a_mask(tmp_path):
    """images/ and masks/ swapped: a micrograph read as labels (each grey value an 'object' of scattered
    pixels) is refused; instance labels of touching small cells, and a few 1-px objects, are not."""
    from cellseg.data.synth import synth_image

    image, _ = synth_image(np.random.default_rng(0), (96, 96))
    tifffile.imwrite(tmp_path / "swapped.tif", image)
    with pytest.raises(CellsegError, match=r"swapped.tif: \d+% of its labelled pixels have no neighbour of the same label: "
                                           r"an intensity image, not instance labels \(images/ and masks/ swapped\?\)"):
        read_mask(tmp_path / "swapped.tif")
    tiles = (np.arange(96)[:, None] // 3 * 32 + np.arange(96)[None, :] // 3 + 1).astype(np.uint16)  # 3x3 px cells, all touching
    tiles[0:96:2, 0:8:2] = (np.arange(48 * 4).reshape(48, 4) + 2000)  # 192 one-pixel objects (2% of the pixels): dots
    for k in range(3):  # 1-px diagonal lines (3% of the pixels): each 8-connected, one object
        tiles[np.arange(4, 94), np.arange(4, 94) - k * 2 + 2] = 3000 + k
    tifffile.imwrite(tmp_path / "tiled.tif", tiles)
    assert np.array_equal(read_mask(tmp_path / "tiled.tif"), tiles)


def test_make_writable_folder_creates_and_probes(tmp_path):
    from cellseg.data.io import make_writable_folder

    make_writable_folder(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())  # no probe left
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError):
        make_writable_folder(tmp_path / "f" / "sub")


def test_a_corrupt_tiff_is_reported_once(tmp_path, caplog):
    """tifffile's own log line about the broken file stays out of the output; cellseg's error names it."""
    import logging

    (tmp_path / "fake.tif").write_bytes(b"II*\x00garbage")
    with caplog.at_level(logging.DEBUG, logger="tifffile"):
        with pytest.raises(CellsegError, match="fake.tif: cannot decode image"):
            read_image(tmp_path / "fake.tif")
        logging.getLogger("tifffile").warning("outside a read")  # other tifffile messages still pass
    assert [r.getMessage() for r in caplog.records if r.name == "tifffile"] == ["outside a read"]


def test_an_unreadable_file_says_permission_denied(tmp_path, monkeypatch):
    import cellseg.data.io as io_mod

    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((8, 8), np.uint8))
    def denied(*a, **kw):  # as for mode 000 (root reads anyway)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(io_mod.np, "fromfile", denied)
    with pytest.raises(CellsegError, match=r"a.png: permission denied \(cannot read the file\)$"):
        io_mod.read_pixels(path)
    tif = tmp_path / "b.tif"
    tifffile.imwrite(tif, np.zeros((8, 8), np.uint8))
    tif.chmod(0)
    if not os.access(tif, os.R_OK):  # not root: the real thing
        with pytest.raises(CellsegError, match=r"b.tif: permission denied \(cannot read the file\)$"):
            io_mod.read_pixels(tif)


def test_image_shape_from_the_header(tmp_path):
    cv2.imwrite(str(tmp_path / "g.png"), np.zeros((30, 50), np.uint16))
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((20, 40, 3), np.uint8))
    tifffile.imwrite(tmp_path / "planar.tif", np.zeros((3, 20, 40), np.uint8), photometric="rgb", planarconfig="separate")
    for name, shape in (("g.png", (30, 50)), ("rgb.tif", (20, 40)), ("planar.tif", (20, 40))):
        assert image_shape(tmp_path / name) == shape == read_image(tmp_path / name).shape
        assert image_shape((tmp_path / name).read_bytes()) == shape
    cv2.imwrite(str(tmp_path / "j.jpg"), np.zeros((8, 8), np.uint8))
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    os.mkfifo(tmp_path / "fifo.png")  # never opened: that would wait for a writer
    for name in ("j.jpg", "junk.tif", "missing.png", "fifo.png"):  # unknown: the read that follows says what is wrong
        assert image_shape(tmp_path / name) is None


def test_missing_reason_says_permission_denied(tmp_path, monkeypatch):
    from cellseg.data import io as cio

    assert cio.missing_reason(tmp_path / "nope.png") == "no such file"

    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cio.os, "lstat", denied)  # as for a file in a folder this user cannot search (tests run as root)
    assert cio.missing_reason(tmp_path / "locked" / "a.png") == "permission denied (a folder on its path cannot be searched)"


@pytest.mark.parametrize("compression", ["lzw", "zstd", "deflate"])
def test_compressed_tiffs_are_read(tmp_path, compression):
    """Fiji's "LZW" TIFFs, OpenCV's default TIFF (LZW) and zstd need tifffile's imagecodecs."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (40, 52), dtype=np.uint16)
    labels = np.zeros((40, 52), np.uint16)
    labels[5:15, 5:20], labels[20:30, 30:45] = 1, 7
    tifffile.imwrite(tmp_path / "img.tif", image, compression=compression)
    tifffile.imwrite(tmp_path / "mask.tif", labels, compression=compression)
    assert np.array_equal(read_image(tmp_path / "img.tif"), image.astype(np.float32))
    assert np.array_equal(read_mask(tmp_path / "mask.tif"), labels)
    cv2.imwrite(str(tmp_path / "cv.tif"), image)  # OpenCV writes LZW by default
    assert np.array_equal(read_image(tmp_path / "cv.tif"), image.astype(np.float32))


def test_labels_past_int32_are_renumbered_not_wrapped(tmp_path):
    mask = np.zeros((20, 20), np.uint32)
    mask[2:8, 2:8], mask[10:16, 10:16] = 2**31 + 5, 4_000_000_000
    tifffile.imwrite(tmp_path / "big.tif", mask)
    got = read_mask(tmp_path / "big.tif")
    assert got.dtype == np.int32 and got.min() == 0 and sorted(np.unique(got)) == [0, 1, 2]
    assert np.array_equal(got > 0, mask > 0) and got[3, 3] != got[12, 12]
    mask[mask == 0] = 7  # no background: every id stays an object
    tifffile.imwrite(tmp_path / "full.tif", mask)
    assert sorted(np.unique(read_mask(tmp_path / "full.tif"))) == [1, 2, 3]
    huge = np.zeros((20, 20), np.uint64)
    huge[2:8, 2:8], huge[10:16, 10:16], huge[0, 0] = 2**63 + 5, 2**64 - 1, 5  # past int64 too: not 5 and -1
    tifffile.imwrite(tmp_path / "huge.tif", huge)
    got = read_mask(tmp_path / "huge.tif")
    assert sorted(np.unique(got)) == [0, 1, 2, 3] and len({got[0, 0], got[3, 3], got[12, 12]}) == 3
