"""Randomised equivalence of each benchmark mode with a plain transcription of that benchmark's published loop.

The `published_*` functions below restate, in our own words and as literally as the rule allows, the evaluation
loops of MCSpatNet (`03_eval_localization_fscore.py`: dot maps, KDTree query per GT pixel, the FN added inside a
reused loop), DeNuC (`get_match`, `multi_cls_eval`), OCELOT (`evaluation/eval.py`: float32 arrays, nearest GT
among those within the cutoff) and PUMA (`eval_nuclei.py`, `evaluate.py`: centroid dicts, per-category lists,
removal by centroid equality, per-image F1 averaged over all images). They are deliberately slow and unclever;
`muse_jax.ndc.metrics` must give the same counts and scores on hundreds of seeds of dense lattices (many equal
distances), duplicated points, tied scores and empty images.
"""

import math
import warnings

import numpy as np
import pytest
from scipy import spatial

from muse_jax.ndc import metrics

N_CLASSES = 3
SEEDS = range(300)


# ------------------------------------------------------------------------------------------------ random inputs


def _points(rng, n, kind):
  if n == 0:
    return np.zeros((0, 2))
  if kind == "lattice":  # equal distances everywhere
    step = int(rng.choice([2, 3, 4, 6]))
    return step * rng.integers(0, 9, size=(n, 2)).astype(np.float64)
  if kind == "halves":  # x.5 coordinates: rounding ties for the dot map
    return rng.integers(0, 60, size=(n, 2)) / 2.0
  return np.round(rng.uniform(0, 40, size=(n, 2)), 2)  # the 2 decimals our CSV writer keeps


def _scores(rng, n):
  if rng.random() < 0.5:
    return rng.choice([0.25, 0.5, 0.75, 1.0], size=n)  # many tied scores
  return np.round(rng.uniform(0, 1, size=n), 4)


def random_images(seed):
  """1-4 images of (gt_points, gt_classes, pred_points, pred_classes, pred_scores); some empty, some duplicated."""
  rng = np.random.default_rng(seed)
  images = []
  for _ in range(int(rng.integers(1, 5))):
    kind = str(rng.choice(["lattice", "halves", "decimals"]))
    ng, npr = (int(v) for v in rng.integers(0, 40, size=2))
    if rng.random() < 0.15:
      ng = 0
    if rng.random() < 0.15:
      npr = 0
    gt, pred = _points(rng, ng, kind), _points(rng, npr, kind)
    if npr and ng and rng.random() < 0.5:  # predictions on top of GT points, some of them twice
      pick = rng.integers(0, ng, size=int(rng.integers(1, ng + 1)))
      pred[: min(npr, len(pick))] = gt[pick[: min(npr, len(pick))]]
    if npr > 1 and rng.random() < 0.5:
      dup = rng.integers(0, npr, size=npr // 3 + 1)
      pred[rng.integers(0, npr, size=len(dup))] = pred[dup]
    gc, pc = rng.integers(0, N_CLASSES, size=ng), rng.integers(0, N_CLASSES, size=npr)
    if rng.random() < 0.3:  # a class missing from the predictions of this image
      pc = np.where(pc == rng.integers(0, N_CLASSES), (pc + 1) % N_CLASSES, pc)
    images.append((gt, gc, pred, pc, _scores(rng, npr)))
  return images


def _evaluate(images, mode, radius, **kw):
  preds = [{"points": p, "classes": c, "scores": s} for _, _, p, c, s in images]
  gts = [{"points": g, "classes": c} for g, c, _, _, _ in images]
  return metrics.evaluate(preds, gts, mode=mode, num_classes=N_CLASSES, radius_px=radius, **kw)


def _ours(res):
  """[(tp, fp, fn, precision, recall, f1)] for the classes then detection, and the mean F1."""
  rows = [res["classes"][f"class_{c}"] for c in range(N_CLASSES)] + [res["detection"]]
  return [(r["tp"], r["fp"], r["fn"], r["precision"], r["recall"], r["f1"]) for r in rows], res["mean_f1"]


# ------------------------------------------------------------------------------------------------ MCSpatNet


def published_mcspatnet(images, max_dist_thresh=6):
  """The MCSpatNet script on dot maps built from the points; counts per map (classes, then all cells) and
  threshold 1..max_dist_thresh, i.e. tp/fp/fn[map, thresh]."""
  n_maps = N_CLASSES + 1
  tp, fp, fn = (np.zeros((n_maps, max_dist_thresh + 1)) for _ in range(3))

  def calc(g_dot, e_dot, k):
    e_rows, e_cols = np.where(e_dot > 0)
    if len(e_rows):
      data = np.zeros((len(e_rows), 2))
      data[:, 0], data[:, 1] = e_rows, e_cols
      tree = spatial.KDTree(data, leafsize=2048)
    for dist_thresh in range(1, max_dist_thresh + 1):
      if len(e_rows) == 0:
        for dist_thresh in range(1, max_dist_thresh + 1):  # reuses the name, as the script
          fn[k, dist_thresh] += (g_dot > 0).sum()
        continue
      remaining = e_dot.copy()
      g_rows, g_cols = np.where(g_dot > 0)
      for gi in range(len(g_rows)):
        _, where = tree.query([[g_rows[gi], g_cols[gi]]], k=50, distance_upper_bound=dist_thresh)
        found = False
        for j in where[0]:
          if j < tree.data.shape[0]:
            r, c = int(tree.data[j][0]), int(tree.data[j][1])
            if remaining[r, c] > 0:
              tp[k, dist_thresh] += 1
              remaining[r, c] = 0
              found = True
              break
        if not found:
          fn[k, dist_thresh] += 1
      fp[k, dist_thresh] += remaining.sum()

  for gt, gc, pred, pc, _ in images:
    size = 2 + int(max([v.max() for v in (gt, pred) if len(v)], default=0))
    g_dots = np.zeros((N_CLASSES, size, size), np.uint8)
    for (x, y), c in zip(gt, gc):
      g_dots[c, round(y), round(x)] = 1  # Python's round: half to even, like the script's centre rounding
    e_all = np.zeros((size, size), np.uint8)
    e_cls = np.zeros((N_CLASSES, size, size), np.uint8)
    for (x, y), c in zip(pred, pc):
      e_all[round(y), round(x)] = 1
      e_cls[c, round(y), round(x)] = 1
    for s in range(N_CLASSES):
      calc(g_dots[s], e_cls[s], s)
    calc(g_dots.max(axis=0), e_all, N_CLASSES)
  return tp, fp, fn


def _mcspatnet_prf(tp, fp, fn):
  p = 1 if tp + fp == 0 else tp / (tp + fp)
  r = 1 if tp + fn == 0 else tp / (tp + fn)
  return p, r, (0 if p + r == 0 else 2 * p * r / (p + r))


@pytest.mark.parametrize("seed", SEEDS)
def test_mcspatnet_matches_the_published_loop(seed):
  images = random_images(seed)
  t = 1 + seed % 6
  tp, fp, fn = published_mcspatnet(images)
  published_rows = [(tp[k, t], fp[k, t], fn[k, t], *_mcspatnet_prf(tp[k, t], fp[k, t], fn[k, t]))
                    for k in range(N_CLASSES + 1)]
  rows, mean = _ours(_evaluate(images, "mcspatnet", float(t)))
  assert rows == published_rows
  assert mean == pytest.approx(np.mean([r[5] for r in published_rows[:N_CLASSES]]), abs=1e-15)
  # the corrected count: FN = #GT where a map has no predictions (what the script meant to add)
  fixed = _ours(_evaluate(images, "mcspatnet", float(t), mcspatnet_fn_quirk=False))[0]
  for k, (ours, pub) in enumerate(zip(fixed, published_rows)):
    assert ours[:2] == pub[:2]
    assert ours[2] <= pub[2]


def test_mcspatnet_matches_the_published_loop_when_the_tree_splits():
  # > 2048 prediction pixels: the KDTree has inner nodes, and on this lattice the order of equally distant
  # predictions (and so the counts) depends on building it on (row, col) as the script does, not on (x, y).
  rng = np.random.default_rng(0)
  pred = 2.0 * np.stack(np.meshgrid(np.arange(50), np.arange(50)), -1).reshape(-1, 2)
  pred = pred[rng.random(len(pred)) < 0.9]
  gt = 2.0 * rng.integers(1, 50, size=(1500, 2)) + rng.choice([-1.0, 0.0, 1.0], size=(1500, 2))
  images = [(gt, np.zeros(len(gt), int), pred, np.zeros(len(pred), int), np.ones(len(pred)))]
  tp, fp, fn = published_mcspatnet(images)
  for t in (2, 3):
    d = _evaluate(images, "mcspatnet", float(t))["detection"]
    assert (d["tp"], d["fp"], d["fn"]) == (tp[N_CLASSES, t], fp[N_CLASSES, t], fn[N_CLASSES, t])


# ------------------------------------------------------------------------------------------------ MUSE / DeNuC


def published_denuc(images, match_dist, eps=1e-6):
  """DeNuC multi_cls_eval: pooled matches; returns [(tp, fp, fn, P, R, F1)] per class then detection, mean F1."""

  def get_match(gt_points, pred_points, pred_scores):
    if gt_points.shape[0] == 0 or pred_points.shape[0] == 0:
      return 0
    order = np.argsort(-pred_scores)
    dis = spatial.distance_matrix(pred_points[order], gt_points)
    unmatched = np.ones(len(gt_points), dtype=bool)
    for i in range(len(pred_points)):
      nearest = dis[i, unmatched].argmin()
      if dis[i, unmatched][nearest] <= match_dist:
        unmatched[np.where(unmatched)[0][nearest]] = False
      if not np.any(unmatched):
        break
    return int(np.sum(~unmatched))

  n_pred, n_gt, n_match = np.zeros(N_CLASSES + 1), np.zeros(N_CLASSES + 1), np.zeros(N_CLASSES + 1)
  for gt, gc, pred, pc, sc in images:
    n_pred[N_CLASSES] += len(pred)
    n_gt[N_CLASSES] += len(gt)
    n_match[N_CLASSES] += get_match(gt, pred, sc)
    for c in range(N_CLASSES):
      n_gt[c] += (gc == c).sum()
      n_pred[c] += (pc == c).sum()
      n_match[c] += get_match(gt[gc == c], pred[pc == c], sc[pc == c])
  recall = n_match * 100 / (n_gt + eps)
  precision = n_match * 100 / (n_pred + eps)
  f1 = (2 * recall * precision) / (recall + precision + eps)
  rows = [(n_match[k], n_pred[k] - n_match[k], n_gt[k] - n_match[k], precision[k] / 100, recall[k] / 100,
           f1[k] / 100) for k in range(N_CLASSES + 1)]
  return rows, float(np.mean(f1[:N_CLASSES]) / 100)


@pytest.mark.parametrize("seed", SEEDS)
def test_muse_matches_the_published_loop(seed):
  images = random_images(seed)
  radius = float([12, 6, 4, 5.5][seed % 4])
  rows, mean = _ours(_evaluate(images, "muse", radius))
  pub_rows, pub_mean = published_denuc(images, radius)
  for ours, pub in zip(rows, pub_rows):
    assert ours[:3] == pub[:3]
    assert ours[3:] == pytest.approx(pub[3:], rel=1e-12, abs=1e-15)
  assert mean == pytest.approx(pub_mean, rel=1e-12, abs=1e-15)


# ------------------------------------------------------------------------------------------------ OCELOT


def published_ocelot(images, cutoff):
  """OCELOT eval.py per class (1-based classes as the script; detection = one extra class over all points)."""
  det = N_CLASSES + 1
  per_image = []
  for gt, gc, pred, pc, sc in images:
    preds = [(x, y, int(c) + 1, s) for (x, y), c, s in zip(pred, pc, sc)] + [(x, y, det, s) for (x, y), s in
                                                                                zip(pred, sc)]
    gts = [(x, y, int(c) + 1, 1.0) for (x, y), c in zip(gt, gc)] + [(x, y, det, 1.0) for x, y in gt]
    sample = {}
    for cls_idx in range(1, det + 1):
      pred_cls = np.array([p for p in preds if p[2] == cls_idx], np.float32)
      gt_cls = np.array([g for g in gts if g[2] == cls_idx], np.float32)
      if len(gt_cls) == 0:
        gt_cls = np.zeros(shape=(0, 4))
      if len(pred_cls) == 0:
        distance, confidence = np.zeros([0, len(gt_cls)]), np.zeros([0, len(gt_cls)])
      else:
        distance = np.linalg.norm(pred_cls[:, :2].reshape([-1, 1, 2]) - gt_cls[:, :2].reshape([1, -1, 2]), axis=2)
        confidence = pred_cls[:, 3]
      sample[cls_idx] = (distance, confidence)
    per_image.append(sample)
  rows = []
  for cls_idx in range(1, det + 1):
    n_gt = n_tp = n_fp = 0
    for sample in per_image:
      distance, confidence = sample[cls_idx]
      candidates = distance <= cutoff
      for pred_idx in np.argsort(-confidence):
        neighbours = candidates[pred_idx].nonzero()[0]
        if len(neighbours) == 0:
          n_fp += 1
        else:
          gt_idx = min(neighbours, key=lambda j: distance[pred_idx, j])
          n_tp += 1
          candidates[:, gt_idx] = False
      n_gt += distance.shape[1]
    p = n_tp / (n_tp + n_fp + 1e-7)
    r = n_tp / (n_gt + 1e-7)
    f = 2 * p * r / (p + r + 1e-7)
    rows.append((n_tp, n_fp, n_gt - n_tp, round(p, 4), round(r, 4), round(f, 4)))
  return rows, sum(r[5] for r in rows[:N_CLASSES]) / N_CLASSES


@pytest.mark.parametrize("seed", SEEDS)
def test_ocelot_matches_the_published_loop(seed):
  images = random_images(seed)
  radius = float([15, 6, 4, 7.3][seed % 4])
  rows, mean = _ours(_evaluate(images, "ocelot", radius))
  pub_rows, pub_mean = published_ocelot(images, radius)
  assert rows == pub_rows
  assert mean == pytest.approx(pub_mean, abs=1e-15)


# ------------------------------------------------------------------------------------------------ PUMA


def published_puma(images, radius):
  """PUMA eval_nuclei.py per image (categories by name; detection as one category over all points) and
  evaluate.py's average over all images. Returns ({category: f1 or absent}, macro F1 or NaN, {category: tp})."""

  def one_image(gt_features, pred_features):
    by_category = {}
    for pf in pred_features:
      by_category.setdefault(pf["category"], []).append(pf)
    matched = []
    for gf in gt_features:
      eligible = []
      for pf in by_category.get(gf["category"], []):
        d = np.linalg.norm(np.array(gf["centroid"]) - np.array(pf["centroid"]))
        if d < radius:
          eligible.append({"distance": d, "pred_score": pf["score"], "pred_feature": pf})
      eligible.sort(key=lambda e: (-e["pred_score"], e["distance"]))
      if eligible:
        best = eligible[0]
        matched.append(best["pred_feature"]["category"])
        for i, pf in enumerate(by_category[gf["category"]]):
          if np.array_equal(pf["centroid"], best["pred_feature"]["centroid"]):
            del by_category[gf["category"]][i]
            break
    gt_n = dict(zip(*np.unique([f["category"] for f in gt_features], return_counts=True)))
    pred_n = dict(zip(*np.unique([f["category"] for f in pred_features], return_counts=True)))
    tp_n = dict(zip(*np.unique(matched, return_counts=True)))
    out = {}
    for cat in np.unique(list(gt_n.keys()) + list(pred_n.keys())):
      tp = tp_n.get(cat, 0)
      fp, fn = pred_n.get(cat, 0) - tp, gt_n.get(cat, 0) - tp
      p = tp / (tp + fp) if tp + fp > 0 else 0
      r = tp / (tp + fn) if tp + fn > 0 else 0
      out[str(cat)] = (tp, 2 * p * r / (p + r) if p + r > 0 else 0)
    return out

  f1_sum, tp_sum = {}, {}
  for gt, gc, pred, pc, sc in images:
    def feats(points, classes, scores):
      out = [{"category": f"class_{c}", "centroid": [float(x), float(y)], "score": float(s)}
             for (x, y), c, s in zip(points, classes, scores)]
      return out + [{"category": "detection", "centroid": [float(x), float(y)], "score": float(s)}
                    for (x, y), s in zip(points, scores)]
    res = one_image(feats(gt, gc, np.ones(len(gt))), feats(pred, pc, sc))
    for cat, (tp, f1) in res.items():
      f1_sum[cat] = f1_sum.get(cat, 0) + f1
      tp_sum[cat] = tp_sum.get(cat, 0) + tp
  f1 = {cat: v / len(images) for cat, v in f1_sum.items()}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no classes: NaN, as the script gets
    macro = np.mean([v for c, v in f1.items() if c != "detection"])
  return f1, macro, tp_sum


@pytest.mark.parametrize("seed", SEEDS)
def test_puma_matches_the_published_loop(seed):
  images = random_images(seed)
  radius = float([15, 6, 4, 7.3][seed % 4])
  res = _evaluate(images, "puma", radius)
  f1, macro, tps = published_puma(images, radius)
  for name, entry in [*res["classes"].items(), ("detection", res["detection"])]:
    if name in f1:
      assert entry["f1"] == pytest.approx(f1[name], rel=1e-12, abs=1e-15)
      assert entry["tp"] == tps[name]
    else:
      assert entry["f1"] is None and entry["tp"] == 0
  if math.isnan(macro):
    assert res["mean_f1"] is None
  else:
    assert res["mean_f1"] == pytest.approx(macro, rel=1e-12, abs=1e-15)


def test_puma_with_no_points_anywhere():
  empty = (np.zeros((0, 2)), np.zeros(0, int), np.zeros((0, 2)), np.zeros(0, int), np.zeros(0))
  f1, macro, _ = published_puma([empty, empty], 15.0)
  assert f1 == {} and math.isnan(macro)
  assert _evaluate([empty, empty], "puma", 15.0)["mean_f1"] is None
