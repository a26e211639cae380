"""Point-matching detection/classification metrics of the NDC benchmarks (pure NumPy/SciPy).

Every mode matches predicted points to ground-truth points one-to-one within a radius and reports detection F1
(class-agnostic matching), per-class precision/recall/F1 (matching within each class, so a wrong class is one FP
and one FN) and their unweighted mean. The modes differ exactly where the peers' scripts differ
(`PEERS.md` §2.1, §2.2):

- `muse` (MUSE/DeNuC): predictions in descending score order each take the nearest unmatched GT with distance
  <= r; TP/FP/FN pooled over all images; P = R = F1 = 0 when undefined.
- `ocelot` (OCELOT 2023 `evaluation/eval.py`): the same greedy-by-score rule (distance <= r), pooled counts,
  P = TP/(TP+FP+1e-7), R = TP/(#GT+1e-7), F1 = 2PR/(P+R+1e-7), each rounded to 4 decimals.
- `mcspatnet` (BRCA-M2C's own `03_eval_localization_fscore.py`): points are rasterised to integer pixels (round,
  duplicates merged as in a dot map); each GT in row-major order takes the nearest still-unused prediction with
  distance < r (`KDTree.query(k=50, distance_upper_bound=r)`, strict); pooled counts; 0/0 precision or recall is 1.
- `puma` (PUMA 2024 `eval_nuclei.py`/`evaluate.py`): per image, each GT in file order takes, among the unused
  same-class predictions with distance < r (strict), the highest-scoring one (ties: nearest). F1 per class per
  image; a class absent from an image (no GT and no prediction) scores 0 for that image; per-class values are
  the sum over images divided by the number of images; the mean is over classes seen anywhere. Detection F1 uses
  the same rule class-agnostically (our addition; PUMA reports no detection F1).
- `hungarian` (robustness check, HoVer-Net-style pairing per class): maximum-cardinality minimum-distance
  assignment (`scipy.optimize.linear_sum_assignment`) among pairs with distance <= r; pooled counts.

Radius: `radius_px` if given, else `radius_um / mpp` (3 µm default: 6 px at 0.5 µm/px, 12 px at 0.25, 15 px at 0.2).
Coordinates are (x, y) pixels of the image the points belong to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize
from scipy.spatial import KDTree

MODES = ("muse", "mcspatnet", "ocelot", "puma", "hungarian")
DEFAULT_RADIUS_UM = 3.0

PointSet = Mapping[str, Any]  # {'points': [K,2] (x,y), 'classes': [K] int, 'scores': [K] (optional)}


def _as_set(d: PointSet, what: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  if "points" not in d or "classes" not in d:
    raise ValueError(f"{what}[{index}]: expected keys 'points' and 'classes', got {sorted(d)}")
  pts = np.asarray(d["points"], np.float64).reshape(-1, 2)
  cls = np.asarray(d["classes"], np.int64).reshape(-1)
  if len(cls) != len(pts):
    raise ValueError(f"{what}[{index}]: {len(pts)} points but {len(cls)} classes")
  sc = d.get("scores")
  sc = np.ones(len(pts)) if sc is None else np.asarray(sc, np.float64).reshape(-1)
  if len(sc) != len(pts):
    raise ValueError(f"{what}[{index}]: {len(pts)} points but {len(sc)} scores")
  return pts, cls, sc


def match_greedy_by_score(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, radius: float) -> int:
  """MUSE/DeNuC/OCELOT rule: by descending score, each prediction takes the nearest free GT with d <= radius.

  Returns:
    the number of true positives.
  """
  if len(pred) == 0 or len(gt) == 0:
    return 0
  d = np.linalg.norm(pred[:, None, :] - gt[None, :, :], axis=-1)
  free = np.ones(len(gt), bool)
  tp = 0
  for i in np.argsort(-scores, kind="stable"):
    cand = np.nonzero(free & (d[i] <= radius))[0]
    if len(cand):
      free[cand[np.argmin(d[i, cand])]] = False
      tp += 1
  return tp


def _raster(points: np.ndarray) -> np.ndarray:
  """Integer pixel positions as a dot map would hold them: rounded, de-duplicated, row-major order."""
  if len(points) == 0:
    return np.zeros((0, 2))
  p = np.unique(np.round(points).astype(np.int64)[:, ::-1], axis=0)  # (row, col), sorted row-major
  return p[:, ::-1].astype(np.float64)


def match_mcspatnet(pred: np.ndarray, gt: np.ndarray, radius: float, k: int = 50) -> tuple[int, int, int]:
  """MCSpatNet rule on rasterised points. Returns (tp, n_pred, n_gt) after rasterisation."""
  pred, gt = _raster(pred), _raster(gt)
  if len(pred) == 0 or len(gt) == 0:
    return 0, len(pred), len(gt)
  tree = KDTree(pred)
  used = np.zeros(len(pred), bool)
  tp = 0
  for g in gt:
    _, idx = tree.query(g[None], k=min(k, len(pred)), distance_upper_bound=radius)
    for j in np.atleast_1d(idx[0]):
      if j < len(pred) and not used[j]:
        used[j] = True
        tp += 1
        break
  return tp, len(pred), len(gt)


def match_puma(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, radius: float) -> int:
  """PUMA rule: each GT (file order) takes the best-scoring unused prediction with d < radius (ties: nearest)."""
  if len(pred) == 0 or len(gt) == 0:
    return 0
  d = np.linalg.norm(gt[:, None, :] - pred[None, :, :], axis=-1)
  free = np.ones(len(pred), bool)
  tp = 0
  for i in range(len(gt)):
    cand = np.nonzero(free & (d[i] < radius))[0]
    if len(cand):
      best = cand[np.lexsort((d[i, cand], -scores[cand]))[0]]
      free[best] = False
      tp += 1
  return tp


def match_hungarian(pred: np.ndarray, gt: np.ndarray, radius: float) -> int:
  """Maximum number of pairs with d <= radius, at minimum total distance (linear_sum_assignment)."""
  if len(pred) == 0 or len(gt) == 0:
    return 0
  d = np.linalg.norm(pred[:, None, :] - gt[None, :, :], axis=-1)
  ok = d <= radius
  if not ok.any():
    return 0
  big = radius * (min(d.shape) + 1) + 1.0
  rows, cols = optimize.linear_sum_assignment(np.where(ok, d, big))
  return int(ok[rows, cols].sum())


def _prf(tp: float, fp: float, fn: float, mode: str) -> tuple[float, float, float]:
  if mode == "ocelot":
    p = tp / (tp + fp + 1e-7)
    r = tp / (tp + fn + 1e-7)
    f = 2 * p * r / (p + r + 1e-7)
    return round(p, 4), round(r, 4), round(f, 4)
  if mode == "mcspatnet":
    p = 1.0 if tp + fp == 0 else tp / (tp + fp)
    r = 1.0 if tp + fn == 0 else tp / (tp + fn)
  else:
    p = tp / (tp + fp) if tp + fp > 0 else 0.0
    r = tp / (tp + fn) if tp + fn > 0 else 0.0
  f = 2 * p * r / (p + r) if p + r > 0 else 0.0
  return p, r, f


def _count(mode: str, pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, radius: float) -> tuple[int, int, int]:
  """(tp, fp, fn) of one image and one class (or class-agnostic)."""
  if mode == "mcspatnet":
    tp, npred, ngt = match_mcspatnet(pred, gt, radius)
    return tp, npred - tp, ngt - tp
  if mode in ("muse", "ocelot"):
    tp = match_greedy_by_score(pred, scores, gt, radius)
  elif mode == "puma":
    tp = match_puma(pred, scores, gt, radius)
  else:
    tp = match_hungarian(pred, gt, radius)
  return tp, len(pred) - tp, len(gt) - tp


def evaluate(
  preds: Sequence[PointSet],
  gts: Sequence[PointSet],
  *,
  mode: str = "muse",
  num_classes: int | None = None,
  class_names: Sequence[str] | None = None,
  mpp: float | Sequence[float] | None = None,
  radius_um: float = DEFAULT_RADIUS_UM,
  radius_px: float | None = None,
) -> dict[str, Any]:
  """Scores predicted points against ground truth under one benchmark's rule.

  Args:
    preds: per image `{'points': [K,2] (x,y) px, 'classes': [K] int in [0,C), 'scores': [K]}`.
    gts: per image `{'points': [N,2], 'classes': [N]}` (same order as `preds`). GT class -1 (unknown) counts for
      detection only.
    mode: one of `MODES`.
    num_classes: C (default: len(class_names), else 1 + the largest class seen).
    class_names: names for the per-class entries (default 'class_<i>').
    mpp: µm/px of the images (a scalar or one per image); needed unless `radius_px` is given.
    radius_um: matching radius in µm (default 3).
    radius_px: matching radius in px (overrides `radius_um`/`mpp`).

  Returns:
    `{'mode', 'radius_px', 'num_images', 'detection': {tp, fp, fn, precision, recall, f1},
      'classes': {name: {tp, fp, fn, precision, recall, f1}}, 'mean_precision', 'mean_recall', 'mean_f1'}`.
    For `puma` the precision/recall/F1 are per-image averages and the counts are pooled for reference.
  """
  if mode not in MODES:
    raise ValueError(f"mode: got {mode!r}, expected one of {MODES}")
  if len(preds) != len(gts):
    raise ValueError(f"got {len(preds)} prediction sets but {len(gts)} ground-truth sets")
  n = len(gts)
  if radius_px is not None:
    radii = np.full(n, float(radius_px))
  else:
    if mpp is None:
      raise ValueError("give mpp (µm/px of the images) or radius_px")
    radii = np.broadcast_to(radius_um / np.asarray(mpp, np.float64), (n,)).astype(np.float64)
    if not np.all(np.isfinite(radii)) or np.any(radii <= 0):
      raise ValueError(f"mpp: got {mpp!r}, expected positive µm/px")
  P = [_as_set(p, "preds", i) for i, p in enumerate(preds)]
  G = [_as_set(g, "gts", i) for i, g in enumerate(gts)]
  if class_names is not None:
    num_classes = len(class_names) if num_classes is None else num_classes
  if num_classes is None:
    seen = [c.max() for _, c, _ in P + [(g[0], g[1], g[2]) for g in G] if len(c)]
    num_classes = int(max(seen, default=0)) + 1
  names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"class_names: got {len(names)} names for {num_classes} classes")

  # counts[k, i] = (tp, fp, fn) for k = class (0..C-1) or detection (C), image i.
  counts = np.zeros((num_classes + 1, n, 3), np.int64)
  present = np.zeros((num_classes + 1, n), bool)
  for i, ((pp, pc, ps), (gp, gc, _)) in enumerate(zip(P, G)):
    counts[num_classes, i] = _count(mode, pp, ps, gp, radii[i])
    present[num_classes, i] = True
    for c in range(num_classes):
      pm, gm = pc == c, gc == c
      counts[c, i] = _count(mode, pp[pm], ps[pm], gp[gm], radii[i])
      present[c, i] = pm.any() or gm.any()

  def entry(k: int) -> dict[str, Any]:
    tp, fp, fn = (int(v) for v in counts[k].sum(0))
    if mode == "puma":
      prf = np.array([_prf(*counts[k, i], mode) if present[k, i] else (0.0, 0.0, 0.0) for i in range(n)])
      p, r, f = (float(v) for v in (prf.sum(0) / max(n, 1)))
    else:
      p, r, f = _prf(tp, fp, fn, mode)
    return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r, "f1": f}

  classes = {names[c]: entry(c) for c in range(num_classes)}
  used = [names[c] for c in range(num_classes) if mode != "puma" or present[c].any()]
  mean = lambda key: float(np.mean([classes[c][key] for c in used])) if used else 0.0  # noqa: E731
  return {
    "mode": mode,
    "radius_px": float(radii[0]) if n and np.all(radii == radii[0]) else [float(r) for r in radii],
    "num_images": n,
    "detection": entry(num_classes),
    "classes": classes,
    "mean_precision": mean("precision"),
    "mean_recall": mean("recall"),
    "mean_f1": mean("f1"),
  }


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of detection F1, per-class F1 and mean F1 (in %), one row per result."""
  if not results:
    return ""
  names = list(results[0]["classes"])
  head = ["mode", "radius px", "F_det"] + [f"F_{n}" for n in names] + ["F_mean"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    rad = r["radius_px"] if isinstance(r["radius_px"], float) else "per image"
    vals = [r["mode"], f"{rad:.2f}" if isinstance(rad, float) else rad, f"{100 * r['detection']['f1']:.2f}"]
    vals += [f"{100 * r['classes'][n]['f1']:.2f}" for n in names] + [f"{100 * r['mean_f1']:.2f}"]
    rows.append("| " + " | ".join(vals) + " |")
  return "\n".join(rows)
