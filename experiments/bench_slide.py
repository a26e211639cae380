"""Whole-slide inference benchmark: tiles/s, s per mm² of tissue and peak host memory as the slide grows.

    .venv/bin/python experiments/bench_slide.py                       # sizes 2048 4096 8192; dots, tiny, vit_s16
    .venv/bin/python experiments/bench_slide.py --sizes 2048 4096 --models dots tiny --vit-max-size 2048

Synthetic pyramidal TIFFs (JPEG tiles, 0.5 µm/px, a tissue ellipse over ~43% of the area, dots every 24 px) of growing
side are written once. Each (model, size) pair runs in its own subprocess, so its peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes the JAX runtime and the model) is its own. In the
subprocess a warm-up run on a 512 px slide compiles the model first; the timed run is then the full `run()`: thumbnail,
tissue mask, tile reading, inference, streaming to parts, seam merge and exports. Models:

- `dots`: `DotPredictor`, a jitted local-minimum finder: the pipeline with an almost free model (the baseline);
- `tiny`, `vit_s16`: `muse_jax.ndc.infer.Predictor` on random-init NDC checkpoints (backbone + point head),
  `max_detections` 256 per tile, score threshold 0 (so point NMS and exports do real work).

Window 256 px, overlap 64, batch 16, 4 reader threads, 1 device (CPU). One timed run per pair (slide runs are long;
the repeat is the warm-up). Memory should stay flat as the slide grows: only the batches in flight are held.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args: argparse.Namespace) -> None:
  from muse_jax.slide import run as slide_run
  from muse_jax.slide.synthetic import DotPredictor

  if args.model == "dots":
    pred = DotPredictor(mpp=0.5, window=args.window, max_points=512)
  else:
    from muse_jax.ndc.infer import Predictor
    pred = Predictor.from_checkpoint(args.checkpoint)
  cfg = dict(batch_size=args.batch, overlap=args.overlap, num_readers=args.readers, progress=False)
  shutil.rmtree(args.out, ignore_errors=True)  # a fresh run, not a resume of an earlier benchmark
  slide_run.run(pred, args.warmup_slide, pathlib.Path(args.out) / "warmup", slide_run.SlideRunConfig(**cfg))
  rss_warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  s = slide_run.run(pred, args.slide, pathlib.Path(args.out) / "run", slide_run.SlideRunConfig(**cfg))
  wall = time.perf_counter() - t0
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  assert s["tiles_this_call"] == s["tiles_tissue"], "not a fresh run"
  print("RESULT " + json.dumps(dict(
      tiles=s["tiles_tissue"], nuclei=s["nuclei"], tissue_mm2=s["tissue_area_mm2"], seconds=wall,
      infer_seconds=s["inference_seconds"], tiles_per_s=s["tiles_tissue"] / wall,
      s_per_mm2=wall / s["tissue_area_mm2"], peak_rss_mb=rss, rss_after_warmup_mb=rss_warm)))


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
  p.add_argument("--models", nargs="+", default=["dots", "tiny", "vit_s16"])
  p.add_argument("--vit-max-size", type=int, default=2048, help="largest slide side run with vit_s16")
  p.add_argument("--window", type=int, default=256)
  p.add_argument("--overlap", type=int, default=64)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--readers", type=int, default=4)
  p.add_argument("--workdir", default=str(ROOT / "experiments" / "out" / "bench_slide"))
  p.add_argument("--json", default=None, help="also write the measured rows and parameters to this JSON file")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--model", help=argparse.SUPPRESS)
  p.add_argument("--slide", help=argparse.SUPPRESS)
  p.add_argument("--warmup-slide", help=argparse.SUPPRESS)
  p.add_argument("--checkpoint", help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    child(args)
    return

  from muse_jax.slide.synthetic import write_random_ndc_checkpoint, write_synthetic_slide

  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  warm = work / "warmup.tif"
  write_synthetic_slide(warm, 512, 512, mpp=0.5, compression="jpeg", seed=1)
  slides = {}
  for size in args.sizes:
    path = work / f"slide_{size}.tif"
    t0 = time.perf_counter()
    write_synthetic_slide(path, size, size, mpp=0.5, compression="jpeg")
    slides[size] = path
    print(f"wrote {path.name}: {size}x{size} px, {path.stat().st_size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
  ckpts = {m: write_random_ndc_checkpoint(work / f"ckpt_{m}", m, window=args.window, max_detections=256)
           for m in args.models if m != "dots"}
  rows = []
  for model in args.models:
    for size in args.sizes:
      if model == "vit_s16" and size > args.vit_max_size:
        continue
      cmd = [sys.executable, __file__, "--child", "--model", model, "--slide", str(slides[size]),
             "--warmup-slide", str(warm), "--out", str(work / f"out_{model}_{size}"), "--window", str(args.window),
             "--overlap", str(args.overlap), "--batch", str(args.batch), "--readers", str(args.readers)]
      if model in ckpts:
        cmd += ["--checkpoint", str(ckpts[model])]
      env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
      line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
      if proc.returncode or not line:
        print(f"{model} {size}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
        continue
      r = dict(model=model, size=size, **json.loads(line[0][7:]))
      rows.append(r)
      print(f"{model:8s} {size:6d}: {r['tiles']} tiles, {r['tiles_per_s']:.1f} tiles/s, {r['s_per_mm2']:.2f} s/mm², "
            f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
  base = {r["size"]: r["tiles_per_s"] for r in rows if r["model"] == "dots"}
  print("\n| model | slide side (px) | tissue mm² | tissue tiles | nuclei | wall s | model s | tiles/s | vs dots | "
        "s/mm² tissue | peak RSS MB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    ratio = r["tiles_per_s"] / base[r["size"]] if r["size"] in base else float("nan")
    print(f"| {r['model']} | {r['size']} | {r['tissue_mm2']:.2f} | {r['tiles']} | {r['nuclei']} | {r['seconds']:.1f} | "
          f"{r['infer_seconds']:.1f} | {r['tiles_per_s']:.1f} | {ratio:.2f} | {r['s_per_mm2']:.2f} | "
          f"{r['peak_rss_mb']:.0f} |")
  (work / "results.json").write_text(json.dumps(rows, indent=1))
  if args.json:
    failed = [dict(model=m, size=z) for m in args.models for z in args.sizes
              if not (m == "vit_s16" and z > args.vit_max_size)
              and not any(r["model"] == m and r["size"] == z for r in rows)]
    out = [dict(r, wall_s=r["seconds"], model_s=r["infer_seconds"],
                tiles_per_s_vs_dots=r["tiles_per_s"] / base[r["size"]] if r["size"] in base else None) for r in rows]
    params = {k: v for k, v in vars(args).items()
              if k in ("sizes", "models", "vit_max_size", "window", "overlap", "batch", "readers")}
    pathlib.Path(args.json).write_text(json.dumps(dict(
        benchmark="bench_slide", params=params, mpp=0.5, tables=dict(slide=out), failed=failed), indent=1))
  print(f"\ncommand: {' '.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)}  (cwd {ROOT.name}/)")


if __name__ == "__main__":
  main()
