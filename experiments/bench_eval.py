"""Benchmark of the evaluation hot spots: feature extraction (nuclei/s) and the kNN / linear-probe steps.

  .venv/bin/python experiments/bench_eval.py [--repeats 3] [--tiles 20] [--skip_vit]

1. Feature extraction, eval mode, batch 10 tiles of 224 px (mpp 0.5) cut from the bundled BRCA-M2C sample,
   random-init `tiny` and `vit_s16`: tiles/s and nuclei/s (labelled nuclei), after one warm-up call.
2. kNN (§5.3, all five k) over 18,600 train x 8,900 query nuclei with **synthetic** 384-d features (the size of
   BRCA-M2C's train/test splits and ViT-S/16's f_map): our chunked argpartition vs a baseline that fully sorts
   every similarity row (same chunking), measured in the same run.
3. Linear probe (§5.4, 100 epochs, batch 256) on the same synthetic features: one jitted program (compile
   included in the first call, reported separately).
Prints a table (median of `--repeats`) and the command.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np


def _median_time(fn, repeats):
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _knn_full_sort(train, train_y, query, num_classes, ks, t=0.07, chunk=1024):
  """Baseline: the same vote, but every similarity row is fully argsorted."""
  from muse_jax.evaluation import knn
  train, query = knn.l2_normalize(train), knn.l2_normalize(query)
  onehot = np.eye(num_classes)[train_y]
  out = {k: np.empty(len(query), np.int32) for k in ks}
  for s in range(0, len(query), chunk):
    sim = query[s:s + chunk] @ train.T
    idx = np.argsort(-sim, axis=1)[:, :max(ks)]
    w = np.exp(np.take_along_axis(sim, idx, 1) / t)
    cum = np.cumsum(w[:, :, None] * onehot[idx], axis=1)
    for k in ks:
      out[k][s:s + chunk] = cum[:, k - 1].argmax(1)
  return out


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--tiles", type=int, default=20)
  p.add_argument("--skip_vit", action="store_true")
  p.add_argument("--json", default=None, help="also write the measured rows and parameters to this JSON file")
  a = p.parse_args(argv)
  records = []  # machine-readable twin of `rows`
  import jax
  from muse_jax import backbone_io
  from muse_jax.data import eval_tiles, load_labelled
  from muse_jax.evaluation import features, knn, linear

  rows = []
  tiles = eval_tiles.make_eval_tiles(load_labelled("brca_m2c", "bundled", "all"), target_mpp=0.5, size=224)
  tiles = tiles[:a.tiles]
  n_nuclei = sum(int((t["classes"] >= 0).sum()) for t in tiles)
  base_rate = None
  for variant in ("tiny",) + (() if a.skip_vit else ("vit_s16",)):
    cfg, var = backbone_io.load_backbone(f"random:{variant}")
    fn = features.make_feature_fn(cfg, var, image_size=224)
    dt = _median_time(lambda: features.extract_features(tiles, fn, num_classes=3, batch_size=10), a.repeats)
    rate = n_nuclei / dt
    base_rate = base_rate or rate
    rows.append((f"features {variant} 224px, batch 10", f"{dt:.3f} s / {len(tiles)} tiles",
                 f"{len(tiles) / dt:.1f} tiles/s, {rate:.0f} nuclei/s", f"{rate / base_rate:.3f}x tiny"))
    records.append(dict(step="features", variant=variant, size_px=224, batch=10, tiles=len(tiles), nuclei=n_nuclei,
                        seconds=dt, tiles_per_s=len(tiles) / dt, nuclei_per_s=rate, ratio_vs_tiny=rate / base_rate))

  rng = np.random.default_rng(0)
  tr = rng.normal(size=(18600, 384)).astype(np.float32)
  tr_y = rng.integers(0, 3, 18600)
  te = rng.normal(size=(8900, 384)).astype(np.float32)
  te_y = rng.integers(0, 3, 8900)
  t_ours = _median_time(lambda: knn.knn_predict(tr, tr_y, te, 3), a.repeats)
  t_base = _median_time(lambda: _knn_full_sort(tr, tr_y, te, 3, knn.KS), a.repeats)
  ours = knn.knn_predict(tr, tr_y, te, 3)
  base = _knn_full_sort(tr, tr_y, te, 3, knn.KS)
  agree = min(float(np.mean(ours[k] == base[k])) for k in knn.KS)
  rows.append(("kNN 18,600 x 8,900 x 384 (synthetic), 5 k", f"{t_ours:.2f} s", f"{8900 / t_ours:.0f} queries/s",
               f"{t_base / t_ours:.2f}x faster than full sort ({t_base:.2f} s); agreement {agree:.4f}"))
  records.append(dict(step="knn", train=18600, query=8900, dim=384, seconds=t_ours, queries_per_s=8900 / t_ours,
                      baseline_full_sort_seconds=t_base, speedup_vs_full_sort=t_base / t_ours, agreement=agree))

  t0 = time.perf_counter()
  linear.linear_probe(tr, tr_y, te[:3000], te_y[:3000], te, te_y, 3, epochs=100)
  first = time.perf_counter() - t0
  t_lin = _median_time(lambda: linear.linear_probe(tr, tr_y, te[:3000], te_y[:3000], te, te_y, 3, epochs=100),
                       a.repeats)
  rows.append(("linear probe 18,600 x 384, 100 epochs (synthetic)", f"{t_lin:.2f} s",
               f"{100 * (18600 // 256) / t_lin:.0f} steps/s", f"first call incl. compile {first:.2f} s"))
  records.append(dict(step="linear_probe", train=18600, dim=384, epochs=100, seconds=t_lin,
                      steps_per_s=100 * (18600 // 256) / t_lin, first_call_seconds=first))

  print(f"devices: {jax.devices()}; {n_nuclei} labelled nuclei in {len(tiles)} tiles")
  print("| step | median time | rate | note |")
  print("| --- | --- | --- | --- |")
  for r in rows:
    print("| " + " | ".join(r) + " |")
  print("\ncommand: .venv/bin/python experiments/bench_eval.py " + " ".join(sys.argv[1:] if argv is None else argv))
  if a.json:
    pathlib.Path(a.json).write_text(json.dumps(dict(
        benchmark="bench_eval", params={k: v for k, v in vars(a).items() if k != "json"},
        devices=[str(d) for d in jax.devices()], tables=dict(eval=records)), indent=1))


if __name__ == "__main__":
  main()
