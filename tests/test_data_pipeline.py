"""Tests for MPP-based views (geometry, coordinates, ids) and the Grain pretraining pipeline."""

import numpy as np
import pytest

from muse_jax.data import pipeline, views


def _no_photometric(cfg):
  cfg.color_jitter_p = 0.0
  cfg.grayscale_p = 0.0
  cfg.blur_p = (0.0, 0.0, 0.0)
  cfg.solarize_p = 0.0
  return cfg


def _dot_region(h=420, w=380, n=30, radius=6, seed=0):
  """White region with flat disks; disk i is colour (20 + 7 i, 0, 90) at a random sub-pixel centre."""
  rng = np.random.default_rng(seed)
  pts = []
  while len(pts) < n:
    p = rng.uniform([radius, radius], [w - radius - 1, h - radius - 1])
    if all(np.hypot(*(p - q)) > 5 * radius for q in pts):
      pts.append(p)
  pts = np.asarray(pts, np.float32)
  yy, xx = np.mgrid[:h, :w]
  img = np.full((h, w, 3), 255, np.uint8)
  for i, (x, y) in enumerate(pts):
    img[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = (20 + 7 * i, 0, 90)
  return {'image': img, 'coords': pts, 'mpp': np.float32(0.25)}


def _check_dots(images, coords, ids, mask, region_coords, scale_of_view):
  """Every kept nucleus's coordinate sits on the centroid of its own disk (within half an output pixel)."""
  checked = 0
  for v in range(images.shape[0]):
    img = images[v].astype(np.float32)
    size = img.shape[0]
    r = int(np.ceil(6 * scale_of_view[v])) + 3
    for (x, y), i in zip(coords[v][mask[v]], ids[v][mask[v]]):
      if not (r <= x < size - 1 - r and r <= y < size - 1 - r):
        continue  # disk partly cut by the view border
      x0, y0 = int(round(x)) - r, int(round(y)) - r
      win = 255.0 - img[y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1, 1]
      yy, xx = np.mgrid[y0:y0 + 2 * r + 1, x0:x0 + 2 * r + 1]
      cx, cy = (win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()
      assert abs(cx - x) < 0.5 and abs(cy - y) < 0.5, (v, i, (x, y), (cx, cy))
      red = img[int(round(y)), int(round(x)), 0]
      assert abs(red - (20 + 7 * i)) <= 3, (v, i, red)
      checked += 1
  return checked


@pytest.mark.parametrize('dist', ['uniform', 'loguniform', 'discrete'])
def test_nucleus_stays_on_its_nucleus_through_every_transform(dist):
  region = _dot_region()
  cfg = _no_photometric(pipeline.default_data_config())
  cfg.mpp_dist = dist
  cfg.global_size, cfg.local_size = 128, 64
  rng = np.random.default_rng(1)
  checked = 0
  for _ in range(4):
    ex = views.make_views(region, rng, cfg)
    for g in ('global', 'local'):
      e = ex[g]
      checked += _check_dots(e['images'], e['coords'], e['ids'], e['mask'], region['coords'], 0.25 / e['mpp'])
  assert checked > 40


def test_flip_rotate_moves_coordinates_with_pixels():
  rng = np.random.default_rng(0)
  img = np.zeros((9, 9, 3), np.uint8)
  pts = np.array([[1, 2], [7, 0], [4, 8]], np.float32)
  for k, (x, y) in enumerate(pts.astype(int)):
    img[y, x] = 50 * (k + 1)
  for hf in (False, True):
    for vf in (False, True):
      for k in range(4):
        out, c = views.flip_rotate(img, pts, hf, vf, k)
        for j, (x, y) in enumerate(c):
          assert out[int(y), int(x), 0] == 50 * (j + 1)
  del rng


def test_mpp_arithmetic():
  # A view of S px at mpp m covers S*m µm = S*m/region_mpp region px; coordinates scale by region_mpp / m.
  region_mpp, size, m = 0.25, 100, 0.4
  fov = size * m / region_mpp
  assert fov * region_mpp == pytest.approx(size * m)
  x0, y0 = 30.0, 50.0
  pts = np.array([[x0 - 0.5, y0 - 0.5], [x0 + fov - 0.5, y0 - 0.5], [x0 + 10, y0 + 20], [x0 + 30, y0 + 20]])
  out, inside = views.map_coords(pts, x0, y0, fov, size)
  np.testing.assert_allclose(out[0], [-0.5, -0.5], atol=1e-4)
  np.testing.assert_allclose(out[1], [size - 0.5, -0.5], atol=1e-4)
  np.testing.assert_allclose(out[3] - out[2], [20 * region_mpp / m, 0], atol=1e-4)
  assert inside.tolist() == [True, False, True, True]
  # Views report their mpp, and the nuclei they keep are at the right scale.
  cfg = _no_photometric(pipeline.default_data_config())
  cfg.mpp_dist, cfg.mpp_choices = 'discrete', (0.5,)
  cfg.flips, cfg.rot90 = False, False
  region = _dot_region()
  ex = views.make_views(region, np.random.default_rng(3), cfg)
  assert np.all(ex['global']['mpp'] == 0.5) and np.all(ex['local']['mpp'] == 0.5)
  g = ex['global']
  c, i = g['coords'][0][g['mask'][0]], g['ids'][0][g['mask'][0]]
  d_view = np.linalg.norm(c[0] - c[1])
  d_region = np.linalg.norm(region['coords'][i[0]] - region['coords'][i[1]])
  assert d_view == pytest.approx(d_region * 0.25 / 0.5, abs=1e-3)


def test_small_region_is_padded_not_stretched():
  region = _dot_region(h=100, w=90, n=3, radius=4)
  cfg = _no_photometric(pipeline.default_data_config())
  cfg.flips, cfg.rot90, cfg.pad_mode = False, False, 'constant'
  cfg.mpp_dist, cfg.mpp_choices = 'discrete', (0.5,)  # 224 px at 0.5 = 448 region px > 100
  ex = views.make_views(region, np.random.default_rng(0), cfg)
  im = ex['global']['images'][0]
  # The region (90x100 px at 0.25 = 45x50 px at 0.5) sits centred in white padding.
  assert (im[:80] == 255).all() and (im[:, :85] == 255).all()
  assert ex['global']['mask'][0].sum() == 3
  np.testing.assert_allclose(ex['global']['coords'][0][:3], (region['coords'] + 0.5 - np.array([-179, -174])) * 0.5
                             - 0.5, atol=1e-4)


def test_max_nuclei_padding_and_subsampling():
  rng = np.random.default_rng(0)
  c, i, m = views.pad_nuclei(np.ones((3, 2), np.float32), np.array([4, 5, 6]), 5, rng)
  assert m.tolist() == [True] * 3 + [False] * 2 and i.tolist() == [4, 5, 6, -1, -1]
  c, i, m = views.pad_nuclei(np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10), 4, rng)
  assert m.all() and len(set(i.tolist())) == 4
  np.testing.assert_array_equal(c[:, 0], 2 * i)


def test_default_recipe_shapes_and_shared_nuclei():
  cfg = pipeline.default_data_config()
  src = pipeline.open_pretrain_source(cfg)
  assert len(src) == 8  # bundled train + val, never test
  rng = np.random.default_rng(0)
  shared = []
  for k in range(8):
    ex = views.make_views(src[k], rng, cfg)
    g, l = ex['global'], ex['local']
    assert g['images'].shape == (2, 224, 224, 3) and g['images'].dtype == np.uint8
    assert l['images'].shape == (8, 96, 96, 3) and l['coords'].shape == (8, 64, 2)
    assert g['ids'].dtype == np.int32 and g['mask'].dtype == bool and g['mpp'].dtype == np.float32
    assert ((g['mpp'] >= 0.25) & (g['mpp'] <= 0.5)).all()
    assert (g['ids'][~g['mask']] == -1).all()
    shared.append(views.shared_nuclei(ex).max(axis=0))  # per local view: shared with its best global view
  assert np.mean(shared) > 2.0


def _small_cfg(num_workers=0):
  cfg = pipeline.default_data_config()
  cfg.global_size, cfg.local_size, cfg.n_local = 64, 32, 2
  cfg.max_nuclei_global, cfg.max_nuclei_local = 32, 8
  cfg.num_workers = num_workers
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.slow
def test_same_seed_same_batches_any_worker_count_and_restore():
  src = pipeline.open_pretrain_source(_small_cfg())
  it0 = iter(pipeline.make_pretrain_dataset(src, _small_cfg(0), seed=7, batch_size=3))
  ref = _take(it0, 2)
  state0 = it0.get_state()
  ref += _take(it0, 3)
  it_other = iter(pipeline.make_pretrain_dataset(src, _small_cfg(0), seed=8, batch_size=3))
  assert not np.array_equal(next(it_other)['global']['images'], ref[0]['global']['images'])
  it2 = iter(pipeline.make_pretrain_dataset(src, _small_cfg(2), seed=7, batch_size=3))
  got = _take(it2, 2)
  got += _take(it2, 3)
  for a, b in zip(ref, got):
    _assert_same(a, b)
  # A fresh iterator restored from a saved state continues at batch 2 (state from an iterator of the same
  # worker count: in-process and multi-process iterators have different state layouts).
  it_new = iter(pipeline.make_pretrain_dataset(src, _small_cfg(0), seed=7, batch_size=3))
  it_new.set_state(state0)
  for a, b in zip(ref[2:], _take(it_new, 3)):
    _assert_same(a, b)
  it2.close()


def test_hosts_read_disjoint_shards():
  src = pipeline.RegionList([{'image': np.full((80, 80, 3), 10 * k, np.uint8), 'coords': np.zeros((0, 2)),
                              'mpp': np.float32(0.5)} for k in range(6)])
  cfg = _no_photometric(_small_cfg())
  seen = []
  for p in range(2):
    it = iter(pipeline.make_pretrain_dataset(src, cfg, seed=0, batch_size=3, process_index=p, process_count=2))
    b = next(it)
    seen.append({int(v) for v in b['global']['images'][:, 0, 32, 32, 0]})
    assert b['global']['mask'].sum() == 0
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert seen[0] | seen[1] == {0, 10, 20, 30, 40, 50}


def test_bad_source_names():
  cfg = pipeline.default_data_config()
  cfg.source = 'nowhere:x'
  with pytest.raises(ValueError, match='nowhere'):
    pipeline.open_pretrain_source(cfg)
  cfg.source = 'folder:/tmp'
  with pytest.raises(ValueError, match='region_mpp'):
    pipeline.open_pretrain_source(cfg)


def test_photometric_known_answers():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  img = rng.integers(0, 200, (16, 16, 3), dtype=np.uint8)
  # Brightness alone: x -> b x with the same draw as the function.
  b = np.random.default_rng(5)
  b.permutation(4)
  factor = b.uniform(0.6, 1.4)
  out = np.asarray(views.color_jitter(Image.fromarray(img), np.random.default_rng(5), 0.4, 0.0, 0.0, 0.0))
  np.testing.assert_allclose(out, np.clip(img * factor, 0, 255), atol=1.0)
  # Saturation 0 -> gray; hue rotation keeps gray pixels gray.
  gray = np.full((4, 4, 3), 90, np.uint8)
  out = np.asarray(views.color_jitter(Image.fromarray(gray), np.random.default_rng(1), 0.0, 0.0, 0.0, 0.5))
  assert np.abs(out.astype(int) - 90).max() <= 1
  cfg = _no_photometric(pipeline.default_data_config())
  cfg.grayscale_p = 1.0
  g = views.photometric(img, rng, cfg, blur_p=0.0, solarize_p=1.0)
  assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
  lum = np.asarray(Image.fromarray(img).convert('L'))
  np.testing.assert_array_equal(g[..., 0], np.where(lum >= 128, 255 - lum, lum))


def test_to_global_arrays_shards_batch_over_data_axis():
  import jax  # pylint: disable=g-import-not-at-top
  devices = np.array(jax.devices()[:4])
  mesh = jax.sharding.Mesh(devices.reshape(-1), ('data',))
  cfg = _small_cfg()
  src = pipeline.open_pretrain_source(cfg)
  batch = next(iter(pipeline.make_pretrain_dataset(src, cfg, seed=0, batch_size=len(devices))))
  g = pipeline.to_global_arrays(batch, mesh)
  assert g['global']['images'].shape == batch['global']['images'].shape
  assert g['local']['ids'].sharding.spec == jax.sharding.PartitionSpec('data')
  np.testing.assert_array_equal(np.asarray(g['local']['coords']), batch['local']['coords'])
