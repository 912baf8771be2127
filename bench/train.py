"""Benchmark: training step time, data loading (augmentation + targets + weight map) vs forward/backward.

Usage: python bench/train.py [--quick] [--data DIR] [--config YAML] [--images N] [--json OUT]

With the shipped model's config (models/cellseg-nuclei.yaml: 192 px crops, U-Net depth 3, base 16,
batch 8, 1 DataLoader worker) on real DSB 2018 images (../shared/data/dsb2018-train relative to the
project root; a small synthetic dataset when it is missing), on the CPU:

1. the data pipeline, one process: `TrainDataset.__getitem__` samples/s, curriculum stage 1 (no
   elastic deformation) and stage 2 (elastic), with the time split into crop, augmentation,
   3-class targets and the U-Net weight map (the same calls as __getitem__, timed one by one);
2. the same through a DataLoader with the config's workers (1) and with 0 workers, nothing else
   running (what the pipeline can deliver);
3. forward/backward (+ Adam step) of the training step on ready batches, batch 1, 4 and 8:
   images/s (what a step consumes);
4. a short real loop (DataLoader with the config's workers feeding the training step, like
   cellseg.train) with the fraction of the time spent waiting for data.

Data/compute ratio = samples/s of (2) / images/s of (3) at the config's batch size; >= 2 means
the loader keeps up with room to spare. Results: bench/results/train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cellseg.config import apply_overrides, load_config  # noqa: E402
from cellseg.data.dataset import TrainDataset, load_split, random_crop  # noqa: E402
from cellseg.data.targets import instances_to_classes, unet_weight_map  # noqa: E402
from cellseg.loss import weighted_cross_entropy  # noqa: E402
from cellseg.model import build_model  # noqa: E402

DSB = ROOT.parent / "shared" / "data" / "dsb2018-train"
CONFIG = ROOT / "models" / "cellseg-nuclei.yaml"


def pipeline_breakdown(ds: TrainDataset, n: int) -> dict:
    """Seconds per sample of each stage of __getitem__ (re-done step by step), and of __getitem__ itself."""
    cfg = ds.cfg
    t = cfg.targets
    parts = {"crop": 0.0, "augment": 0.0, "targets": 0.0, "weight_map": 0.0, "to_tensor": 0.0}
    for idx in range(n):
        rng = np.random.default_rng([ds.seed, ds.epoch, idx])
        s = ds.samples[int(ds.order[idx])]
        t0 = time.perf_counter()
        image, labels = random_crop(s.image, s.labels, cfg.data.crop_size, rng)
        t1 = time.perf_counter()
        image, labels = ds.augmenter(image, labels, rng)
        t2 = time.perf_counter()
        classes = instances_to_classes(labels, t.boundary_width)
        t3 = time.perf_counter()
        weights = unet_weight_map(labels, classes, **t.model_dump(exclude={"class_balance"}), class_weights=ds.class_weights)
        t4 = time.perf_counter()
        torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        torch.from_numpy(classes.astype(np.int64)), torch.from_numpy(weights.astype(np.float32))
        t5 = time.perf_counter()
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            parts[k] += dt
    t0 = time.perf_counter()
    for idx in range(n):
        ds[idx]
    getitem = (time.perf_counter() - t0) / n
    return {
        "samples": n,
        "ms_per_sample": {k: 1000 * v / n for k, v in parts.items()},
        "getitem_ms": 1000 * getitem,
        "samples_per_s": 1 / getitem,
    }


def loader_throughput(ds: TrainDataset, batch: int, workers: int) -> dict:
    """Samples/s a DataLoader delivers to a consumer that does nothing (first batch timed apart)."""
    loader = DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers, drop_last=True)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for images, _, _ in it:
        n += images.shape[0]
    steady = time.perf_counter() - t1
    return {"workers": workers, "batch": batch, "first_batch_s": t_first, "samples": n,
            "samples_per_s": n / steady if n else float("nan")}


def step_fn(net, optimizer):
    def step(image, target, weight) -> tuple[float, float]:
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = weighted_cross_entropy(net(image), target, weight)
        t1 = time.perf_counter()
        loss.backward()
        optimizer.step()
        return t1 - t0, time.perf_counter() - t1

    return step


def compute_throughput(cfg, ds: TrainDataset, batches: list[int], steps: int, warm_all: bool = True) -> dict:
    """Images/s of forward + backward + Adam step on ready batches of real augmented crops.

    Each batch size gets one untimed warm-up step (only the first one when not `warm_all`).
    """
    torch.manual_seed(0)
    net = build_model(cfg.model).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = step_fn(net, optimizer)
    pool = [ds[i] for i in range(max(batches))]
    out = {}
    for b in batches:
        image = torch.stack([p[0] for p in pool[:b]])
        target = torch.stack([p[1] for p in pool[:b]])
        weight = torch.stack([p[2] for p in pool[:b]])
        if warm_all or b == batches[0]:
            step(image, target, weight)  # warm-up
        fwd = bwd = 0.0
        for _ in range(steps):
            f, bw = step(image, target, weight)
            fwd, bwd = fwd + f, bwd + bw
        total = fwd + bwd
        out[str(b)] = {"batch": b, "steps": steps, "s_per_step": total / steps, "forward_s": fwd / steps,
                       "backward_step_s": bwd / steps, "images_per_s": b * steps / total}
    return out


def real_loop(cfg, ds: TrainDataset, steps: int) -> dict:
    """cellseg.train's inner loop for `steps` steps: DataLoader (config workers) + training step."""
    torch.manual_seed(0)
    net = build_model(cfg.model).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = step_fn(net, optimizer)
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=False, num_workers=cfg.train.workers, drop_last=True)
    data_s = compute_s = 0.0
    n = 0
    t_start = time.perf_counter()
    it = iter(loader)
    first = next(it)  # worker start-up and the first batch: reported apart
    t_first = time.perf_counter() - t_start
    step(*first)
    t0 = time.perf_counter()
    t_data = time.perf_counter()
    for i, (image, target, weight) in enumerate(it):
        if i >= steps:
            break
        data_s += time.perf_counter() - t_data
        f, b = step(image, target, weight)
        compute_s += f + b
        n += image.shape[0]
        t_data = time.perf_counter()
    wall = time.perf_counter() - t0
    return {"steps": steps, "batch": cfg.train.batch_size, "workers": cfg.train.workers, "first_batch_s": t_first,
            "images_per_s": n / wall, "data_wait_s": data_s, "compute_s": compute_s,
            "data_wait_fraction": data_s / wall, "s_per_step": wall / max(steps, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few images, samples and steps")
    ap.add_argument("--data", type=Path, default=DSB, help="dataset folder (images/, masks/)")
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--images", type=int, help="images loaded (default 80, quick 12)")
    ap.add_argument("--samples", type=int, help="samples per pipeline measurement (default 48, quick 8)")
    ap.add_argument("--steps", type=int, help="timed steps per batch size (default 3, quick 1)")
    ap.add_argument("--loop-steps", type=int, help="steps of the real loop after one untimed step (default 6, quick 1)")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "train.json")
    args = ap.parse_args(argv)
    q = args.quick
    n_images = args.images or (12 if q else 80)
    n_samples = args.samples or (8 if q else 48)
    steps = args.steps or (1 if q else 3)
    loop_steps = args.loop_steps or (1 if q else 6)
    batches = [int(b) for b in args.batches.split(",")]
    t_start = time.perf_counter()

    cfg = load_config(args.config)
    data = args.data
    if not (data / "images").is_dir():
        from cellseg.data.synth import write_dataset

        data = Path(tempfile.mkdtemp(prefix="cellseg-bench-data-"))
        print(f"{args.data} missing: using {n_images} synthetic 256x256 images in {data}")
        write_dataset(data, n=n_images, size=(256, 256), seed=0)
    cfg = apply_overrides(cfg, {"data.max_images": n_images, "train.device": "cpu"})
    t0 = time.perf_counter()
    train_samples, _ = load_split(cfg, data)
    load_s = time.perf_counter() - t0
    workers = cfg.train.workers
    print(f"config {args.config.name}: crop {cfg.data.crop_size}, depth {cfg.model.depth}, base {cfg.model.base_channels}, "
          f"batch {cfg.train.batch_size}, workers {workers}; {len(train_samples)} training images loaded in {load_s:.1f} s; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")

    ds = TrainDataset(train_samples, cfg, seed=cfg.train.seed)
    pipeline = {}
    for stage, elastic in (("stage1", False), ("stage2_elastic", True)):
        ds.set_epoch(1, elastic=elastic, per_epoch=max(n_samples, 2 * cfg.train.batch_size))
        pipeline[stage] = pipeline_breakdown(ds, n_samples)
        p = pipeline[stage]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in p["ms_per_sample"].items())
        print(f"data, 1 process, {stage}: {p['samples_per_s']:.1f} samples/s ({p['getitem_ms']:.1f} ms: {parts} ms)")

    # loader throughput on stage 2 (elastic, the slower stage), 2 batches at least per measurement
    per_epoch = max(n_samples, 3 * cfg.train.batch_size)
    ds.set_epoch(2, elastic=True, per_epoch=per_epoch)
    loaders = {}
    for w in sorted({workers, 0}, reverse=True):
        loaders[str(w)] = loader_throughput(ds, cfg.train.batch_size, w)
        r = loaders[str(w)]
        print(f"DataLoader {w} worker(s), batch {cfg.train.batch_size}: {r['samples_per_s']:.1f} samples/s "
              f"(first batch {r['first_batch_s']:.2f} s)")

    compute = compute_throughput(cfg, ds, batches, steps, warm_all=not q)
    for b, r in compute.items():
        print(f"forward/backward batch {b}: {r['images_per_s']:.2f} images/s ({r['s_per_step']:.2f} s/step: "
              f"forward {r['forward_s']:.2f}, backward+Adam {r['backward_step_s']:.2f})")

    ds.set_epoch(3, elastic=True, per_epoch=(loop_steps + 2) * cfg.train.batch_size)
    loop = real_loop(cfg, ds, loop_steps)
    print(f"real loop ({loop_steps} steps, batch {loop['batch']}, {loop['workers']} worker(s)): {loop['images_per_s']:.2f} images/s, "
          f"data wait {100 * loop['data_wait_fraction']:.1f}% of the time")

    b = str(cfg.train.batch_size) if str(cfg.train.batch_size) in compute else max(compute, key=int)
    consume = compute[b]["images_per_s"]
    ratios = {
        f"loader_{workers}w_over_compute": loaders[str(workers)]["samples_per_s"] / consume,
        "single_process_over_compute": pipeline["stage2_elastic"]["samples_per_s"] / consume,
        "single_process_stage1_over_compute": pipeline["stage1"]["samples_per_s"] / consume,
    }
    ok = ratios[f"loader_{workers}w_over_compute"] >= 2
    print(f"data/compute at batch {b}: DataLoader({workers} worker) {ratios[f'loader_{workers}w_over_compute']:.1f}x, "
          f"one process {ratios['single_process_over_compute']:.1f}x (elastic) / "
          f"{ratios['single_process_stage1_over_compute']:.1f}x (stage 1)  -> {'OK (>= 2)' if ok else 'BELOW 2'}")

    result = {
        "machine": {"cpu_count": os.cpu_count(), "loadavg_1min": os.getloadavg()[0], "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "quick": q,
        "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
        "crop_size": cfg.data.crop_size,
        "model": {"depth": cfg.model.depth, "base_channels": cfg.model.base_channels},
        "data": str(data),
        "images_loaded": len(train_samples),
        "load_s": load_s,
        "pipeline_single_process": pipeline,
        "loader": loaders,
        "compute": compute,
        "real_loop": loop,
        "ratios": ratios,
        "ratio_ok": ok,
        "seconds": time.perf_counter() - t_start,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
