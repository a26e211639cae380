"""Known-answer tests of the NDC point-matching metrics (every mode) and the Hungarian assignment of the loss."""

import numpy as np
import pytest

from muse_jax.ndc import matching, metrics


def _set(points, classes, scores=None):
  d = {"points": np.asarray(points, np.float32).reshape(-1, 2), "classes": np.asarray(classes, np.int32)}
  if scores is not None:
    d["scores"] = np.asarray(scores, np.float32)
  return d


# Image 0: 3 GT; predictions: one exact (right class), one 2 px off with the wrong class, one far away (FP).
GT0 = _set([[10, 10], [30, 10], [50, 50]], [0, 1, 1])
PR0 = _set([[10, 10], [32, 10], [90, 90]], [0, 0, 1], [0.9, 0.8, 0.7])
# Image 1: 1 GT, no prediction (FN).
GT1 = _set([[20, 20]], [1])
PR1 = _set(np.zeros((0, 2)), [], [])


@pytest.mark.parametrize("mode", ["muse", "ocelot", "hungarian", "mcspatnet"])
def test_pooled_modes_known_counts(mode):
  # mcspatnet with the corrected FN count here; the published script's count is checked below.
  kw = {"mcspatnet_fn_quirk": False} if mode == "mcspatnet" else {}
  r = metrics.evaluate([PR0, PR1], [GT0, GT1], mode=mode, class_names=["a", "b"], radius_px=6.0, **kw)
  det = r["detection"]
  assert (det["tp"], det["fp"], det["fn"]) == (2, 1, 2)
  a, b = r["classes"]["a"], r["classes"]["b"]
  assert (a["tp"], a["fp"], a["fn"]) == (1, 1, 0)
  assert (b["tp"], b["fp"], b["fn"]) == (0, 1, 3)
  assert det["precision"] == pytest.approx(2 / 3, abs=1e-4)
  assert det["recall"] == pytest.approx(0.5, abs=1e-4)
  assert det["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), abs=1e-4)
  assert a["f1"] == pytest.approx(2 / 3, abs=1e-4)
  assert b["f1"] == pytest.approx(0.0, abs=1e-4)
  assert r["mean_f1"] == pytest.approx(1 / 3, abs=1e-4)


def test_mcspatnet_published_fn_count():
  # Image 1 has no predictions at all: the published MCSpatNet script adds 6 x #GT (not #GT) to FN for its
  # all-cells map and for its class-b map.
  r = metrics.evaluate([PR0, PR1], [GT0, GT1], mode="mcspatnet", class_names=["a", "b"], radius_px=6.0)
  assert r["fn_quirk_applied"]
  assert (r["detection"]["tp"], r["detection"]["fp"], r["detection"]["fn"]) == (2, 1, 1 + 6)
  assert (r["classes"]["b"]["tp"], r["classes"]["b"]["fp"], r["classes"]["b"]["fn"]) == (0, 1, 2 + 6)
  assert (r["classes"]["a"]["tp"], r["classes"]["a"]["fp"], r["classes"]["a"]["fn"]) == (1, 1, 0)


def test_radius_from_mpp():
  r = metrics.evaluate([PR0], [GT0], mode="muse", mpp=0.5, radius_um=3.0)
  assert r["radius_px"] == pytest.approx(6.0)
  r = metrics.evaluate([PR0], [GT0], mode="muse", mpp=0.5, radius_um=0.5)  # 1 px: the 2 px-off point misses
  assert r["detection"]["tp"] == 1
  with pytest.raises(ValueError, match="mpp"):
    metrics.evaluate([PR0], [GT0], mode="muse")
  with pytest.raises(ValueError, match="mode"):
    metrics.evaluate([PR0], [GT0], mode="nope", radius_px=6)


def test_greedy_by_score_differs_from_hungarian():
  # GT at x=0 and x=8 (r=5). High-score prediction at 4 (d=4 to both, nearest tie -> GT 0);
  # low-score at -4.5 reaches only GT 0. Greedy: 1 TP; Hungarian: 2 TP.
  gt = _set([[0, 0], [8.5, 0]], [0, 0])
  pr = _set([[4, 0], [-4.5, 0]], [0, 0], [0.9, 0.1])
  assert metrics.evaluate([pr], [gt], mode="muse", radius_px=5)["detection"]["tp"] == 1
  assert metrics.evaluate([pr], [gt], mode="hungarian", radius_px=5)["detection"]["tp"] == 2


def test_score_order_matters_for_greedy():
  # One GT, two predictions within the radius: the higher-scoring one wins (TP), the other is FP.
  gt = _set([[0, 0]], [0])
  pr = _set([[1, 0], [3, 0]], [0, 0], [0.2, 0.9])
  assert metrics.match_greedy_by_score(pr["points"], pr["scores"], gt["points"], 5) == 1
  r = metrics.evaluate([pr], [gt], mode="ocelot", radius_px=5)
  assert (r["detection"]["tp"], r["detection"]["fp"]) == (1, 1)


def test_boundary_rules():
  # A prediction exactly at the radius: <= (muse, ocelot, hungarian) matches; < (mcspatnet, puma) does not.
  gt = _set([[0, 0]], [0])
  pr = _set([[6, 0]], [0], [1.0])
  for mode, tp in [("muse", 1), ("ocelot", 1), ("hungarian", 1), ("mcspatnet", 0), ("puma", 0)]:
    assert metrics.evaluate([pr], [gt], mode=mode, radius_px=6)["detection"]["tp"] == tp, mode


def test_mcspatnet_rasterises_and_takes_nearest_unused():
  # Two predictions rounding to the same pixel count once (dot map). GT order is row-major.
  gt = _set([[5, 5], [9, 5]], [0, 0])
  pr = _set([[6.2, 5.1], [5.8, 4.9], [12, 5]], [0, 0, 0])
  tp, npred, ngt = metrics.match_mcspatnet(pr["points"], gt["points"], 4)
  assert (tp, npred, ngt) == (2, 2, 2)
  r = metrics.evaluate([pr], [gt], mode="mcspatnet", radius_px=4)
  assert (r["detection"]["tp"], r["detection"]["fp"], r["detection"]["fn"]) == (2, 0, 0)
  # 0/0 precision is 1 in MCSpatNet's script: an image with neither GT nor predictions of a class.
  e = metrics.evaluate([_set(np.zeros((0, 2)), [])], [_set(np.zeros((0, 2)), [])], mode="mcspatnet",
                       num_classes=1, radius_px=6)
  assert e["classes"]["class_0"]["precision"] == 1.0


def test_puma_per_image_average():
  # Image 0 perfect for class 0; image 1 has one class-0 GT and no prediction (F1 0). Class 1 only in image 0,
  # wrong -> F1 0 there, absent (0) in image 1. PUMA averages over all images.
  g0 = _set([[0, 0], [20, 0]], [0, 1])
  p0 = _set([[1, 0], [40, 0]], [0, 1], [0.9, 0.9])
  g1 = _set([[0, 0]], [0])
  p1 = _set(np.zeros((0, 2)), [], [])
  r = metrics.evaluate([p0, p1], [g0, g1], mode="puma", num_classes=2, radius_px=15)
  assert r["classes"]["class_0"]["f1"] == pytest.approx(0.5)
  assert r["classes"]["class_1"]["f1"] == pytest.approx(0.0)
  assert r["mean_f1"] == pytest.approx(0.25)
  # PUMA picks the highest score among candidates, not the nearest.
  g = _set([[0, 0]], [0])
  p = _set([[1, 0], [10, 0]], [0, 0], [0.1, 0.9])
  assert metrics.match_puma(p["points"], p["scores"], g["points"], 15) == 1


def test_ocelot_rounding_and_smoothing():
  gt = _set([[0, 0], [50, 50], [100, 100]], [0, 0, 0])
  pr = _set([[0, 0]], [0], [0.5])
  r = metrics.evaluate([pr], [gt], mode="ocelot", num_classes=1, radius_px=15)
  c = r["classes"]["class_0"]
  assert c["precision"] == round(1 / (1 + 1e-7), 4) == 1.0
  assert c["recall"] == 0.3333
  assert c["f1"] == 0.5


def test_hungarian_assignment_known_case():
  # Two GTs, three proposals. Nearest-each would give both GTs proposal 1; Hungarian gives GT0->0, GT1->1.
  points = np.array([[[0.0, 0.0], [2.0, 0.0], [20.0, 0.0]]])
  probs = np.array([[[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]])  # C = 1 (+ background)
  valid = np.array([[True, True, True]])
  gt = np.array([[[1.2, 0.0], [3.0, 0.0], [0, 0]]])
  gcls = np.array([[0, 0, -1]])
  gmask = np.array([[True, True, False]])
  a = matching.hungarian_assign_np(points, probs, valid, gt, gcls, gmask, point_weight=1.0, class_weight=1.0,
                                   max_dist=10.0)
  np.testing.assert_array_equal(a, [[0, 1, -1]])
  # An invalid proposal (outside the labelled region) is never assigned; a GT out of reach stays -1.
  a = matching.hungarian_assign_np(points, probs, np.array([[False, True, True]]), gt, gcls, gmask,
                                   point_weight=1.0, class_weight=1.0, max_dist=2.0)
  assert a[0, 2] == -1 and set(a[0, :2].tolist()) == {1, -1}
  # Class probability decides between equidistant proposals.
  points = np.array([[[-1.0, 0.0], [1.0, 0.0]]])
  probs = np.array([[[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]]])  # C = 2
  a = matching.hungarian_assign_np(points, probs, np.ones((1, 2), bool), np.zeros((1, 1, 2)), np.array([[1]]),
                                   np.ones((1, 1), bool), point_weight=0.1, class_weight=1.0, max_dist=5.0)
  np.testing.assert_array_equal(a, [[1]])


def test_hungarian_assign_in_jit():
  import jax
  import jax.numpy as jnp

  points = jnp.array([[[0.0, 0.0], [2.0, 0.0], [20.0, 0.0]]])
  probs = jnp.full((1, 3, 2), 0.5)
  f = jax.jit(lambda p: matching.hungarian_assign(p, probs, jnp.ones((1, 3), bool), jnp.array([[[1.2, 0.0],
                                                  [3.0, 0.0]]]), jnp.array([[0, 0]]), jnp.ones((1, 2), bool),
                                                  point_weight=1.0, class_weight=1.0, max_dist=10.0))
  np.testing.assert_array_equal(np.asarray(f(points)), [[0, 1]])
