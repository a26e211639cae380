"""Point-matching detection/classification metrics of the NDC benchmarks (pure NumPy/SciPy).

Every mode matches predicted points to ground-truth points one-to-one within a radius and reports detection F1
(class-agnostic matching), per-class precision/recall/F1 (matching within each class, so a wrong class is one FP
and one FN) and their unweighted mean. Each benchmark mode gives the counts its published evaluation script gives,
ties and rounding included (`PEERS.md` §2; `tests/test_score_equivalence.py` checks each against a plain
transcription of the published loop on hundreds of random point sets):

- `muse` (MUSE/DeNuC `get_match`, `multi_cls_eval`): predictions in `np.argsort(-score)` order (NumPy's default
  sort, as the script calls it) each take the nearest unmatched GT if it is within r (`<=`; distances from
  `scipy.spatial.distance_matrix`, float64; equal distances: the first GT in file order). Counts pooled over
  images; P = TP/(#pred + 1e-6), R = TP/(#GT + 1e-6), F1 = 2PR/(P + R + 1e-6), computed in % as the script does.
- `ocelot` (OCELOT 2023 `evaluation/eval.py`): the same greedy-by-score rule, but coordinates, scores and
  distances in float32 (the script's arrays) and the candidates are the GTs within r (`<=`); pooled counts;
  P = TP/(TP+FP+1e-7), R = TP/(#GT+1e-7), F1 = 2PR/(P+R+1e-7), each rounded to 4 decimals.
- `mcspatnet` (BRCA-M2C's `03_eval_localization_fscore.py`): points become dot-map pixels (round half to even,
  duplicates merged); each GT pixel in row-major order takes the first unused prediction of
  `scipy.spatial.KDTree(pred_rc, leafsize=2048).query(gt_rc, k=50, distance_upper_bound=r)` on (row, col)
  coordinates, so equal distances come in the tree's order and the comparison is strict (`<`, as
  `distance_upper_bound` is). Pooled counts; 0/0 precision or recall is 1. The published script adds 6 x #GT
  (not #GT) to FN for every class map (and all-cells map) of an image without predictions (a reused loop
  variable); `mcspatnet_fn_quirk=True` (default) reproduces it, as the published numbers (85.2 / 65.6) did, and
  the result carries both counts under `fn_quirk`.
- `puma` (PUMA 2024 `eval_nuclei.py`, `evaluate.py`): per image, each GT in file order takes, among the remaining
  same-class predictions with d < r (float64), the highest score (then the nearest, then file order); then the
  *first* remaining prediction with the winner's exact coordinates is removed, which is another prediction when
  two share a centroid. F1 per class per image over the classes that image has (GT or prediction); a class's F1
  is the sum over images divided by the number of images; the mean is over classes seen anywhere, and undefined
  (None) when no image has a point. Detection F1 uses the same rule class-agnostically (our addition).
- `hungarian` (robustness check, HoVer-Net-style pairing per class): maximum-cardinality minimum-distance
  assignment (`scipy.optimize.linear_sum_assignment`) among pairs with distance <= r; pooled counts.

Radius: `radius_px` if given; else `radius_um / mpp` if `radius_um` is given; else the benchmark's own radius in
pixels (`RULES`: MCSpatNet 6 px, MUSE/DeNuC 12 px, OCELOT 15 px, PUMA 15 px) when the images' mpp is within 10%
of the benchmark's, otherwise 3 µm / mpp. A radius within 1e-9 px of an integer is that integer (3 µm at
0.2 µm/px is 15 px, not 14.999999999999998).

Coordinates are (x, y) pixels of the image the points belong to, taken in float64 (float32 for `ocelot`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy
from scipy import optimize
from scipy import spatial

MODES = ("muse", "mcspatnet", "ocelot", "puma", "hungarian")
DEFAULT_RADIUS_UM = 3.0
NATIVE_MPP_TOLERANCE = 0.1  # relative: the benchmark's own radius applies for mpp within 10% of its mpp
MCSPATNET_LEAFSIZE, MCSPATNET_K = 2048, 50
MCSPATNET_FN_QUIRK_FACTOR = 6  # the script's max_dist_thresh: FN += 6 x #GT for a map without predictions

PointSet = Mapping[str, Any]  # {'points': [K,2] (x,y), 'classes': [K] int, 'scores': [K] (optional)}


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one mode matches: the benchmark's script, its own radius and resolution, comparison, precision, ties."""

  script: str
  native_mpp: float | None  # µm/px of the benchmark's images (None: no native radius)
  native_radius_px: float | None
  comparison: str  # '<=' or '<'
  distance_dtype: str
  tie_rule: str


RULES = {
  "muse": Rule("DeNuC utils/basic_utils.py get_match + multi_cls_eval (MUSE/DeNuC)", 0.25, 12.0, "<=", "float64",
               "predictions in np.argsort(-score) order (NumPy default sort, as the script); each takes the nearest "
               "unmatched GT; equal distances: the first GT in file order"),
  "ocelot": Rule("OCELOT 2023 evaluation/eval.py", 0.2, 15.0, "<=", "float32",
                 "predictions in np.argsort(-probability) order on float32 scores (NumPy default sort, as the "
                 "script); each takes the nearest free GT within r; equal distances: the first GT in file order"),
  "mcspatnet": Rule("MCSpatNet 03_eval_localization_fscore.py (BRCA-M2C)", 0.5, 6.0, "<", "float64",
                    "points rounded to dot-map pixels (half to even, duplicates merged); GT pixels in row-major "
                    "order; each takes the first unused prediction of scipy KDTree(leafsize=2048).query(k=50, "
                    f"distance_upper_bound=r) on (row, col), equal distances in the tree's order (SciPy "
                    f"{scipy.__version__})"),
  "puma": Rule("PUMA 2024 eval_nuclei.py + evaluate.py", 0.24, 15.0, "<", "float64",
               "GTs in file order; each takes the remaining same-class prediction with the highest score, then "
               "the nearest, then the first in file order; then the first remaining prediction with the winner's "
               "exact coordinates is removed (another one when centroids coincide)"),
  "hungarian": Rule("robustness check (HoVer-Net-style pairing, scipy linear_sum_assignment)", None, None, "<=",
                    "float64", "maximum number of pairs within r at minimum total distance (SciPy's assignment)"),
}


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
  if not (np.all(np.isfinite(pts)) and np.all(np.isfinite(sc))):
    raise ValueError(f"{what}[{index}]: points and scores must be finite")
  return pts, cls, sc


# ------------------------------------------------------------------------------------------------ matching rules


def match_greedy_by_score(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, radius: float) -> int:
  """MUSE/DeNuC `get_match`: by `np.argsort(-scores)`, each prediction takes the nearest unmatched GT if d <= radius.

  Args:
    pred: [P, 2] predicted (x, y) px; scores: [P]; gt: [G, 2]; radius: px.

  Returns:
    the number of true positives.
  """
  if len(pred) == 0 or len(gt) == 0:
    return 0
  order = np.argsort(-scores)
  d = spatial.distance_matrix(pred[order], gt)  # float64, as the script computes it
  free = np.ones(len(gt), bool)
  tp = 0
  for i in range(len(order)):
    j = int(np.argmin(np.where(free, d[i], np.inf)))  # first of the equally nearest free GTs
    if d[i, j] <= radius:
      free[j] = False
      tp += 1
      if tp == len(gt):
        break
  return tp


def match_ocelot(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, radius: float) -> int:
  """OCELOT `_calc_scores`: float32 points and scores; by `np.argsort(-scores)`, each prediction takes the nearest
  free GT among those with d <= radius (equal distances: the first GT). Returns the number of true positives."""
  if len(pred) == 0 or len(gt) == 0:
    return 0
  p32, g32 = np.asarray(pred, np.float32), np.asarray(gt, np.float32)
  d = np.linalg.norm(p32.reshape(-1, 1, 2) - g32.reshape(1, -1, 2), axis=2)  # float32, as the script
  ok = d <= float(radius)  # a Python float compares at the array's precision, like the script's integer cutoff
  tp = 0
  for i in np.argsort(-np.asarray(scores, np.float32)):
    cand = np.nonzero(ok[i])[0]
    if len(cand):
      j = cand[int(np.argmin(d[i, cand]))]
      ok[:, j] = False
      tp += 1
  return tp


def _dot_map_pixels(points: np.ndarray) -> np.ndarray:
  """(row, col) float64 of the dot-map pixels of (x, y) points: rounded half to even, unique, row-major order."""
  if len(points) == 0:
    return np.zeros((0, 2))
  rc = np.rint(np.asarray(points, np.float64)[:, ::-1]).astype(np.int64)
  return np.unique(rc, axis=0).astype(np.float64)  # np.unique sorts rows lexicographically: np.where's order


def match_mcspatnet(pred: np.ndarray, gt: np.ndarray, radius: float) -> tuple[int, int, int]:
  """MCSpatNet `calc` at one radius on dot-map pixels: each GT pixel (row-major) takes the first unused prediction
  of `KDTree(pred, leafsize=2048).query(gt, k=50, distance_upper_bound=radius)` (strictly closer than `radius`).

  Returns:
    (tp, number of prediction pixels, number of GT pixels).
  """
  pred, gt = _dot_map_pixels(pred), _dot_map_pixels(gt)
  if len(pred) == 0 or len(gt) == 0:
    return 0, len(pred), len(gt)
  tree = spatial.KDTree(pred, leafsize=MCSPATNET_LEAFSIZE)
  _, idx = tree.query(gt, k=MCSPATNET_K, distance_upper_bound=radius)
  used = np.zeros(len(pred), bool)
  tp = 0
  for row in idx:
    for j in row:
      if j < len(pred) and not used[j]:
        used[j] = True
        tp += 1
        break
  return tp, len(pred), len(gt)


def match_puma(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, radius: float) -> int:
  """PUMA `calculate_centroid_distance` for one image and class: each GT (file order) takes, among the remaining
  predictions with d < radius, the highest score, then the nearest, then the first; then the first remaining
  prediction with exactly the winner's coordinates is removed. Returns the number of true positives."""
  if len(pred) == 0 or len(gt) == 0:
    return 0
  pred, gt, scores = np.asarray(pred, np.float64), np.asarray(gt, np.float64), np.asarray(scores, np.float64)
  alive = np.ones(len(pred), bool)
  # A superset of the candidates, vectorised; the script's own distance (norm of the 1-D difference) decides.
  near = np.sqrt(((gt[:, None, :] - pred[None, :, :]) ** 2).sum(-1)) < radius * (1 + 1e-9) + 1e-9
  tp = 0
  for g in range(len(gt)):
    cand = np.nonzero(near[g] & alive)[0]
    if not len(cand):
      continue
    dist = np.array([np.linalg.norm(gt[g] - pred[j]) for j in cand])
    keep = dist < radius
    cand, dist = cand[keep], dist[keep]
    if not len(cand):
      continue
    best = cand[np.lexsort((dist, -scores[cand]))[0]]  # lexsort is stable: ties keep file order
    same = alive & (pred[:, 0] == pred[best, 0]) & (pred[:, 1] == pred[best, 1])  # np.array_equal, as the script
    alive[np.nonzero(same)[0][0]] = False
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


def _count(mode: str, pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, radius: float
           ) -> tuple[int, int, int, bool]:
  """(tp, fp, fn, no_predictions) of one image and one class (or class-agnostic), fn without the MCSpatNet quirk."""
  if mode == "mcspatnet":
    tp, npred, ngt = match_mcspatnet(pred, gt, radius)
    return tp, npred - tp, ngt - tp, npred == 0
  if mode == "muse":
    tp = match_greedy_by_score(pred, scores, gt, radius)
  elif mode == "ocelot":
    tp = match_ocelot(pred, scores, gt, radius)
  elif mode == "puma":
    tp = match_puma(pred, scores, gt, radius)
  else:
    tp = match_hungarian(pred, gt, radius)
  return tp, len(pred) - tp, len(gt) - tp, len(pred) == 0


# ------------------------------------------------------------------------------------------------ scores


def _prf(tp: float, fp: float, fn: float, mode: str) -> tuple[float, float, float]:
  if mode == "ocelot":
    p = tp / (tp + fp + 1e-7)
    r = tp / (tp + fn + 1e-7)
    f = 2 * p * r / (p + r + 1e-7)
    return round(p, 4), round(r, 4), round(f, 4)
  if mode == "muse":  # DeNuC multi_cls_eval works in %, with eps = 1e-6
    r = tp * 100 / (tp + fn + 1e-6)
    p = tp * 100 / (tp + fp + 1e-6)
    f = 2 * r * p / (r + p + 1e-6)
    return p / 100, r / 100, f / 100
  if mode == "mcspatnet":
    p = 1.0 if tp + fp == 0 else tp / (tp + fp)
    r = 1.0 if tp + fn == 0 else tp / (tp + fn)
  else:
    p = tp / (tp + fp) if tp + fp > 0 else 0.0
    r = tp / (tp + fn) if tp + fn > 0 else 0.0
  f = 2 * p * r / (p + r) if p + r > 0 else 0.0
  return p, r, f


def _snap(r: float) -> float:
  k = round(r)
  return float(k) if abs(r - k) <= 1e-9 * max(1.0, abs(r)) else float(r)


def resolve_radius(mode: str, n: int, mpp: float | Sequence[float] | None = None, radius_um: float | None = None,
                   radius_px: float | None = None) -> tuple[np.ndarray, np.ndarray | None, str]:
  """The matching radius of `mode` for `n` images (see the module docstring).

  Returns:
    (radius in px [n], radius in µm [n] or None when mpp is unknown, how it was chosen).
  """
  rule = RULES[mode]
  m = None
  if mpp is not None:
    m = np.broadcast_to(np.asarray(mpp, np.float64), (n,)).astype(np.float64)
    if not np.all(np.isfinite(m)) or np.any(m <= 0):
      raise ValueError(f"mpp: got {mpp!r}, expected positive µm/px")
  if radius_px is not None:
    if not radius_px > 0:
      raise ValueError(f"radius_px: got {radius_px!r}, expected a positive radius")
    px = np.full(n, float(radius_px))
    how = "given in px"
  else:
    if m is None:
      raise ValueError("give mpp (µm/px of the images) or radius_px")
    if radius_um is not None:
      if not radius_um > 0:
        raise ValueError(f"radius_um: got {radius_um!r}, expected a positive radius")
      px = np.array([_snap(radius_um / v) for v in m])
      how = "given in µm"
    else:
      native = (np.abs(m / rule.native_mpp - 1) <= NATIVE_MPP_TOLERANCE if rule.native_mpp
                else np.zeros(n, bool))
      px = np.array([rule.native_radius_px if ok else _snap(DEFAULT_RADIUS_UM / v) for ok, v in zip(native, m)])
      if native.all() and n:
        how = f"the benchmark's own: {rule.native_radius_px:g} px at {rule.native_mpp:g} µm/px +-10%"
      elif not native.any():
        how = f"{DEFAULT_RADIUS_UM:g} µm" + (", mpp not the benchmark's" if rule.native_mpp else "")
      else:
        how = f"the benchmark's own where the image's mpp is its, else {DEFAULT_RADIUS_UM:g} µm"
  return px, (px * m if m is not None else None), how


def _scalar_or_list(a: np.ndarray | None) -> float | list[float] | None:
  if a is None:
    return None
  return float(a[0]) if len(a) and np.all(a == a[0]) else [float(v) for v in a]


def evaluate(
  preds: Sequence[PointSet],
  gts: Sequence[PointSet],
  *,
  mode: str = "muse",
  num_classes: int | None = None,
  class_names: Sequence[str] | None = None,
  mpp: float | Sequence[float] | None = None,
  radius_um: float | None = None,
  radius_px: float | None = None,
  mcspatnet_fn_quirk: bool = True,
) -> dict[str, Any]:
  """Scores predicted points against ground truth under one benchmark's rule.

  Args:
    preds: per image `{'points': [K,2] (x,y) px, 'classes': [K] int in [0,C), 'scores': [K]}`.
    gts: per image `{'points': [N,2], 'classes': [N] int in [0,C) or -1}` (same order as `preds`). GT class -1
      (unknown) counts for detection only.
    mode: one of `MODES`.
    num_classes: C (default: len(class_names), else 1 + the largest class seen).
    class_names: names for the per-class entries (default 'class_<i>').
    mpp: µm/px of the images (a scalar or one per image); needed unless `radius_px` is given.
    radius_um: matching radius in µm (default: the benchmark's own radius, see the module docstring).
    radius_px: matching radius in px (overrides `radius_um`/`mpp`).
    mcspatnet_fn_quirk: `mcspatnet` only: count 6 x #GT as FN for a map without predictions, as the published
      script does (False: #GT).

  Returns:
    `{'mode', 'script', 'radius_px', 'radius_um', 'radius_rule', 'comparison', 'distance_dtype', 'tie_rule',
      'fn_quirk_applied', 'num_images', 'detection': {tp, fp, fn, precision, recall, f1},
      'classes': {name: {tp, fp, fn, precision, recall, f1}}, 'mean_precision', 'mean_recall', 'mean_f1'}`,
    radii a float or one per image. For `puma` the precision/recall/F1 are per-image averages (None where
    undefined) and the counts are pooled for reference. For `mcspatnet` also `'fn_quirk': {'factor',
    'maps_without_predictions', 'with_quirk', 'without_quirk'}`, the scores both ways.

  Raises:
    ValueError: a prediction class outside [0, C) or a GT class outside [-1, C).
  """
  if mode not in MODES:
    raise ValueError(f"mode: got {mode!r}, expected one of {MODES}")
  if len(preds) != len(gts):
    raise ValueError(f"got {len(preds)} prediction sets but {len(gts)} ground-truth sets")
  n = len(gts)
  radii, radii_um, how = resolve_radius(mode, n, mpp, radius_um, radius_px)
  P = [_as_set(p, "preds", i) for i, p in enumerate(preds)]
  G = [_as_set(g, "gts", i) for i, g in enumerate(gts)]
  if class_names is not None:
    num_classes = len(class_names) if num_classes is None else num_classes
  if num_classes is None:
    seen = [c.max() for _, c, _ in P + G if len(c)]
    num_classes = int(max(seen, default=0)) + 1
  names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"class_names: got {len(names)} names for {num_classes} classes")
  for what, sets, low in (("preds", P, 0), ("gts", G, -1)):
    for i, (_, c, _) in enumerate(sets):
      bad = c[(c < low) | (c >= num_classes)]
      if len(bad):
        raise ValueError(f"{what}[{i}]: class {int(bad[0])} outside {low}..{num_classes - 1} ({names})")

  # counts[k, i] = (tp, fp, fn) for k = class (0..C-1) or detection (C), image i; fn without the quirk.
  counts = np.zeros((num_classes + 1, n, 3), np.int64)
  empty = np.zeros((num_classes + 1, n), bool)  # no predictions in that map of that image
  present = np.zeros((num_classes + 1, n), bool)  # puma: the image has a GT or a prediction of that class
  for i, ((pp, pc, ps), (gp, gc, _)) in enumerate(zip(P, G)):
    masks = [(pc == c, gc == c) for c in range(num_classes)] + [(np.ones(len(pp), bool), np.ones(len(gp), bool))]
    for k, (pm, gm) in enumerate(masks):
      tp, fp, fn, empty[k, i] = _count(mode, pp[pm], ps[pm], gp[gm], radii[i])
      counts[k, i] = tp, fp, fn
      present[k, i] = pm.any() or gm.any()

  def scores(cnt: np.ndarray) -> dict[str, Any]:
    def entry(k: int) -> dict[str, Any]:
      tp, fp, fn = (int(v) for v in cnt[k].sum(0))
      if mode == "puma":
        if not present[k].any():
          p = r = f = None
        else:
          prf = np.array([_prf(*cnt[k, i], mode) if present[k, i] else (0.0, 0.0, 0.0) for i in range(n)])
          p, r, f = (float(v) for v in prf.sum(0) / n)
      else:
        p, r, f = _prf(tp, fp, fn, mode)
      return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r, "f1": f}

    classes = {names[c]: entry(c) for c in range(num_classes)}
    used = [c for c in names if classes[c]["f1"] is not None]
    mean = lambda key: float(np.mean([classes[c][key] for c in used])) if used else None  # noqa: E731
    return {"detection": entry(num_classes), "classes": classes, "mean_precision": mean("precision"),
            "mean_recall": mean("recall"), "mean_f1": mean("f1")}

  rule = RULES[mode]
  out = {
    "mode": mode,
    "script": rule.script,
    "radius_px": _scalar_or_list(radii),
    "radius_um": _scalar_or_list(radii_um),
    "radius_rule": how,
    "comparison": rule.comparison,
    "distance_dtype": rule.distance_dtype,
    "tie_rule": rule.tie_rule,
    "fn_quirk_applied": mode == "mcspatnet" and mcspatnet_fn_quirk,
    "num_images": n,
  }
  if mode != "mcspatnet":
    return {**out, **scores(counts)}
  quirk = counts.copy()
  quirk[:, :, 2] += np.where(empty, (MCSPATNET_FN_QUIRK_FACTOR - 1) * counts[:, :, 2], 0)
  with_quirk, without_quirk = scores(quirk), scores(counts)
  out.update(with_quirk if mcspatnet_fn_quirk else without_quirk)
  out["fn_quirk"] = {"factor": MCSPATNET_FN_QUIRK_FACTOR,
                     "maps_without_predictions": int((empty & (counts[:, :, 2] > 0)).sum()),
                     "with_quirk": with_quirk, "without_quirk": without_quirk}
  return out


def _pct(v: float | None) -> str:
  return "undefined" if v is None else f"{100 * v:.2f}"


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table of detection F1, per-class F1 and mean F1 (in %; 'undefined' where no value exists), one
  row per result, with the radius each mode used in px and µm."""
  if not results:
    return ""
  names = list(results[0]["classes"])
  head = ["mode", "radius px", "radius µm", "F_det"] + [f"F_{n}" for n in names] + ["F_mean"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    rad = [f"{v:.2f}" if isinstance(v, float) else ("-" if v is None else "per image")
           for v in (r["radius_px"], r.get("radius_um"))]
    vals = [r["mode"], *rad, _pct(r["detection"]["f1"])]
    vals += [_pct(r["classes"][n]["f1"]) for n in names] + [_pct(r["mean_f1"])]
    rows.append("| " + " | ".join(vals) + " |")
  return "\n".join(rows)


def describe(result: Mapping[str, Any]) -> str:
  """One paragraph on how a result was scored: script, radius (px, µm, why), comparison, precision, ties, quirk."""
  r = result
  rad = (f"{r['radius_px']:g} px" if isinstance(r["radius_px"], float) else "per-image px")
  if isinstance(r.get("radius_um"), float):
    rad += f" = {r['radius_um']:.3g} µm"
  text = (f"{r['mode']}: {r['script']}; radius {rad} [{r['radius_rule']}]; match if d {r['comparison']} r, "
          f"{r['distance_dtype']} distances; ties: {r['tie_rule']}.")
  if r["mode"] == "mcspatnet":
    q = r["fn_quirk"]
    other = q["without_quirk"] if r["fn_quirk_applied"] else q["with_quirk"]
    if r["fn_quirk_applied"]:
      n = q["maps_without_predictions"]
      text += (f" FN quirk of the published script APPLIED ({q['factor']} x #GT as FN for a map without "
               f"predictions: {n} such map(s) with GT here); corrected (--mcspatnet-corrected-fn): ")
    else:
      text += " FN quirk of the published script NOT applied (corrected count); as published: "
    text += f"F_det {_pct(other['detection']['f1'])}, F_mean {_pct(other['mean_f1'])}."
  return text
