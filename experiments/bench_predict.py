"""Benchmark: NDC inference throughput (tiles/s, s/mm²) of `muse_jax.ndc.infer.Predictor` on this machine.

  PYTHONPATH=. .venv/bin/python experiments/bench_predict.py [--variants tiny,vit_s16] [--repeats 3]

For each backbone variant, with the window and batch of `configs/finetune_ndc.py:<variant>` (random weights; the
speed does not depend on them):
- `predict_tiles`: a batch of windows (jit forward + top-k on device, threshold + point NMS on the host);
  tiles/s and s/mm² of tile area at the model mpp (0.5 µm/px);
- `predict_image`: one square image of `--image` px with sliding windows (overlap as configured) and seam
  de-duplication; s/mm² of image area.
Post-processing is timed at its worst: score threshold 0 with the 512 best proposals per window kept (about the
nuclei count of a 256 µm window) and NMSed. Warm-up call first (compile), then the median of `--repeats` timed calls. Ratios are against the first variant.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import finetune_ndc
from muse_jax import backbone_io
from muse_jax.ndc import head as head_lib
from muse_jax.ndc.infer import Predictor


def make_predictor(variant: str, window: int | None, batch: int | None) -> Predictor:
  cfg = finetune_ndc.get_config(variant)
  model_cfg, bb = backbone_io.load_backbone(f"random:{variant}")
  module = head_lib.build_model(model_cfg, cfg.head, len(cfg.data.class_names))
  s = 8 * int(cfg.head.stride)
  hv = module.head.init(jax.random.key(0), jnp.zeros((1, s // 4, s // 4, int(model_cfg.map_dim))), s)
  variables = {"params": {"backbone": bb["params"], "head": hv["params"]},
               "batch_stats": {"backbone": bb["batch_stats"]} if bb.get("batch_stats") else {}}
  i = cfg.infer
  return Predictor(model_cfg, cfg.head, variables, list(cfg.data.class_names), cfg.data.mpp,
                   window=window or int(i.window), overlap=int(i.overlap), batch_size=batch or int(i.batch_size),
                   score_threshold=0.0, nms_radius_um=float(i.nms_radius_um), max_detections=512)


def timed(fn, repeats: int) -> tuple[float, float]:
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return first, statistics.median(times)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--variants", default="tiny,vit_s16")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--image", type=int, default=1024, help="side of the predict_image test image (px)")
  ap.add_argument("--window", type=int, default=None, help="override the configured window")
  ap.add_argument("--batch", type=int, default=None, help="override the configured batch")
  ap.add_argument("--json", default=None, help="also write the measured rows and parameters to this JSON file")
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  rows = []
  for v in [x.strip() for x in args.variants.split(",") if x.strip()]:
    p = make_predictor(v, args.window, args.batch)
    S, B, mpp = p.window, p.batch_size, p.mpp
    tiles = rng.integers(0, 255, (B, S, S, 3), dtype=np.uint8)
    first, med = timed(lambda: p.predict_tiles(tiles), args.repeats)
    tile_mm2 = (S * mpp / 1000.0) ** 2
    image = rng.integers(0, 255, (args.image, args.image, 3), dtype=np.uint8)
    _, med_img = timed(lambda: p.predict_image(image, mpp), max(1, args.repeats - 1))
    img_mm2 = (args.image * mpp / 1000.0) ** 2
    rows.append({"variant": v, "window": S, "batch": B, "compile_s": first - med, "batch_s": med,
                 "tiles_per_s": B / med, "s_per_mm2_tiles": med / (B * tile_mm2), "image_s": med_img,
                 "s_per_mm2_image": med_img / img_mm2})
  base = rows[0]
  print(f"\ndevice: {jax.devices()[0].device_kind} x{len(jax.devices())}; mpp 0.5; image {args.image}² px; "
        f"median of {args.repeats}\n")
  print("| variant | window | batch | compile s | tiles/s | s/mm² (tiles) | predict_image s | s/mm² (image) | "
        "tiles/s vs first |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {r['window']} | {r['batch']} | {r['compile_s']:.1f} | {r['tiles_per_s']:.2f} | "
          f"{r['s_per_mm2_tiles']:.2f} | {r['image_s']:.2f} | {r['s_per_mm2_image']:.2f} | "
          f"{r['tiles_per_s'] / base['tiles_per_s']:.3f} |")
  print("\ncommand: PYTHONPATH=. .venv/bin/python experiments/bench_predict.py "
        f"--variants {args.variants} --repeats {args.repeats} --image {args.image}")
  if args.json:
    for r in rows:
      r["tiles_per_s_vs_first"] = r["tiles_per_s"] / base["tiles_per_s"]
    pathlib.Path(args.json).write_text(json.dumps(dict(
        benchmark="bench_predict", params={k: v for k, v in vars(args).items() if k != "json"}, mpp=0.5,
        device=f"{jax.devices()[0].device_kind} x{len(jax.devices())}", tables=dict(predict=rows)), indent=1))


if __name__ == "__main__":
  main()
