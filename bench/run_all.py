"""Run every benchmark, collect bench/results/*.json, write and print bench/results/summary.md.

Usage: python bench/run_all.py [--quick] [--only weightmap,infer,train,scale] [--model PATH]

Benchmarks (each a script of its own, run in a fresh process, output streamed):
  weightmap  bench/weightmap.py  fast vs naive U-Net weight map      -> results/weightmap.json
  infer      bench/infer.py      tiled inference speed and memory   -> results/infer.json
  int8       bench/int8.py      int8 models: speed and accuracy (evaluate) -> results/int8.json
  train      bench/train.py      data loading vs forward/backward   -> results/train.json
  scale      bench/scale.py      when that file exists and Ray is installed -> results/scale.json
The full run takes under 10 minutes on an idle 2-core machine; --quick is a smoke run.
Timings depend on other load: the summary records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
ORDER = ("weightmap", "infer", "int8", "train", "scale")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "onnxruntime-gpu", "onnxruntime", "monai", "numpy", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run(name: str, cmd: list[str], json_path: Path) -> dict:
    """Run one benchmark script; its exit code, seconds and JSON (None when it wrote none this time)."""
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    seconds = time.time() - t0
    data = None
    if json_path.is_file() and json_path.stat().st_mtime >= t0 - 1:
        data = json.loads(json_path.read_text())
    status = "ok" if proc.returncode == 0 and data is not None else f"exit {proc.returncode}" + ("" if data else ", no JSON")
    return {"status": status, "seconds": seconds, "json": data}


# ---------------------------------------------------------------------------------------- summary


def _f(x, fmt: str = ".3f") -> str:
    try:
        return format(float(x), fmt)
    except (TypeError, ValueError):
        return "n/a"


def summarize(meta: dict, runs: dict) -> str:
    times = ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in runs.items())
    lines = [
        f"# cellseg benchmarks ({'quick smoke run' if meta['quick'] else 'full run'})",
        "",
        "| | |",
        "|---|---|",
        f"| date | {meta['date']} |",
        f"| machine | {meta['cpu']}, {meta['cores']} cores ({meta['usable_cores']} usable), {meta['mem_gib']:.0f} GiB RAM |",
        f"| load average (1 min) | {meta['load_start']:.2f} at start, {meta['load_end']:.2f} at end (this run's own load included) |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in meta['versions'].items())} |",
        f"| total time | {meta['seconds']:.0f} s ({times}) |",
    ]
    if meta["load_start"] > 0.5 * meta["usable_cores"]:  # the load at the end includes the benchmarks themselves
        lines += ["", f"**Warning: the machine was busy before the run (load average {meta['load_start']:.1f} "
                  f"on {meta['usable_cores']} cores): timings are low and noisy; rerun on an idle machine.**"]
    skipped = [f"{k}: {v['status']}" for k, v in runs.items() if v["status"] != "ok"]
    if skipped:
        lines += ["", "Not run or failed: " + "; ".join(skipped) + "."]

    rows: list[tuple[str, str, str]] = []
    wm = runs.get("weightmap", {}).get("json")
    if wm:
        rows += [
            ("weightmap", f"naive / fast U-Net weight map, {wm['shape'][0]}x{wm['shape'][1]}, {wm['n_objects']} objects",
             f"{_f(wm['naive_s'])} s / {_f(wm['fast_s'], '.4f')} s = **{_f(wm['speedup'], '.1f')}x** "
             f"({'match' if wm['match'] else 'MISMATCH'})"),
        ]
    inf = runs.get("infer", {}).get("json")
    if inf:
        res, ratios, roof = inf["results"], inf["ratios"], inf["roofline"]
        imgs = ", ".join(f"{k}: {v['count']} image(s)" + (f" {v['shapes'][0][0]}x{v['shapes'][0][1]}" if k == "large" else "")
                         for k, v in inf["images"].items())
        s = inf["settings"]
        geo = f"tile {s['tile']}, overlap {s['overlap']}, batch {s['batch']}, margin {s['margin']}"
        q8 = res.get("cellseg-ort-int8", {})
        q8_label = (f"(1q) the same, int8 model `{q8.get('onnx', '')}` (static QDQ; what `cellseg infer` "
                    f"{'uses' if q8.get('default_here') else 'does not use'} on this CPU): image MP/s")
        for name, label in (("cellseg-ort", f"(1) cellseg onnxruntime: image MP/s ({imgs}; {geo})"),
                            ("cellseg-ort-int8", q8_label),
                            ("torch-eager", "(2) PyTorch eager, same tiling: image MP/s"),
                            ("monai-sliding-window", "(3) MONAI sliding_window_inference, same tile/overlap/batch: image MP/s")):
            r = res.get(name)
            if r and "sets" in r:
                per = ", ".join(f"{k} {_f(v['mp_per_s'])}" for k, v in r["sets"].items())
                rows.append(("infer", label,
                             f"**{_f(_total(r))}** ({per}); peak RSS {r['peak_rss_mb']:.0f} MiB"))
            elif r:
                rows.append(("infer", label, r.get("error", "failed")))
        for key, label in (("ort/torch-eager", "ratio (1)/(2)"), ("ort/monai-sliding-window", "ratio (1)/(3)"),
                           ("ort-int8/torch-eager", "ratio (1q)/(2)"), ("ort-int8/monai-sliding-window", "ratio (1q)/(3)")):
            if key in ratios:
                rows.append(("infer", label, f"**{_f(ratios[key], '.2f')}x**"))
        if "fraction_tile_pixels" in roof:
            rows.append(("infer", f"roofline of (1): {_f(roof['gflop_per_megapixel'], '.1f')} GFLOP/MP (2 x MACs) vs "
                         f"fp32 peak {_f(roof['peak_gflops'], '.1f')} GFLOP/s ({roof['peak_method']})",
                         f"**{100 * roof['fraction_tile_pixels']:.0f}%** on computed tile pixels "
                         f"({100 * roof['fraction_image_pixels']:.0f}% counting image pixels only; "
                         f"{100 * roof['fraction_inside_model']:.0f}% inside the model call)"))
        checks = inf.get("memory_check") or []
        for mc in checks if isinstance(checks, list) else [checks]:
            if "peak_rss_mb" in mc:
                ok = mc["peak_rss_mb"] < 2048
                rows.append(("infer", f"memory: {mc['shape'][0]}x{mc['shape'][1]} uint16 TIFF through `cellseg infer` (segment_folder: masks, object table, overlay) "
                             f"(tile {mc.get('tile', s['tile'])}, batch {mc.get('batch', s['batch'])})",
                             f"peak RSS **{mc['peak_rss_mb']:.0f} MiB** ({'< 2 GB goal' if ok else 'ABOVE the 2 GB goal'}; "
                             f"model on {mc['model_calls_run']} of {mc['model_calls']} batches)"))
            else:
                rows.append(("infer", "memory check", mc.get("error", "failed")))
        if not checks and not inf["quick"]:
            rows.append(("infer", "memory check", "skipped (--big 0)"))
        best = inf.get("fastest_ort_config")
        if best:
            ref = res.get("defaults") or res.get("cellseg-ort") or {}
            gain = _total(res[best]) / _total(ref) - 1 if ref else float("nan")
            rows.append(("infer", "fastest onnxruntime configuration of the sweep (image MP/s vs defaults)",
                         f"`{best}` ({100 * gain:+.0f}%)"))
    q8 = runs.get("int8", {}).get("json")
    if q8:
        ref = q8["results"]["fp32"]
        for name, r in q8["results"].items():
            if name == "fp32":
                continue
            result = r.get("error") or (
                f"{_f(r['speed_vs_fp32'], '.2f')}x; mAP {_f(r['map'])} ({r['delta']['map']:+.3f}), "
                f"AP@0.5 {_f(r['ap50'])} ({r['delta']['ap50']:+.3f})")
            rows.append(("int8", f"{name} vs fp32 (mAP {_f(ref['map'])}, AP@0.5 {_f(ref['ap50'])}): evaluate speed, "
                         f"accuracy ({q8['split']} split, {ref['n_images']} images)", result))
    tr = runs.get("train", {}).get("json")
    if tr:
        p1, p2 = tr["pipeline_single_process"]["stage1"], tr["pipeline_single_process"]["stage2_elastic"]
        w = tr["real_loop"]["workers"]
        ld = tr["loader"].get(str(w), {})
        rows += [
            ("train", f"data, one process (crop {tr['crop_size']}, augment, targets, weight map): samples/s, stage 1 / stage 2 (elastic)",
             f"{_f(p1['samples_per_s'], '.1f')} / {_f(p2['samples_per_s'], '.1f')} "
             f"(weight map {_f(p2['ms_per_sample']['weight_map'], '.0f')} of {_f(p2['getitem_ms'], '.0f')} ms)"),
            ("train", f"data, DataLoader {w} worker(s): samples/s", _f(ld.get("samples_per_s"), ".1f")),
            ("train", "forward/backward + Adam: images/s, batch " + " / ".join(tr["compute"]),
             " / ".join(_f(v["images_per_s"], ".2f") for v in tr["compute"].values())),
            ("train", f"data/compute ratio (DataLoader {w} worker vs batch {tr['real_loop']['batch']} step; goal >= 2)",
             f"**{_f(tr['ratios'][f'loader_{w}w_over_compute'], '.1f')}x** "
             f"(one process: {_f(tr['ratios']['single_process_over_compute'], '.1f')}x)"),
            ("train", f"real loop, {tr['real_loop']['steps']} steps: images/s, time waiting for data",
             f"{_f(tr['real_loop']['images_per_s'], '.2f')}, {100 * tr['real_loop']['data_wait_fraction']:.1f}%"),
        ]
    sc = runs.get("scale", {}).get("json")
    if sc and isinstance(sc.get("runs"), list):
        for r in sc["runs"]:
            rows.append(("scale", f"{r.get('engine')}: images/s end to end / steady ({sc.get('images')} images "
                         f"{'x'.join(map(str, sc.get('size', [])))})",
                         f"{_f(r.get('images_per_s'), '.2f')} / {_f(r.get('steady_images_per_s'), '.2f')}"))
        for k in ("scaling_efficiency", "scaling_efficiency_steady", "ray2_vs_local"):
            if k in sc:
                rows.append(("scale", k.replace("_", " "), _f(sc[k], ".2f")))
    elif sc:
        flat = {k: v for k, v in sc.items() if isinstance(v, (int, float, str, bool)) and len(str(v)) < 80}
        for k, v in list(flat.items())[:10]:
            rows.append(("scale", k, _f(v) if isinstance(v, float) else str(v)))
    lines += ["", "| benchmark | measurement | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]

    if inf and any(r.get("sweep") for r in inf["results"].values()):
        ref = "defaults" if "defaults" in inf["results"] else "cellseg-ort"
        base = _total(inf["results"][ref])
        sweep_imgs = ", ".join(f"{k}: " + (f"{v[0][0]}x{v[0][1]}" if k == "large" else f"{len(v)} image(s)")
                               for k, v in inf.get("sweep_images", {}).items())
        lines += ["", f"onnxruntime settings of (1), one changed at a time from `{ref}` "
                  f"({inf['settings']['onnxruntime_defaults']}; {sweep_imgs}):", "",
                  "| configuration | image MP/s | vs " + ref + " | tile MP per CPU-s | peak RSS MiB |", "|---|---|---|---|---|"]
        for name, r in inf["results"].items():
            if not (r.get("sweep") or name == ref):
                continue
            if "sets" in r:
                cpu = sum(v["tile_megapixels"] for v in r["sets"].values()) / sum(v.get("cpu_s", float("nan")) for v in r["sets"].values())
                lines.append(f"| {name} | {_f(_total(r))} | {_f(_total(r) / base, '.2f')}x | {_f(cpu)} | {r['peak_rss_mb']:.0f} |")
            else:
                lines.append(f"| {name} | {r.get('error', 'failed')[:80]} | | | |")
        oh = inf.get("tile_overhead", {})
        if oh:
            cols = list(next(iter(oh.values())))
            lines += ["", "Tile pixels computed per image pixel (tiling geometry, margin 32):", "",
                      "| tile, overlap | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {k} | " + " | ".join(_f(v[c], ".2f") for c in cols) + " |" for k, v in oh.items()]
    lines += ["", "Meaning of each number: bench/README.md.", ""]
    return "\n".join(lines)


def _total(r: dict) -> float:
    sets = r.get("sets") or {}
    secs = sum(v["seconds"] for v in sets.values())
    return sum(v["megapixels"] for v in sets.values()) / secs if secs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(ORDER)}")
    ap.add_argument("--model", type=Path, help="cellseg ONNX model for bench/infer.py")
    args = ap.parse_args(argv)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SystemExit: subprocess.run kills the running benchmark
    wanted = [b for b in ORDER if not args.only or b in args.only.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    quick = ["--quick"] if args.quick else []
    t0 = time.time()
    meta = {
        "quick": args.quick,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "mem_gib": mem_total_gib(),
        "load_start": os.getloadavg()[0],
        "versions": versions(),
    }
    runs: dict[str, dict] = {}
    for name in wanted:
        out = RESULTS / f"{name}.json"
        if name == "weightmap":
            runs[name] = run(name, [py, str(BENCH / "weightmap.py"), "--repeat", "1" if args.quick else "3", "--json", str(out)], out)
        elif name == "infer":
            extra = ["--model", str(args.model)] if args.model else []
            runs[name] = run(name, [py, str(BENCH / "infer.py"), *quick, *extra, "--json", str(out)], out)
        elif name == "int8":
            extra = ["--model", str(args.model)] if args.model else []
            runs[name] = run(name, [py, str(BENCH / "int8.py"), *quick, *extra, "--json", str(out)], out)
        elif name == "train":
            runs[name] = run(name, [py, str(BENCH / "train.py"), *quick, "--json", str(out)], out)
        elif name == "scale":
            script = BENCH / "scale.py"
            if not script.is_file():
                runs[name] = {"status": "skipped (no bench/scale.py)", "seconds": 0.0, "json": None}
            elif importlib.util.find_spec("ray") is None:
                runs[name] = {"status": "skipped (ray not installed: pip install -e '.[ray]')", "seconds": 0.0, "json": None}
            else:
                src = script.read_text()
                extra = ["--quick"] if args.quick and "--quick" in src else (["--n", "4"] if args.quick and '"--n"' in src else [])
                extra += ["--json", str(out)] if '"--json"' in src else []
                runs[name] = run(name, [py, str(script), *extra], out)
    meta["load_end"] = os.getloadavg()[0]
    meta["seconds"] = time.time() - t0
    text = summarize(meta, runs)
    (RESULTS / "summary.md").write_text(text)
    print("\n" + text)
    print(f"wrote {RESULTS / 'summary.md'}")
    failed = [k for k, v in runs.items() if not (v["status"] == "ok" or v["status"].startswith("skipped"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
