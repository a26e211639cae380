"""Corpus-building benchmark (`muse_jax.data.build_corpus`): ROIs/s and nuclei/s per worker, and peak memory as the
slide grows.

    .venv/bin/python experiments/bench_corpus.py                          # CMU slide; synthetic 4096 8192 16384
    .venv/bin/python experiments/bench_corpus.py --sizes 4096 8192 --repeats 1

Two measurements, each in its own subprocess (so its peak RSS, `resource.getrusage(RUSAGE_SELF).ru_maxrss`, is its
own), on ONE worker (DirectRunner in-process, `--direct_num_workers=1 --direct_running_mode=in_memory`): Beam workers
share nothing, so N workers do N times this work per second until the storage or the shuffle saturates.

- `cmu`: the bundled CMU-1-Small-Region slide (2220 x 2967 px at 0.499 µm/px), ROIs of `--roi_size` px (default
  1024, the corpus default) at 0.5 µm/px over the whole slide (`--min_tissue 0`, so every whole ROI of the grid is
  used). (a) the worker's steady state: `Slide.read_at_mpp` + the classical detector per ROI, in a plain loop after
  one warm-up ROI (median of `--repeats` passes); (b) the whole pipeline, `build_corpus.build` (Beam start-up,
  hashing, tissue mask, reading, detection, encoding and TFDS's shuffle and ArrayRecord writing; median of
  `--repeats` builds after a warm-up build).
- `synthetic`: synthetic pyramidal TIFFs (JPEG tiles, 0.5 µm/px, a tissue ellipse over ~43% of the area, dots every
  24 px) of growing side, built whole with 1024 px ROIs (`--synth_roi`), `--min_tissue 0.5`, after a warm-up build of
  a 1024 px slide in the same process. One build per size (they are long); peak RSS per size says whether memory
  stays flat as the slide grows.

ROIs/s, nuclei/s and megapixels/s are per worker. The start-up of a build (Beam, TFDS, the tissue mask) is paid once
per build, so the marginal cost of a ROI is the slope of build time against ROIs over the synthetic slides (a least
squares line; its intercept is the fixed cost). The printed table ends with the estimate for a TCGA_nu-sized corpus
(483,627 ROIs of 1024 px at 0.5 µm/px) on N workers from that marginal cost (or from the CMU pipeline rate when
fewer than two synthetic sizes ran), assuming perfect scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TCGA_NU_ROIS = 483_627
ONE_WORKER = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]


def _rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_cmu(args: argparse.Namespace) -> dict:
  from muse_jax.data import build_corpus as bc
  from muse_jax.data import detect
  from muse_jax.slide import cmu_small_region_path, reader

  path = cmu_small_region_path()
  s = args.roi_size
  # (a) steady state of one worker: read + detect, ROI after ROI
  with reader.open_slide(path) as slide:
    w, h = slide.size_at_mpp(0.5)
    grid = [(x * s, y * s) for y in range(h // s) for x in range(w // s)]
    detect.detect_nuclei(slide.read_at_mpp(0, 0, s, s, 0.5), 0.5)  # warm-up
    loops, nuclei = [], 0
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      nuclei = 0
      for x, y in grid:
        nuclei += len(detect.detect_nuclei(slide.read_at_mpp(x, y, s, s, 0.5), 0.5))
      loops.append(time.perf_counter() - t0)
  loop_s = statistics.median(loops)
  # (b) the whole pipeline on one worker
  out = pathlib.Path(args.out)
  builds = []
  summary = None
  for i in range(args.repeats + 1):  # the first is the warm-up
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = bc.build([str(path)], str(out), roi_size=s, min_tissue=0.0, beam_args=ONE_WORKER, progress=False)
    if i:
      builds.append(time.perf_counter() - t0)
  build_s = statistics.median(builds)
  t = summary["totals"]
  mpx = len(grid) * s * s / 1e6
  return dict(what="cmu", roi_size=s, rois=t["rois"], nuclei=t["nuclei"], grid_rois=len(grid),
              loop_s=loop_s, loop_rois_per_s=len(grid) / loop_s, loop_nuclei_per_s=nuclei / loop_s,
              loop_mpx_per_s=mpx / loop_s, build_s=build_s, build_rois_per_s=t["rois"] / build_s,
              build_nuclei_per_s=t["nuclei"] / build_s, build_mpx_per_s=t["rois"] * s * s / 1e6 / build_s,
              peak_rss_mb=_rss_mb())


def child_synthetic(args: argparse.Namespace) -> dict:
  from muse_jax.data import build_corpus as bc

  out = pathlib.Path(args.out)
  kw = dict(roi_size=args.synth_roi, min_tissue=0.5, beam_args=ONE_WORKER, progress=False)
  shutil.rmtree(out, ignore_errors=True)
  bc.build([args.warmup_slide], str(out / "warmup"), **dict(kw, min_tissue=0.0))  # imports, first bundle
  rss_warm = _rss_mb()
  t0 = time.perf_counter()
  s = bc.build([args.slide], str(out / "run"), **kw)
  wall = time.perf_counter() - t0
  t = s["totals"]
  return dict(what="synthetic", size=args.size, roi_size=args.synth_roi, rois=t["rois"], nuclei=t["nuclei"],
              tissue_mm2=s["slides"][0]["tissue_mm2"], seconds=wall, rois_per_s=t["rois"] / wall,
              nuclei_per_s=t["nuclei"] / wall, mpx_per_s=t["rois"] * args.synth_roi ** 2 / 1e6 / wall,
              peak_rss_mb=_rss_mb(), rss_after_warmup_mb=rss_warm)


def _run_child(extra: list[str]) -> dict | None:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  proc = subprocess.run([sys.executable, __file__, "--child", *extra], capture_output=True, text=True, env=env,
                        cwd=ROOT)
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  if proc.returncode or not line:
    print(f"{' '.join(extra[:2])}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
    return None
  return json.loads(line[0][7:])


def estimate_hours(rois_per_s_per_worker: float, workers: int, rois: int = TCGA_NU_ROIS) -> float:
  """Hours to build `rois` ROIs on `workers` workers at a per-worker rate (perfect scaling, no start-up)."""
  return rois / (rois_per_s_per_worker * workers) / 3600


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--roi_size", type=int, default=1024, help="ROI side on the CMU slide, px at 0.5 µm/px")
  p.add_argument("--sizes", type=int, nargs="*", default=[4096, 8192, 16384], help="synthetic slide sides, px")
  p.add_argument("--synth_roi", type=int, default=1024, help="ROI side on the synthetic slides, px")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--workers", type=int, nargs="+", default=[8, 64, 512], help="worker counts for the estimate")
  p.add_argument("--workdir", default=str(ROOT / "experiments" / "out" / "bench_corpus"))
  p.add_argument("--json", default=None, help="also write the measured rows and parameters to this JSON file")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--mode", help=argparse.SUPPRESS)
  p.add_argument("--slide", help=argparse.SUPPRESS)
  p.add_argument("--warmup-slide", help=argparse.SUPPRESS)
  p.add_argument("--size", type=int, help=argparse.SUPPRESS)
  p.add_argument("--out", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    res = child_cmu(args) if args.mode == "cmu" else child_synthetic(args)
    print("RESULT " + json.dumps(res), flush=True)
    return

  from muse_jax.slide.synthetic import write_synthetic_slide

  work = pathlib.Path(args.workdir)
  work.mkdir(parents=True, exist_ok=True)
  common = ["--roi_size", str(args.roi_size), "--synth_roi", str(args.synth_roi), "--repeats", str(args.repeats)]
  cmu = _run_child(["--mode", "cmu", "--out", str(work / "out_cmu"), *common])
  if cmu:
    print(f"cmu {args.roi_size} px ROIs: worker loop {cmu['loop_rois_per_s']:.3f} ROIs/s, "
          f"{cmu['loop_nuclei_per_s']:.0f} nuclei/s; pipeline {cmu['build_rois_per_s']:.3f} ROIs/s, "
          f"{cmu['build_nuclei_per_s']:.0f} nuclei/s, peak RSS {cmu['peak_rss_mb']:.0f} MB", flush=True)
  warm = work / "warmup.tif"
  write_synthetic_slide(warm, 1024, 1024, mpp=0.5, compression="jpeg", seed=1)
  synth = []
  for size in args.sizes:
    path = work / f"slide_{size}.tif"
    if not path.exists():
      t0 = time.perf_counter()
      write_synthetic_slide(path, size, size, mpp=0.5, compression="jpeg")
      print(f"wrote {path.name}: {size}x{size} px, {path.stat().st_size / 2**20:.1f} MiB, "
            f"{time.perf_counter() - t0:.1f} s", flush=True)
    r = _run_child(["--mode", "synthetic", "--slide", str(path), "--warmup-slide", str(warm), "--size", str(size),
                    "--out", str(work / f"out_{size}"), *common])
    if r:
      synth.append(r)
      print(f"synthetic {size}: {r['rois']} ROIs, {r['rois_per_s']:.2f} ROIs/s, {r['nuclei_per_s']:.0f} nuclei/s, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
  print("\n| slide | ROI px | ROIs | nuclei | what | s | ROIs/s per worker | nuclei/s per worker | Mpx/s | "
        "peak RSS MB |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  if cmu:
    print(f"| CMU-1-Small-Region | {cmu['roi_size']} | {cmu['grid_rois']} | - | worker loop (read + detect) | "
          f"{cmu['loop_s']:.2f} | {cmu['loop_rois_per_s']:.3f} | {cmu['loop_nuclei_per_s']:.0f} | "
          f"{cmu['loop_mpx_per_s']:.2f} | - |")
    print(f"| CMU-1-Small-Region | {cmu['roi_size']} | {cmu['rois']} | {cmu['nuclei']} | whole pipeline | "
          f"{cmu['build_s']:.2f} | {cmu['build_rois_per_s']:.3f} | {cmu['build_nuclei_per_s']:.0f} | "
          f"{cmu['build_mpx_per_s']:.2f} | {cmu['peak_rss_mb']:.0f} |")
  for r in synth:
    print(f"| synthetic {r['size']}² | {r['roi_size']} | {r['rois']} | {r['nuclei']} | whole pipeline | "
          f"{r['seconds']:.2f} | {r['rois_per_s']:.3f} | {r['nuclei_per_s']:.0f} | {r['mpx_per_s']:.2f} | "
          f"{r['peak_rss_mb']:.0f} |")
  estimates, fit = [], None
  if len(synth) >= 2 and args.synth_roi == 1024:
    import numpy as np
    slope, intercept = np.polyfit([r["rois"] for r in synth], [r["seconds"] for r in synth], 1)
    fit = dict(s_per_roi=float(slope), fixed_s=float(intercept))
    rate, source = 1.0 / slope, (f"marginal cost {slope:.3f} s per 1024 px ROI (fit over the synthetic slides, fixed "
                                 f"cost {intercept:.1f} s per build)")
  elif cmu and args.roi_size == 1024:
    rate, source = cmu["build_rois_per_s"], "the CMU pipeline rate (start-up included)"
  else:
    rate = None
  if rate:
    for n in args.workers:
      estimates.append(dict(workers=n, rois_per_s_per_worker=rate, hours=estimate_hours(rate, n)))
    print(f"\nTCGA_nu-sized corpus ({TCGA_NU_ROIS:,} ROIs of 1024 px at 0.5 µm/px) from {source}: {rate:.3f} ROIs/s "
          "per worker, perfect scaling:")
    print("\n| workers | hours |")
    print("|---|---|")
    for e in estimates:
      print(f"| {e['workers']} | {e['hours']:.2f} |")
  (work / "results.json").write_text(json.dumps(dict(cmu=cmu, synthetic=synth, fit=fit, estimates=estimates),
                                                indent=1))
  if args.json:
    params = {k: v for k, v in vars(args).items() if k in ("roi_size", "sizes", "synth_roi", "repeats", "workers")}
    failed = ([] if cmu else [dict(what="cmu")]) + [dict(what="synthetic", size=z) for z in args.sizes
                                                     if not any(r["size"] == z for r in synth)]
    pathlib.Path(args.json).write_text(json.dumps(dict(
        benchmark="bench_corpus", params=params, tcga_nu_rois=TCGA_NU_ROIS, fit=fit,
        tables=dict(cmu=[cmu] if cmu else [], synthetic=synth, estimate=estimates), failed=failed), indent=1))
  argv = [os.path.relpath(sys.executable, ROOT), os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]
  print(f"\ncommand: {' '.join(argv)}  (cwd {ROOT.name}/)")


if __name__ == "__main__":
  main()
