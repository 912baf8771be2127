"""Benchmark: Ray Data engine with 1 and 2 actors against the local engine, same folder and model.

Usage: python bench/scale.py [--n 16] [--size 512] [--depth 2] [--base 8] [--tile 512] [--json OUT]

Writes N synthetic SIZExSIZE images and exports a U-Net (random weights: speed does not depend
on them; depth 2 / 8 channels by default so the run stays within a few minutes on 2 CPUs), then
segments the folder with

* the local engine (`segment_folder`, onnxruntime with all cores, threads=0),
* `segment_with_ray` with 1 actor and with 2 actors (each call starts and stops its own local Ray,
  as the CLI does; actors get the default CPU share, one onnxruntime thread each).

Reported per run: images/s end to end (after Ray is up: actor start-up included), steady images/s
(between the first and the last image finished by the actors: start-up excluded), Ray's fixed
cost (init of the local instance, and time to the first result at the driver), and the scaling
efficiency (rate_2 / rate_1) / 2 for both rates.
Results go to bench/results/scale.json. Timings are noisy when other jobs share the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cellseg.batch import InferOptions, segment_folder  # noqa: E402
from cellseg.defaults import DEFAULT_TILE  # noqa: E402


def _prepare(work: Path, n: int, size: int, depth: int, base: int) -> tuple[Path, Path]:
    import torch

    from cellseg.config import Config
    from cellseg.data.synth import write_dataset
    from cellseg.export import export_onnx
    from cellseg.model import UNet

    write_dataset(work / "data", n=n, size=(size, size), seed=0)
    cfg = Config()
    cfg.model.depth, cfg.model.base_channels = depth, base
    torch.manual_seed(0)
    model = export_onnx(UNet(depth=depth, base_channels=base).eval(), cfg, work / "model.onnx")
    return work / "data" / "images", model


def _ray_run(model: Path, images: Path, out: Path, opts: InferOptions, actors: int) -> dict:
    from cellseg.ray_engine import segment_with_ray

    t0 = time.perf_counter()
    s = segment_with_ray(model, images, out, opts, num_actors=actors, progress=False, device="cpu")
    wall = time.perf_counter() - t0
    e = s.engine
    first = e["first_result_seconds"]
    # steady rate: images finished by the actors after the first one, over the time that took
    # (the actors' own clocks: Ray hands results to the driver in bursts)
    span = e["last_image_done_s"] - e["first_image_done_s"]
    steady = (s.processed - 1) / span if span > 0 and s.processed > 1 else float("nan")
    return {
        "engine": f"ray x{actors}",
        "actors": actors,
        "cpus_per_actor": e["cpus_per_actor"],
        "threads_per_actor": e["threads_per_actor"],
        "images_per_call": e["images_per_call"],
        "processed": s.processed,
        "failed": len(s.failed),
        "workers": len(e["workers"]),
        "init_s": e["init_seconds"],
        "first_result_s": first,
        "first_image_done_s": e["first_image_done_s"],
        "last_image_done_s": e["last_image_done_s"],
        "segment_s": s.seconds,
        "wall_s": round(wall, 3),
        "images_per_s": s.images_per_s,
        "steady_images_per_s": round(steady, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="images")
    ap.add_argument("--size", type=int, default=512, help="image side (px)")
    ap.add_argument("--depth", type=int, default=2, help="U-Net depth")
    ap.add_argument("--base", type=int, default=8, help="U-Net base channels")
    ap.add_argument("--tile", type=int, default=DEFAULT_TILE)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    args = ap.parse_args()

    from cellseg.inference import OnnxModel

    work = Path(tempfile.mkdtemp(prefix="cellseg-scale-"))
    try:
        images, model = _prepare(work, args.n, args.size, args.depth, args.base)
        opts = InferOptions(tile=args.tile)
        runs = []

        s = segment_folder(OnnxModel(model, device="cpu", threads=0), images, work / "local", opts, progress=False)
        runs.append({"engine": "local", "processed": s.processed, "failed": len(s.failed), "segment_s": s.seconds,
                     "images_per_s": s.images_per_s, "steady_images_per_s": s.images_per_s})
        print(f"local: {s.images_per_s:.2f} images/s", file=sys.stderr, flush=True)
        for actors in (1, 2):
            r = _ray_run(model, images, work / f"ray{actors}", opts, actors)
            runs.append(r)
            print(f"ray x{actors}: {r['images_per_s']:.2f} images/s ({r['steady_images_per_s']:.2f} steady)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    local, r1, r2 = runs
    result = {
        "images": args.n,
        "size": [args.size, args.size],
        "model": {"depth": args.depth, "base_channels": args.base, "weights": "random"},
        "tile": args.tile,
        "runs": runs,
        "scaling_efficiency": round((r2["images_per_s"] / r1["images_per_s"]) / 2, 3),
        "scaling_efficiency_steady": round((r2["steady_images_per_s"] / r1["steady_images_per_s"]) / 2, 3),
        "ray_fixed_cost_s": {
            "init": round((r1["init_s"] + r2["init_s"]) / 2, 3),
            "first_result": round((r1["first_result_s"] + r2["first_result_s"]) / 2, 3),
        },
        "ray2_vs_local": round(r2["images_per_s"] / local["images_per_s"], 3),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    try:
        import ray

        result["ray_version"] = ray.__version__
    except ImportError:
        pass

    head = f"{'engine':<8} {'img/s':>7} {'steady':>7} {'init s':>7} {'1st s':>7} {'seg s':>7}"
    print(head)
    print("-" * len(head))
    for r in runs:
        print(f"{r['engine']:<8} {r['images_per_s']:>7.2f} {r['steady_images_per_s']:>7.2f} "
              f"{r.get('init_s', 0.0):>7.2f} {r.get('first_result_s', 0.0):>7.2f} {r['segment_s']:>7.2f}")
    print(f"scaling efficiency (rate_2/rate_1)/2: {result['scaling_efficiency']:.2f} end to end, "
          f"{result['scaling_efficiency_steady']:.2f} steady")
    print(f"Ray fixed cost: {result['ray_fixed_cost_s']['init']:.1f} s init + {result['ray_fixed_cost_s']['first_result']:.1f} s to the first result")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
