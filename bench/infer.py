"""Benchmark: tiled inference speed and peak memory, cellseg/onnxruntime vs PyTorch eager vs MONAI.

Usage: python bench/infer.py [--quick] [--model PATH] [--checkpoint PATH] [--large N] [--big N] ...

Every configuration runs in a fresh Python process, so its peak RSS (VmHWM of /proc/self/status;
onnxruntime's allocations are invisible to tracemalloc, and ru_maxrss survives exec on Linux) is
its own, on the same images: a few real DSB 2018 images (one per common image shape, from
../shared/data/dsb2018-train/images relative to the project root; skipped when absent) and one
large synthetic image (tiles of a synthetic fluorescence image). Backends:

  (1) cellseg: ``OnnxModel`` (onnxruntime, CPU) through ``predict_many``;
  (2) the same network in PyTorch eager (``TorchModel``) through the same ``predict_many``;
  (3) MONAI ``sliding_window_inference(mode="gaussian")`` with the same torch network, tile and
      overlap, blending softmax probabilities like cellseg (one image at a time).

Then a sweep of onnxruntime settings for (1) (graph optimisation, threads, spinning, tile size,
batch size, int8 quantisation), a roofline (FLOPs per megapixel of the model vs the machine's
fp32 matmul peak measured in the same run) and a peak-memory check on a 10k x 10k 16-bit TIFF.
Results: bench/results/infer.json (and a table on stdout).

The model is --model (a cellseg ONNX file), else models/cellseg-nuclei.onnx when it exists, else
the shipped architecture (U-Net depth 3, base 16) with random weights, exported here. The speed of
a dense CNN does not depend on the weights. PyTorch/MONAI use the weights of --checkpoint, or the
random weights (when the ONNX file comes from elsewhere: same architecture, read from its metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DSB_DIR = ROOT.parent / "shared" / "data" / "dsb2018-train" / "images"
SHIPPED = ROOT / "models" / "cellseg-nuclei.onnx"
SHIPPED_CFG = ROOT / "models" / "cellseg-nuclei.yaml"
RESULTS = ROOT / "bench" / "results"


# ------------------------------------------------------------------------------------ measurement


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident set size (VmRSS), MiB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    VmHWM (the high-water mark of this address space, new at exec) where /proc exists: Linux
    carries ru_maxrss over execve, so a fresh interpreter started from a big parent would report
    the parent's size. ru_maxrss elsewhere.
    """
    if os.path.exists("/proc/self/status"):
        return _status_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Counted:
    """Wraps a tile model: counts the tile pixels it computes and the time spent inside it.

    With `sample_batches` > 0 only the first that many calls run the model; later calls return
    zero logits of the right shape (memory-only check of the tiling on a huge image).
    """

    def __init__(self, model, sample_batches: int = 0):
        self.model = model
        self.size_multiple = getattr(model, "size_multiple", 1)
        self.in_channels = getattr(model, "in_channels", 0)
        self.sample_batches = sample_batches
        self.calls = 0
        self.pixels = 0
        self.model_pixels = 0  # pixels the real model computed
        self.seconds = 0.0

    def __getattr__(self, name):  # low_percentile, postprocess, provider, ... of the wrapped model
        return getattr(self.__dict__["model"], name)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n, _, h, w = batch.shape
        m = self.size_multiple
        px = n * (-(-h // m) * m) * (-(-w // m) * m)
        self.calls += 1
        self.pixels += px
        if self.sample_batches and self.calls > self.sample_batches:
            # a stand-in for the network past the sampled batches: bright pixels are cells, so
            # post-processing still sees objects (memory of the whole `infer` path stays realistic)
            x = batch[:, :1]
            return np.concatenate([np.zeros_like(x), 8 * (x - 0.5), np.full_like(x, -2.0)], axis=1)
        t0 = time.perf_counter()
        out = self.model(batch)
        self.seconds += time.perf_counter() - t0
        self.model_pixels += px
        return out


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), platform.processor())
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "loadavg_1min": os.getloadavg()[0],
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------------------ images


def pick_dsb(n: int) -> list[Path]:
    """Up to n DSB images: the first image (by name) of each shape, most frequent shapes first."""
    if n <= 0 or not DSB_DIR.is_dir():
        return []
    import cv2

    by_shape: dict[tuple, list[Path]] = {}
    for p in sorted(DSB_DIR.glob("*.png")):
        # the PNG header holds the size; reading it whole is fast enough for 700 files
        shape = cv2.imread(str(p), cv2.IMREAD_UNCHANGED).shape[:2]
        by_shape.setdefault(shape, []).append(p)
    shapes = sorted(by_shape, key=lambda s: (-len(by_shape[s]), s))
    return [by_shape[s][0] for s in shapes[:n]]


def synthetic_uint16(size: int, seed: int = 0) -> np.ndarray:
    """(size, size) uint16: a 1024x1024 synthetic nuclei image repeated (mirrored) to fill."""
    from cellseg.data.synth import synth_image

    base, _ = synth_image(np.random.default_rng(seed), min(size, 1024))
    reps = -(-size // base.shape[0])
    tile = np.block([[base if (i + j) % 2 == 0 else base[::-1, ::-1] for j in range(2)] for i in range(2)])
    out = np.tile(tile, (reps // 2 + 1, reps // 2 + 1))[:size, :size]
    return np.ascontiguousarray(out)


def load_images(spec: dict, low: float, high: float) -> list[tuple[str, np.ndarray]]:
    """The normalised images of one image set of a worker spec."""
    from cellseg.data.io import normalize_percentile, read_image

    if "files" in spec:
        return [(Path(f).stem[:12], normalize_percentile(read_image(f), low, high)) for f in spec["files"]]
    return [(f"synthetic{spec['size']}", normalize_percentile(synthetic_uint16(spec["size"]), low, high))]


# ------------------------------------------------------------------------------------------- worker


def _build_torch(cfg_spec: dict):
    import torch

    from cellseg.config import Config, apply_overrides
    from cellseg.model import UNet

    a = cfg_spec["arch"]
    net = UNet(a["in_channels"], 3, a["depth"], a["base_channels"])
    net.load_state_dict(torch.load(cfg_spec["weights"], map_location="cpu", weights_only=True))
    cfg = apply_overrides(
        Config(),
        {"model.depth": a["depth"], "model.base_channels": a["base_channels"], "model.in_channels": a["in_channels"],
         "data.low_percentile": cfg_spec["low"], "data.high_percentile": cfg_spec["high"]},
    )
    return net.eval(), cfg


def _monai_runner(net, tile: int, overlap: float, batch: int, counter: Counted):
    """predict_many-like callable over MONAI's sliding_window_inference (softmax probabilities blended)."""
    import torch
    from monai.inferers import sliding_window_inference

    mult = net.size_multiple

    def predictor(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        counter.calls += 1
        counter.pixels += n * h * w
        counter.model_pixels += n * h * w
        t0 = time.perf_counter()
        out = torch.softmax(net(x), dim=1)
        counter.seconds += time.perf_counter() - t0
        return out

    def run(images):
        for key, img in images:
            h, w = img.shape
            # like cellseg, a tile never exceeds the (multiple-rounded) image: no 512x512 tile for a 256x256 image
            roi = (min(tile, -(-h // mult) * mult), min(tile, -(-w // mult) * mult))
            x = torch.from_numpy(img)[None, None]
            with torch.inference_mode():
                probs = sliding_window_inference(x, roi, batch, predictor, overlap=overlap, mode="gaussian")
            yield key, probs[0].numpy()

    return run


def worker(spec: dict) -> dict:
    """Run one configuration on its image sets; returns throughput and memory numbers."""
    threads = spec.get("threads", 0)
    from cellseg.inference import OnnxModel, TorchModel, predict_many

    backend = spec["backend"]
    tile, overlap, batch = spec["tile"], spec["overlap"], spec["batch"]
    if backend == "ort":  # torch is not imported: its RSS would be counted against onnxruntime
        model = OnnxModel(spec["onnx"], device="cpu", threads=threads, graph_opt=spec.get("graph_opt", "all"),
                          **spec.get("session", {}))
        if spec.get("ort_default_threads"):  # onnxruntime's own intra_op_num_threads = 0, not cellseg's count
            import onnxruntime as ort

            opts = model.session.get_session_options()
            opts.intra_op_num_threads = 0
            model.session = ort.InferenceSession(spec["onnx"], opts, providers=["CPUExecutionProvider"])
        low, high = model.low_percentile, model.high_percentile
    else:
        import torch

        torch.set_num_threads(threads or os.cpu_count() or 1)
        net, cfg = _build_torch(spec)
        model = TorchModel(net, cfg, device="cpu")
        low, high = model.low_percentile, model.high_percentile

    # warm-up: one small image (thread pools, kernels, first allocations)
    warm = np.random.default_rng(1).random((200, 200), dtype=np.float32)
    counter = Counted(model)
    if backend == "monai":
        run = _monai_runner(model.net, tile, overlap, batch, counter)
    else:

        def run(images):
            return predict_many(counter, images, tile=tile, overlap=overlap, batch_size=batch)

    for _ in run([("warm", warm)]):
        pass

    out = {"name": spec["name"], "backend": backend, "provider": getattr(model, "provider", backend), "sets": {}}
    for set_spec in spec["sets"]:
        images = load_images(set_spec, low, high)
        mpix = sum(img.size for _, img in images) / 1e6
        counter.__init__(model, set_spec.get("sample_batches", 0))
        rss_before = rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()
        for _key, probs in run(images):
            del probs
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        out["sets"][set_spec["name"]] = {
            "images": len(images),
            "megapixels": mpix,
            "seconds": seconds,
            "mp_per_s": mpix / seconds,
            "tile_megapixels": counter.pixels / 1e6,
            "tile_mp_per_s": counter.model_pixels / 1e6 / max(counter.seconds, 1e-9) if counter.sample_batches else counter.pixels / 1e6 / seconds,
            "model_seconds": counter.seconds,
            "model_fraction": counter.seconds / seconds,
            "model_calls": counter.calls,
            "cpu_s": cpu_s,
            # CPU time (all threads) is less disturbed by other load than wall time; it hides what
            # parallelism gains (threads) and counts spin-waiting
            "tile_mp_per_cpu_s": counter.model_pixels / 1e6 / cpu_s,
            "rss_before_mb": rss_before,
        }
        del images
    out["peak_rss_mb"] = peak_rss_mb()
    out["rss_end_mb"] = rss_mb()
    return out


def big_worker(spec: dict) -> dict:
    """Peak memory of `cellseg infer` (segment_folder: read, normalise, predict, post-process,
    write masks + object table + overlay) on a huge 16-bit TIFF, in a process of its own."""
    threads = spec.get("threads", 0)
    from cellseg.batch import InferOptions, segment_folder
    from cellseg.inference import OnnxModel

    model = OnnxModel(spec["onnx"], device="cpu", threads=threads, graph_opt=spec.get("graph_opt", "all"),
                      **spec.get("session", {}))
    rss_model = rss_mb()
    counter = Counted(model, spec["sample_batches"])
    out = Path(spec["tiff"]).parent / f"out-{spec['name']}"
    t0 = time.perf_counter()
    summary = segment_folder(counter, Path(spec["tiff"]).parent, out,
                             InferOptions(tile=spec["tile"], overlap=spec["overlap"], batch_size=spec["batch"], overwrite=True),
                             progress=False)
    seconds = time.perf_counter() - t0
    if summary.failed:
        raise RuntimeError(f"segment_folder failed: {summary.failed}")
    shutil.rmtree(out, ignore_errors=True)
    from cellseg.resources import BYTES_PER_PIXEL

    pixels = summary.images[0]["height"] * summary.images[0]["width"]
    return {
        "name": spec["name"],
        "shape": [summary.images[0]["height"], summary.images[0]["width"]],
        # what segmenting costs per pixel above the loaded model, and cellseg's estimate of it
        # (resources.check_fits refuses an image whose estimate exceeds the free memory)
        "bytes_per_pixel": (peak_rss_mb() - rss_model) * 2**20 / pixels,
        "estimate_bytes_per_pixel": BYTES_PER_PIXEL,
        "objects": summary.objects,
        "rss_after_model_mb": rss_model,
        "peak_rss_mb": peak_rss_mb(),
        "infer_s": seconds,
        "model_calls": counter.calls,
        "model_calls_run": min(counter.calls, spec["sample_batches"]) if spec["sample_batches"] else counter.calls,
        "tile_megapixels": counter.pixels / 1e6,
        "torch_imported": "torch" in sys.modules,
    }


def run_worker(spec: dict, timeout: float) -> dict:
    """Run one spec in a fresh interpreter; returns its result dict (or {'error': ...})."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"name": spec["name"], "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["process_s"] = time.perf_counter() - t0
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"name": spec["name"], "error": f"exit {proc.returncode}: {' | '.join(tail)[:400]}"}


# ----------------------------------------------------------------------------------------- prepare


def model_files(args, work: Path) -> dict:
    """ONNX path, torch weights path, architecture, percentiles and a note on where they come from."""
    import onnx
    import torch

    from cellseg.config import load_config, validate_config
    from cellseg.export import export_onnx, load_net_from_checkpoint
    from cellseg.model import build_model

    onnx_path = args.model or (SHIPPED if SHIPPED.is_file() else None)
    weights = work / "weights.pt"
    if onnx_path is not None:
        meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
        cfg = validate_config(json.loads(meta["cellseg.config"]), str(onnx_path)) if "cellseg.config" in meta else load_config(SHIPPED_CFG)
        note = f"ONNX: {onnx_path}"
    else:
        cfg = load_config(SHIPPED_CFG)
        note = "random weights, shipped architecture (models/cellseg-nuclei.yaml)"
    if args.checkpoint:
        net, cfg_ckpt, _ = load_net_from_checkpoint(args.checkpoint)
        note += f"; torch/MONAI: {args.checkpoint}"
        if onnx_path is None:
            cfg = cfg_ckpt
    else:
        torch.manual_seed(0)
        net = build_model(cfg.model).eval()
        if onnx_path is not None:
            note += "; torch/MONAI: random weights of the same architecture"
    if onnx_path is None:
        onnx_path = export_onnx(net, cfg, work / "model.onnx")
    torch.save(net.state_dict(), weights)
    arch = {"depth": cfg.model.depth, "base_channels": cfg.model.base_channels, "in_channels": cfg.model.in_channels}
    return {"onnx": str(onnx_path), "weights": str(weights), "arch": arch, "low": cfg.data.low_percentile,
            "high": cfg.data.high_percentile, "source": note, "net": net, "cfg": cfg}


def _copy_metadata(src: str, dst: Path) -> None:
    import onnx

    meta = {p.key: p.value for p in onnx.load(src, load_external_data=False).metadata_props}
    proto = onnx.load(str(dst))
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(dst))


def quantize(onnx_path: str, work: Path, calib: list[np.ndarray]) -> dict[str, str]:
    """int8 variants of the model: {'dynamic': path or 'error: ...', 'static': ...}. The static one
    is what `cellseg quantize` writes (cellseg.quantize.quantize_static)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cellseg.quantize import preprocessed, quantize_static

    out: dict[str, str] = {}
    pre = preprocessed(onnx_path, work / "model.pre.onnx")  # once, for both variants
    if pre == Path(onnx_path):
        print("  quant_pre_process failed; quantising the original graph")
    try:
        dst = work / "model.int8-dynamic.onnx"
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QUInt8)
        _copy_metadata(onnx_path, dst)
        out["dynamic"] = str(dst)
    except Exception as exc:
        out["dynamic"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        out["static"] = str(quantize_static(onnx_path, work / "model.int8-static.onnx", calib, pre=pre))
    except Exception as exc:
        out["static"] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    return out


def flops_per_megapixel(net, in_channels: int, side: int = 512) -> float:
    """Model FLOPs per megapixel (2 x multiply-accumulates of convolutions/matmuls) on a side x side input."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, in_channels, side, side))
    return fc.get_total_flops() / (side * side / 1e6)


def matmul_peak(n: int, repeat: int) -> dict[str, float]:
    """Best fp32 GFLOP/s of an n x n matmul using all cores: torch.mm and numpy (OpenBLAS).

    Both are measured because a BLAS can miss the machine's peak by far: torch's CPU BLAS reached
    33 GFLOP/s on a 2-core AMD EPYC where numpy's OpenBLAS reached 56 (and onnxruntime's
    convolutions 35), which would put a roofline fraction above 100%. The peak is the better one.
    """
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = {}
    for name, mm, make in (("torch.mm", torch.mm, lambda: torch.randn(n, n)),
                           ("numpy.matmul", np.matmul, lambda: np.random.default_rng(0).random((n, n), dtype=np.float32))):
        a, b = make(), make()
        mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best / 1e9
    return out


def tile_overhead(shapes: list[tuple[int, int]], tile: int, overlap: float, multiple: int, margin: int) -> float:
    """Tile pixels computed per image pixel by predict_many (same geometry as TileBatcher.add)."""
    from cellseg.inference import DEFAULT_MARGIN, _round_up, balanced_tile, tile_positions

    m = _round_up(margin if margin is not None else DEFAULT_MARGIN, multiple)
    t = _round_up(tile, multiple)
    computed = total = 0
    for h, w in shapes:
        hp, wp = _round_up(h + 2 * m, multiple), _round_up(w + 2 * m, multiple)
        th, tw = balanced_tile(hp, t, overlap, multiple), balanced_tile(wp, t, overlap, multiple)
        computed += len(tile_positions(hp, th, overlap, multiple)) * len(tile_positions(wp, tw, overlap, multiple)) * th * tw
        total += h * w
    return computed / total


# -------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (< 1 min idle): small images, short sweep, no 10k check")
    ap.add_argument("--model", type=Path, help="cellseg ONNX model (default: models/cellseg-nuclei.onnx, else random weights)")
    ap.add_argument("--checkpoint", type=Path, help="training checkpoint for the PyTorch/MONAI runs")
    ap.add_argument("--dsb", type=int, help="number of DSB images (one per shape; default 6, quick 2)")
    ap.add_argument("--large", type=int, help="side of the large synthetic image (default 2048, quick 768)")
    ap.add_argument("--sweep-dsb", type=int, help="DSB images of the settings sweep (the first of --dsb; default 4, quick 2)")
    ap.add_argument("--sweep-large", type=int, help="side of the synthetic image of the settings sweep (default min(--large, 1536): 16 tiles of 512, "
                    "two full batches of one shape, where onnxruntime's memory pattern shows)")
    ap.add_argument("--big", type=int, help="side of the 16-bit TIFF for the memory check (default 10000, quick 0 = skip)")
    ap.add_argument("--big-configs", default=None,
                    help="memory check (`cellseg infer` path: masks, object table, overlay): comma-separated TILE:BATCH pairs, one run each "
                    "(default: --tile:--batch, then 512:8)")
    ap.add_argument("--big-batches", type=int, default=2,
                    help="memory check: run the model on the first N tile batches only, zeros after (0 = all; slow)")
    from cellseg.batch import InferOptions  # the defaults of `cellseg infer` are the reference

    ap.add_argument("--tile", type=int, default=InferOptions.tile, help="default: cellseg infer's")
    ap.add_argument("--overlap", type=float, default=InferOptions.overlap, help="default: cellseg infer's")
    ap.add_argument("--batch", type=int, default=InferOptions.batch_size, help="tiles per model call (default: cellseg infer's)")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime/torch threads of the main runs (0 = all cores)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the onnxruntime settings sweep")
    ap.add_argument("--no-quant", action="store_true", help="skip the int8 quantisation runs")
    ap.add_argument("--no-monai", action="store_true")
    ap.add_argument("--peak-n", type=int, help="matmul side for the fp32 peak (default 4096, quick 2048)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed per configuration")
    ap.add_argument("--json", type=Path, default=RESULTS / "infer.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        res = big_worker(spec) if spec.get("big") else worker(spec)
        print("RESULT " + json.dumps(res))
        return 0

    q = args.quick
    n_dsb = args.dsb if args.dsb is not None else (2 if q else 6)
    large = args.large if args.large is not None else (768 if q else 2048)
    sweep_large = args.sweep_large if args.sweep_large is not None else min(large, 1536)
    big = args.big if args.big is not None else (0 if q else 10000)
    peak_n = args.peak_n or (2048 if q else 4096)
    t_start = time.perf_counter()
    info = machine()
    print(f"machine: {info['cpu']}, {info['usable_cpus']} cpus, load average {info['loadavg_1min']:.2f}")

    import torch

    work = Path(tempfile.mkdtemp(prefix="cellseg-bench-"))
    _cleanup_on_exit(work)
    mf = model_files(args, work)
    print(f"model: {mf['source']}  (depth {mf['arch']['depth']}, base {mf['arch']['base_channels']})")
    base = {k: mf[k] for k in ("onnx", "weights", "arch", "low", "high")}

    dsb_files = pick_dsb(n_dsb)
    sets = []
    if dsb_files:
        sets.append({"name": "dsb", "files": [str(p) for p in dsb_files]})
    else:
        print(f"{DSB_DIR} missing: DSB images skipped")
    n_sweep_dsb = min(len(dsb_files), args.sweep_dsb if args.sweep_dsb is not None else (2 if q else 4))
    sweep_sets = [{"name": "dsb", "files": [str(p) for p in dsb_files[:n_sweep_dsb]]}] if n_sweep_dsb else []
    if large > 0:
        sets.append({"name": "large", "size": large})
    if sweep_large > 0:
        sweep_sets.append({"name": "large", "size": sweep_large})
    from cellseg.data.io import read_image

    shapes = {"dsb": [read_image(p).shape for p in dsb_files], "large": [(large, large)] if large > 0 else []}
    sweep_shapes = {"dsb": shapes["dsb"][:n_sweep_dsb], "large": [(sweep_large, sweep_large)] if sweep_large > 0 else []}
    print("images: " + ", ".join(f"{s['name']} ({len(shapes[s['name']])} image(s), "
                                 f"{sum(h * w for h, w in shapes[s['name']]) / 1e6:.2f} MP)" for s in sets))

    # roofline inputs, measured in this run
    gflop_per_mp = flops_per_megapixel(mf["net"], mf["arch"]["in_channels"]) / 1e9
    peaks = matmul_peak(peak_n, 3)
    peak = max(peaks.values())
    print(f"model: {gflop_per_mp:.1f} GFLOP per megapixel (2 x MACs of conv/matmul, FlopCounterMode on 512x512)")
    print(f"fp32 peak: {peak:.1f} GFLOP/s ({', '.join(f'{k} {v:.1f}' for k, v in peaks.items())}; {peak_n}x{peak_n}, "
          f"{torch.get_num_threads()} threads, best of 3)")

    geom = dict(tile=args.tile, overlap=args.overlap, batch=args.batch, threads=args.threads)
    main_specs = [{"name": "cellseg-ort", "backend": "ort", **base, **geom, "sets": sets},
                  {"name": "torch-eager", "backend": "torch", **base, **geom, "sets": sets}]
    int8_files: dict[str, str] = {}
    if not args.no_quant:
        from cellseg.data.io import normalize_percentile

        calib = []
        for p in dsb_files[:4] or [None]:
            img = read_image(p) if p else synthetic_uint16(256).astype(np.float32)
            calib.append(normalize_percentile(img, mf["low"], mf["high"], mf["cfg"].data.invert_bright)[:256, :256].copy())
        int8_files = quantize(mf["onnx"], work, calib)
        for kind, path in int8_files.items():
            if path.startswith("error"):
                print(f"int8 {kind}: {path}")
        # (1q): the int8 model cellseg infer loads by default on CPUs with VNNI/AMX (the shipped
        # model's int8 copy, written by `cellseg quantize`), else this run's static quantisation
        from cellseg.quantize import int8_path, prefer_int8

        shipped_int8 = int8_path(mf["onnx"])
        q8 = str(shipped_int8) if shipped_int8.is_file() else int8_files.get("static", "error")
        if not q8.startswith("error"):
            main_specs.insert(1, {"name": "cellseg-ort-int8", "backend": "ort", **base, **geom, "onnx": q8, "sets": sets,
                                  "default_here": prefer_int8("cpu")})
    skipped = {}
    if not args.no_monai:
        import importlib

        try:
            importlib.import_module("monai.inferers")
            main_specs.append({"name": "monai-sliding-window", "backend": "monai", **base, **geom, "sets": sets})
        except Exception as exc:  # MONAI missing (pip install -e '.[bench]') or broken with this torch
            why = f"skipped: MONAI does not import ({type(exc).__name__}: {str(exc)[:160]})"
            print(f"(3) {why}")
            skipped["monai-sliding-window"] = {"name": "monai-sliding-window", "backend": "monai", "error": why, "sweep": False}

    sweep = []
    if not args.no_sweep:
        # every variant differs from the defaults of (1) in one setting; all run on `sweep_sets`
        ort_base = {"backend": "ort", **base, **geom, "sets": sweep_sets}
        sweep += [{**ort_base, "name": "defaults"}] if sweep_sets != sets else []
        sweep += [
            {**ort_base, "name": "graph_opt=basic", "graph_opt": "basic"},
            {**ort_base, "name": "threads=1", "threads": 1},
            {**ort_base, "name": "threads=ort-default", "ort_default_threads": True},
            {**ort_base, "name": "mem_pattern=on", "session": {"mem_pattern": True}},
            {**ort_base, "name": "spinning=on", "session": {"spinning": True}},
            {**ort_base, "name": "mem_arena=off", "session": {"mem_arena": False}},
        ]
        sweep += [{**ort_base, "name": f"tile={t}", "tile": t} for t in (256, 512, 768, 1024) if t != args.tile]
        sweep += [{**ort_base, "name": f"batch={b}", "batch": b} for b in (1, 2, 4, 8) if b != args.batch]
        if q:  # the smoke run keeps a few
            keep = {"defaults", "graph_opt=basic", "batch=1"}
            sweep = [s for s in sweep if s["name"] in keep]
        for kind, path in int8_files.items():
            if path.startswith("error"):
                sweep.append({"name": f"int8-{kind}", "error": path})
            else:
                sweep.append({**ort_base, "name": f"int8-{kind}", "onnx": path})

    results = dict(skipped)
    for spec in main_specs + sweep:
        if "error" in spec:
            results[spec["name"]] = {"name": spec["name"], "error": spec["error"], "backend": "ort", "sweep": True}
            continue
        res = run_worker(spec, args.timeout)
        res["sweep"] = spec in sweep
        if "default_here" in spec:  # (1q): which file, and whether cellseg infer picks it on this machine
            res["onnx"], res["default_here"] = Path(spec["onnx"]).name, spec["default_here"]
        results[spec["name"]] = res
        if "error" in res:
            print(f"  {spec['name']}: {res['error']}")
        else:
            line = "  ".join(f"{k} {v['mp_per_s']:.3f} MP/s" for k, v in res["sets"].items())
            print(f"  {spec['name']:<22} {line}  peak RSS {res['peak_rss_mb']:.0f} MiB  ({res['process_s']:.0f} s)")

    ort_res = results.get("cellseg-ort", {})
    ratios = {}
    for mine, key in (("cellseg-ort", "ort"), ("cellseg-ort-int8", "ort-int8")):
        for other in ("torch-eager", "monai-sliding-window"):
            a, b = results.get(mine, {}), results.get(other, {})
            if "sets" in a and "sets" in b:
                ratios[f"{key}/{other}"] = total_rate(a) / total_rate(b)
                for s_name in a["sets"]:
                    ratios[f"{key}/{other}[{s_name}]"] = a["sets"][s_name]["mp_per_s"] / b["sets"][s_name]["mp_per_s"]
    roofline = {
        "gflop_per_megapixel": gflop_per_mp,
        "convention": "FLOPs = 2 x multiply-accumulates of convolutions (torch FlopCounterMode, 512x512 input); "
        "pooling, upsampling, ReLU, softmax and blending not counted",
        "peak_gflops": peak,
        "peak_gflops_by_method": peaks,
        "peak_method": f"best of torch.mm and numpy.matmul, fp32 {peak_n}x{peak_n}, all cores, best of 3 runs each",
    }
    if "sets" in ort_res:
        sets_ = ort_res["sets"].values()
        seconds = sum(v["seconds"] for v in sets_)
        roofline["ort_tile_mp_per_s"] = sum(v["tile_megapixels"] for v in sets_) / seconds
        roofline["ort_image_mp_per_s"] = total_rate(ort_res)
        roofline["fraction_tile_pixels"] = roofline["ort_tile_mp_per_s"] * gflop_per_mp / peak
        roofline["fraction_image_pixels"] = roofline["ort_image_mp_per_s"] * gflop_per_mp / peak
        model_s = sum(v["model_seconds"] for v in sets_)
        roofline["fraction_inside_model"] = sum(v["tile_megapixels"] for v in sets_) / model_s * gflop_per_mp / peak
        roofline["model_time_fraction"] = model_s / seconds

    overhead = {}
    for t in (256, 512, 1024):
        for o in (0.0, 0.125, 0.25):
            row = {f"{name}[{','.join(f'{h}x{w}' for h, w in sh) if name == 'large' else len(sh)}]":
                   tile_overhead(sh, t, o, 2 ** mf["arch"]["depth"], 32)
                   for shp in (shapes, sweep_shapes) for name, sh in shp.items() if sh}
            overhead[f"tile={t},overlap={o}"] = row

    big_res = []
    if big > 0:
        import tifffile

        (work / "big").mkdir(exist_ok=True)
        tiff = work / "big" / f"big{big}.tif"  # alone in its folder: segment_folder runs on the folder
        tifffile.imwrite(tiff, synthetic_uint16(big, seed=1))
        pairs = args.big_configs or ",".join(dict.fromkeys([f"{args.tile}:{args.batch}", "512:8"]))
        for t, b in (tuple(int(v) for v in p.split(":")) for p in pairs.split(",")):
            spec = {"name": f"big{big}-tile{t}-batch{b}", "big": True, **base, **geom, "tile": t, "batch": b, "tiff": str(tiff),
                    "sample_batches": args.big_batches}
            r = run_worker(spec, args.timeout)
            r["tile"], r["batch"] = t, b
            big_res.append(r)
            if "error" in r:
                print(f"  memory check {big}x{big}, batch {b}: {r['error']}")
            else:
                print(f"  memory check {big}x{big} uint16 TIFF, tile {t}, batch {b}: peak RSS {r['peak_rss_mb']:.0f} MiB "
                      f"(goal < 2048; {_sampled(r)}; {r['infer_s']:.0f} s); {r['bytes_per_pixel']:.1f} bytes/px above "
                      f"the model (the memory check's estimate: {r['estimate_bytes_per_pixel']})")
        tiff.unlink()

    sweep_ref = results.get("defaults") or ort_res
    ranked = [(total_rate(r), n) for n, r in results.items()
              if "sets" in r and r.get("backend") == "ort" and (r["sweep"] or r is sweep_ref)]
    best = max(ranked)[1] if ranked else None
    result = {
        "machine": info,
        "quick": q,
        "model": {k: mf[k] for k in ("source", "arch", "low", "high")},
        "settings": {"tile": args.tile, "overlap": args.overlap, "batch": args.batch, "threads": args.threads, "margin": 32,
                     "onnxruntime_defaults": "graph_opt=all, threads=0 (physical cores), mem_pattern=off, spinning=off"},
        "images": {s["name"]: {"count": len(shapes[s["name"]]), "shapes": [list(x) for x in shapes[s["name"]]],
                               "files": [Path(f).name for f in s.get("files", [])]} for s in sets},
        "sweep_images": {s["name"]: [list(x) for x in sweep_shapes[s["name"]]] for s in sweep_sets},
        "results": results,
        "ratios": ratios,
        "roofline": roofline,
        "tile_overhead": overhead,
        "memory_check": big_res,  # one run per batch size
        "fastest_ort_config": best,
        "seconds": time.perf_counter() - t_start,
        "loadavg_1min_end": os.getloadavg()[0],
    }

    print()
    print_table("(1)-(3): same model, images, tile, overlap, batch", sets,
                {n: r for n, r in results.items() if not r.get("sweep")}, "cellseg-ort")
    for k, v in ratios.items():
        if "[" not in k:
            print(f"ratio {k}: {v:.2f}x")
    if "fraction_tile_pixels" in roofline:
        print(f"roofline (1): {roofline['ort_tile_mp_per_s']:.3f} tile MP/s x {gflop_per_mp:.1f} GFLOP/MP = "
              f"{roofline['ort_tile_mp_per_s'] * gflop_per_mp:.1f} GFLOP/s = {100 * roofline['fraction_tile_pixels']:.1f}% "
              f"of {peak:.1f} GFLOP/s (image pixels only: {100 * roofline['fraction_image_pixels']:.1f}%; "
              f"inside the model call: {100 * roofline['fraction_inside_model']:.1f}%, "
              f"{100 * roofline['model_time_fraction']:.0f}% of the time)")
    if sweep:
        print()
        ref_name = "defaults" if "defaults" in results else "cellseg-ort"
        print_table(f"onnxruntime sweep (one setting changed from {ref_name})", sweep_sets,
                    {n: r for n, r in results.items() if r.get("sweep") or n == ref_name}, ref_name)
        print(f"fastest onnxruntime configuration: {best}")
    print(f"load average 1 min: {info['loadavg_1min']:.2f} at start, {result['loadavg_1min_end']:.2f} at end")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    return 0 if "sets" in ort_res else 1


def cpu_rate(res: dict) -> float:
    """Tile megapixels per CPU-second (all threads) over all image sets of a result."""
    if "sets" not in res:
        return float("nan")
    return sum(v["tile_megapixels"] for v in res["sets"].values()) / sum(v["cpu_s"] for v in res["sets"].values())


def _cleanup_on_exit(work: Path) -> None:
    """Remove the scratch folder (model copies, the 200 MB TIFF) at exit, SIGTERM included.

    SIGTERM becomes SystemExit, so the worker running under subprocess.run is killed too.
    """
    import atexit
    import shutil
    import signal

    atexit.register(shutil.rmtree, work, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def total_rate(res: dict) -> float:
    """Image megapixels per second over all image sets of a result."""
    if "sets" not in res:
        return float("nan")
    return sum(v["megapixels"] for v in res["sets"].values()) / sum(v["seconds"] for v in res["sets"].values())


def _sampled(big: dict) -> str:
    if big["model_calls_run"] < big["model_calls"]:
        return f"model run on {big['model_calls_run']} of {big['model_calls']} batches, zero logits after"
    return "model run on every tile"


def print_table(title: str, sets: list[dict], results: dict, ref: str) -> None:
    """MP/s per image set, overall, relative to `ref`, and peak RSS."""
    print(title)
    print(f"{'configuration':<22} " + " ".join(f"{s['name'] + ' MP/s':>12}" for s in sets)
          + f" {'all MP/s':>9} {'vs ' + ref:>10} {'tile MP/CPU-s':>14} {'peak MiB':>9}")
    base = total_rate(results.get(ref, {}))
    for name, res in results.items():
        if "sets" not in res:
            print(f"{name:<22} {res.get('error', '')[:90]}")
            continue
        cols = " ".join(f"{res['sets'][s['name']]['mp_per_s']:>12.3f}" for s in sets)
        print(f"{name:<22} {cols} {total_rate(res):>9.3f} {total_rate(res) / base:>9.2f}x {cpu_rate(res):>14.3f} "
              f"{res['peak_rss_mb']:>9.0f}")


if __name__ == "__main__":
    sys.exit(main())
