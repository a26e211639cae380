"""NDC inference: point NMS, sliding-window seams, LFoV samples, output writers, losses, bad input handling."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import outputs
from muse_jax.ndc import infer, lfov, losses

CLASSES = ["lymphocyte", "tumor", "stromal"]


def test_point_nms_keeps_higher_score():
  pts = np.array([[0, 0], [2, 0], [10, 0], [11, 0]], np.float32)
  sc = np.array([0.5, 0.9, 0.3, 0.4])
  keep = infer.point_nms(pts, sc, radius=3.0)
  np.testing.assert_array_equal(keep, [1, 3])
  assert infer.point_nms(np.zeros((0, 2)), np.zeros(0), 3.0).shape == (0,)


def test_window_starts_and_ownership_partition():
  starts = infer.window_starts(300, 128, 32)
  assert starts[0] == 0 and starts[-1] == 300 - 128
  assert all(b - a <= 128 - 32 for a, b in zip(starts, starts[1:]))
  bounds = infer.ownership_bounds(starts, 128)
  for (lo, hi), (lo2, _) in zip(bounds, bounds[1:]):
    assert hi == lo2  # contiguous, no gaps, no double ownership
  for s, (lo, hi) in zip(starts, bounds):
    assert lo == -np.inf or lo >= s  # each window owns only pixels it sees
    assert hi == np.inf or hi <= s + 128
  assert infer.window_starts(100, 128, 32) == [0]


class MarkerPredictor(infer.Predictor):
  """A Predictor whose 'model' reports every pure-red pixel of a tile as a nucleus (score 0.9, class 1)."""

  def __init__(self, window=64, overlap=16, mpp=0.5):  # pylint: disable=super-init-not-called
    self.class_names, self.mpp, self.window, self.overlap = CLASSES, mpp, window, overlap
    self.batch_size, self.score_threshold, self.nms_radius_um = 4, 0.5, 1.5
    self.multiple, self.mpp_tolerance = 16, 0.1
    self.seen_tiles = 0

  def _raw_tiles(self, tiles):
    n, S = len(tiles), tiles.shape[1]
    pts = np.zeros((n, 64, 2), np.float32)
    sc = np.zeros((n, 64), np.float32)
    cls = np.ones((n, 64), np.int32)
    for i, t in enumerate(tiles):
      ys, xs = np.nonzero((t[..., 0] == 255) & (t[..., 1] == 0) & (t[..., 2] == 0))
      k = len(xs)
      pts[i, :k] = np.stack([xs, ys], -1)
      sc[i, :k] = 0.9
    self.seen_tiles += n
    del S
    return pts, cls, sc


def _marker_image(h, w, points):
  img = np.full((h, w, 3), 255, np.uint8)
  for x, y in points:
    img[y, x] = (255, 0, 0)
  return img


def test_sliding_window_seams_do_not_double_count():
  # Nuclei placed in the overlaps (seen by 2 or 4 windows) and at the image edges.
  pts = [(50, 50), (55, 10), (10, 52), (100, 100), (5, 5), (149, 149), (149, 3), (60, 140)]
  img = _marker_image(150, 150, pts)
  p = MarkerPredictor(window=64, overlap=24)
  out = p.predict_image(img, mpp=0.5)
  assert p.seen_tiles > 4
  got = sorted(map(tuple, out["points"].astype(int).tolist()))
  assert got == sorted(pts)
  assert out["classes"].tolist() == [1] * len(pts)


def test_small_image_is_padded_and_empty_is_not_an_error():
  p = MarkerPredictor(window=64, overlap=16)
  out = p.predict_image(_marker_image(20, 30, [(3, 4), (29, 19)]), mpp=0.5)
  assert sorted(map(tuple, out["points"].astype(int).tolist())) == [(3, 4), (29, 19)]
  out = p.predict_image(np.full((40, 40, 3), 255, np.uint8), mpp=0.5)
  assert out["points"].shape == (0, 2) and out["classes"].shape == (0,) and out["scores"].shape == (0,)


def test_mpp_handling_and_class_names():
  p = MarkerPredictor(window=64, overlap=16, mpp=0.5)
  img = _marker_image(128, 128, [(40, 40)])
  # Image at 0.25 µm/px: resampled to 0.5 for the model; points come back in the input's pixels.
  out = p.predict_image(img, mpp=0.25)
  assert len(out["points"]) <= 1  # the red pixel may blur away in the resize, but nothing is invented
  with pytest.raises(ValueError, match="rescale"):
    p.predict_image(img, mpp=0.25, rescale=False)
  for bad in (0.0, -1.0, float("nan"), 500.0, "x"):
    with pytest.raises(ValueError, match="mpp"):
      p.predict_image(img, mpp=bad)
  with pytest.raises(ValueError, match="do not match the checkpoint"):
    p.predict_image(img, mpp=0.5, class_names=["tumor", "lymphocyte", "stromal"])
  p.check_class_names(CLASSES)
  with pytest.raises(ValueError, match="uint8"):
    p.predict_image(img.astype(np.float32), mpp=0.5)


def test_lfov_sample_geometry():
  rng = np.random.default_rng(0)
  tile = np.arange(40 * 50 * 3, dtype=np.int64).reshape(40, 50, 3).astype(np.uint8)
  coords = np.array([[1, 2], [45, 30], [20, 20]], np.float32)
  s = lfov.make_lfov_sample(tile, coords, np.array([0, 1, 2]), field=96, rng=rng)
  x0, y0, x1, y1 = s["region"].astype(int)
  assert (x1 - x0, y1 - y0) == (50, 40)
  np.testing.assert_array_equal(s["image"][y0:y1, x0:x1], tile)  # tile pixels where the region says
  np.testing.assert_allclose(s["coords"], coords + [x0, y0])
  # Reflect padding mirrors the tile beyond its border.
  if x0 > 0:
    np.testing.assert_array_equal(s["image"][y0:y1, x0 - 1], tile[:, 1])
  # A labelled window inside a larger context: real context pixels around it.
  ctx = np.random.default_rng(1).integers(0, 255, (200, 200, 3)).astype(np.uint8)
  s = lfov.make_lfov_sample(ctx[50:90, 60:110], coords, np.array([0, 1, 2]), field=96, rng=rng, context=ctx,
                            tile_origin=(60, 50), center=True)
  x0, y0 = s["region"][:2].astype(int)
  np.testing.assert_array_equal(s["image"], ctx[50 - y0:50 - y0 + 96, 60 - x0:60 - x0 + 96])
  # label_size: only the nuclei inside the labelled window are kept.
  s = lfov.make_lfov_sample(tile, coords, np.array([0, 1, 2]), field=96, rng=rng, label_size=16)
  assert len(s["coords"]) <= 1 and lfov.in_region(s["coords"], s["region"]).all()
  # Flips keep points inside the region and on the same pixels.
  img = np.zeros((32, 32, 3), np.uint8)
  img[5, 20] = 255
  smp = {"image": img, "coords": np.array([[20.0, 5.0]], np.float32), "classes": np.array([0]),
         "region": np.array([16, 0, 32, 16], np.float32)}
  for seed in range(8):
    t = lfov.random_dihedral(smp, np.random.default_rng(seed))
    x, y = t["coords"][0].astype(int)
    assert t["image"][y, x, 0] == 255
    assert lfov.in_region(t["coords"], t["region"]).all()
  with pytest.raises(ValueError, match="max_points"):
    lfov.collate([s], max_points=0) if len(s["coords"]) else lfov.collate(
      [{**s, "coords": np.zeros((2, 2), np.float32), "classes": np.zeros(2, np.int32)}], max_points=1)


def test_supervised_and_consistency_losses_known_case():
  # 1 image, 3 proposals, C = 2. GT 0 (class 1) assigned to proposal 2; proposal 1 outside the region.
  logits = jnp.log(jnp.array([[[0.2, 0.2, 0.6], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]]]))
  points = jnp.array([[[0.0, 0.0], [4.0, 0.0], [8.0, 0.0]]])
  out = losses.supervised_loss(logits, points, jnp.array([[2]]), jnp.array([[[10.0, 0.0]]]), jnp.array([[1]]),
                               jnp.array([[True, False, True]]), stride=4, bg_weight=0.5)
  want_cls = (0.5 * -np.log(0.6) + 1.0 * -np.log(0.8)) / 1.5
  np.testing.assert_allclose(out["cls"], want_cls, rtol=1e-5)
  np.testing.assert_allclose(out["reg"], (2.0 / 4) ** 2, rtol=1e-5)
  assert float(out["num_matched"]) == 1
  # Consistency: only proposal 1 is usable; the teacher is confident it is class 0.
  t_logits = jnp.log(jnp.array([[[0.1, 0.1, 0.8], [0.95, 0.03, 0.02], [0.1, 0.1, 0.8]]]))
  c = losses.consistency_loss(logits, points, t_logits, points + 1.0, jnp.array([[False, True, False]]), stride=4,
                              threshold=0.9)
  np.testing.assert_allclose(c["cls"], -np.log(0.3), rtol=1e-5)
  np.testing.assert_allclose(c["reg"], 2 * (1 / 4) ** 2, rtol=1e-5)
  assert float(c["num_fg"]) == 1 and float(c["num_bg"]) == 0


def test_outputs(tmp_path):
  pts = np.array([[1.5, 2.25], [10, 20]], np.float32)
  cls = np.array([1, 0])
  sc = np.array([0.9, 0.5])
  p = outputs.write_points_csv(tmp_path / "a.csv", pts, cls, sc, CLASSES)
  back = outputs.read_points_csv(p, CLASSES)
  np.testing.assert_allclose(back["points"], pts)
  np.testing.assert_array_equal(back["classes"], cls)
  assert open(p).readline().strip() == "x,y,class,score"
  g = json.load(open(outputs.write_points_geojson(tmp_path / "a.geojson", pts, cls, sc, CLASSES,
                                                  object_type="detection")))
  assert g["type"] == "FeatureCollection" and len(g["features"]) == 2
  f = g["features"][0]
  assert f["geometry"] == {"type": "Point", "coordinates": [1.5, 2.25]}
  assert f["properties"]["objectType"] == "detection"
  assert f["properties"]["classification"]["name"] == "tumor"
  assert len(f["properties"]["classification"]["color"]) == 3
  assert f["properties"]["measurements"]["score"] == pytest.approx(0.9)
  img = np.zeros((32, 32, 3), np.uint8)
  ov = outputs.draw_overlay(img, pts, cls, CLASSES, path=tmp_path / "o.png")
  assert ov.shape == img.shape and ov.any() and (tmp_path / "o.png").exists()
  # Empty predictions: valid, empty files.
  outputs.write_points_csv(tmp_path / "e.csv", np.zeros((0, 2)), [], [], CLASSES)
  assert outputs.read_points_csv(tmp_path / "e.csv", CLASSES)["points"].shape == (0, 2)
  assert json.load(open(outputs.write_points_geojson(tmp_path / "e.geojson", np.zeros((0, 2)), [], [],
                                                     CLASSES)))["features"] == []
  with pytest.raises(ValueError, match="classes"):
    outputs.write_points_csv(tmp_path / "b.csv", pts, [0, 3], sc, CLASSES)
  with pytest.raises(ValueError, match="object_type"):
    outputs.points_to_geojson(pts, cls, sc, CLASSES, object_type="cell")
