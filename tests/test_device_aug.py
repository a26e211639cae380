"""Device-side view rendering (`data.augment_on='device'`, issue #23): the host crops, the jitted step resizes,
flips / rotates and augments. Known answers against the host's PIL / skimage path, coordinates, determinism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from muse_jax.data import pipeline, views
from muse_jax.pretrain import augment


def _smooth_image(seed=0, h=300, w=300, sigma=3.0):
  rng = np.random.default_rng(seed)
  img = ndimage.gaussian_filter(rng.uniform(0, 255, (h, w, 3)), (sigma, sigma, 0))
  return np.clip((img - img.min()) / (img.max() - img.min()) * 255, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("x0,y0,fov,size", [(10.3, 20.7, 150.0, 224), (100.1, 5.5, 224.0, 224),
                                            (-20.2, 40.4, 120.5, 96), (50.5, 60.25, 180.0, 64),
                                            (30.0, 30.0, 40.0, 96)])
def test_device_resize_is_pils_bilinear_within_one_grey_level(x0, y0, fov, size):
  img = _smooth_image()
  ref = views.crop_resize(img, x0, y0, fov, size).astype(np.float32)  # host: PIL, rounded to uint8
  crop, box = views.crop_window(img, x0, y0, fov, int(np.ceil(fov)) + 5)
  out = np.asarray(augment.resize_view(jnp.asarray(crop), jnp.asarray(box), size))
  assert np.abs(out - ref).max() <= 1.01
  assert np.abs(out - ref).mean() < 0.4


def test_crop_window_pads_like_the_host_and_reduces_wide_views():
  img = _smooth_image(1, 120, 160)
  # A window beyond the region is reflect-padded (the first row of the crop mirrors row 1 of the image).
  crop, box = views.crop_window(img, -3.5, -1.0, 50.0, 60)
  assert crop.shape == (60, 60, 3) and box == (2.5, 2.0, 50.0)
  # Only the ceil(fov) + 5 = 55 px the resize reads are written: row y=0 at crop row 3 (yi = -3), x=0 at col 6.
  np.testing.assert_array_equal(crop[3, 6:55], img[0, 0:49])
  np.testing.assert_array_equal(crop[2, 6:55], img[1, 0:49])  # reflected: crop row 2 is image row 1
  np.testing.assert_array_equal(crop[3, 0:6], img[0, 6:0:-1])  # and column -k is column k
  ref = np.pad(img, ((3, 0), (6, 0), (0, 0)), mode="reflect")[:55, :55]
  np.testing.assert_array_equal(crop[:55, :55], ref)
  assert not crop[55:].any() and not crop[:, 55:].any()
  white, _ = views.crop_window(img, -3.5, -1.0, 50.0, 60, pad_mode="constant")
  np.testing.assert_array_equal(white[:3, :55], 255)
  np.testing.assert_array_equal(white[3:55, 6:55], img[0:52, 0:49])
  # A field of view wider than the buffer is reduced on the host; the render still matches PIL closely.
  img = _smooth_image(1, 120, 160, sigma=8.0)
  crop, box = views.crop_window(img, 10.0, 5.0, 100.0, 60)
  assert crop.shape == (60, 60, 3) and box[2] < 60 - 5 + 1e-6
  out = np.asarray(augment.resize_view(jnp.asarray(crop), jnp.asarray(box), 48))
  ref = views.crop_resize(img, 10.0, 5.0, 100.0, 48).astype(np.float32)
  d = (out - ref)[2:-2, 2:-2]  # two resamplings (host 100 -> 54 px, device 54 -> 48) vs one: slightly softer
  assert np.abs(d).max() <= 3.0 and np.abs(d).mean() < 0.6 and abs(d.mean()) < 0.1  # (no shift)


def test_crop_buffer_size_follows_the_largest_field_of_view():
  cfg = dict(pipeline.default_data_config().to_dict(), mpp_range=(0.25, 0.5), region_mpp=0.5)
  assert views.crop_buffer_size(224, cfg) == 229  # fov <= 224 px at 0.5 µm/px
  assert views.crop_buffer_size(224, dict(cfg, region_mpp=None)) == 453  # records carry their mpp: factor 2
  assert views.crop_buffer_size(96, dict(cfg, device_crop_factor=1.5)) == 149
  assert views.crop_buffer_size(64, dict(cfg, mpp_dist="discrete", mpp_choices=(0.25, 1.0))) == 133


def _blob_region(seed=0, hw=400, step=35):
  """Bright Gaussian blobs on a jittered grid (>= 25 px apart) with their centres as nucleus coordinates."""
  rng = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(np.arange(20, hw - 20, step), np.arange(20, hw - 20, step)), -1).reshape(-1, 2)
  pts = (grid + rng.uniform(-5, 5, grid.shape)).astype(np.float32)
  yy, xx = np.mgrid[0:hw, 0:hw]
  img = np.full((hw, hw, 3), 30.0)
  for x, y in pts:
    img += 200 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0 ** 2))[..., None]
  return {"image": np.clip(img, 0, 255).astype(np.uint8), "coords": pts}


def test_nuclei_stay_on_their_blobs_through_device_resize_flips_rotations_and_colour():
  region = _blob_region()
  cfg = pipeline.default_data_config().to_dict()
  cfg.update(augment_on="device", region_mpp=0.5, mpp_range=(0.4, 0.6), global_size=128, local_size=64,
             solarize_p=0.0, color_jitter_p=1.0, grayscale_p=0.5, blur_p=(0.5, 0.5, 0.5), blur_sigma=(0.1, 0.5))
  geoms, checked = set(), 0
  for seed in range(4):
    ex = views.make_views(region, np.random.default_rng(seed), cfg)
    batch = jax.tree.map(lambda a: jnp.asarray(a)[None], ex)
    out = augment.render(batch, jax.random.PRNGKey(seed), cfg)
    for g in ("global", "local"):
      ims = np.asarray(out[g]["images"][0]).mean(-1)
      assert ims.shape[1] == (128 if g == "global" else 64) and "crops" not in out[g]
      for v in range(ims.shape[0]):
        geoms.add(tuple(ex[g]["geom"][v]))
        for x, y in ex[g]["coords"][v][ex[g]["mask"][v]]:
          xi, yi = int(round(float(x))), int(round(float(y)))
          if 3 <= xi < ims.shape[2] - 3 and 3 <= yi < ims.shape[1] - 3:
            win = ims[v, yi - 3:yi + 4, xi - 3:xi + 4]
            win = win - win.min()  # the blob's intensity centroid (brightness may clip its top at 255)
            cy, cx = (np.arange(7)[:, None] * win).sum() / win.sum(), (np.arange(7)[None, :] * win).sum() / win.sum()
            assert max(abs(cy - 3 - (y - yi)), abs(cx - 3 - (x - xi))) < 0.75, (g, v, ex[g]["geom"][v], x, y)
            checked += 1
  assert checked > 50 and len({k for _, _, k in geoms}) == 4 and {h for h, _, _ in geoms} == {0, 1}


def test_stain_jitter_is_skimages_rgb2hed_hed2rgb():
  from skimage.color import hed2rgb, rgb2hed
  img = _smooth_image(2, 32, 32)
  alpha, beta = np.array([1.08, 0.93, 1.02]), np.array([0.004, -0.003, 0.001])
  ref = hed2rgb(rgb2hed(img) * alpha + beta) * 255.0
  out = np.asarray(augment.stain_jitter(jnp.asarray(img, jnp.float32), jnp.asarray(alpha, jnp.float32),
                                        jnp.asarray(beta, jnp.float32)))
  np.testing.assert_allclose(out, ref, atol=0.05)


class _FixedRng:
  """Stands in for the host generator inside `views.color_jitter`: a fixed order and fixed factors."""

  def __init__(self, order, factors):
    self.order, self.factors = order, list(factors)

  def permutation(self, n):
    assert n == 4
    return np.asarray(self.order)

  def uniform(self, lo, hi):
    del lo, hi
    return self.factors.pop(0)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 1, 0, 2), (2, 3, 1, 0)])
def test_colour_jitter_matrix_is_the_hosts(order):
  img = _smooth_image(3, 40, 40)
  b, c, s, h = 1.2, 0.75, 1.15, 0.06
  by_op = {0: b, 1: c, 2: s, 3: h}
  ref = np.asarray(views.color_jitter(Image.fromarray(img), _FixedRng(order, [by_op[o] for o in order]),
                                      0.4, 0.4, 0.2, 0.1), np.float32)
  mean_rgb = np.asarray(Image.fromarray(img).resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)), np.float32)
  a, t = augment.color_jitter_matrix(jnp.asarray(mean_rgb), jnp.asarray(order),
                                     jnp.array([b, c, s, 2 * np.pi * h], jnp.float32), (True,) * 4)
  out = np.clip(img.astype(np.float32) @ np.asarray(a).T + np.asarray(t), 0, 255)
  assert np.abs(out - ref).max() <= 0.51  # PIL rounds once


def test_grayscale_blur_solarize_known_answers():
  img = _smooth_image(4, 48, 48).astype(np.float32)
  ref = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("L"), np.float32)
  g = np.asarray(augment.grayscale(jnp.asarray(img)))
  assert np.abs(g[..., 0] - ref).max() <= 0.51 and np.array_equal(g[..., 0], g[..., 2])
  sigma, radius = 1.7, 6
  out = np.asarray(augment.gaussian_blur(jnp.asarray(img), jnp.float32(sigma), radius))
  ref = ndimage.gaussian_filter(img, (sigma, sigma, 0), mode="nearest", truncate=radius / sigma)
  np.testing.assert_allclose(out, ref, atol=2e-3)
  tiny = img[:8, :8]  # kernel wider than the view: several taps fold onto each edge pixel
  out = np.asarray(augment.gaussian_blur(jnp.asarray(tiny), jnp.float32(3.0), 6))
  ref = ndimage.gaussian_filter(tiny, (3.0, 3.0, 0), mode="nearest", truncate=2.0)
  np.testing.assert_allclose(out, ref, atol=2e-3)
  flat = np.full((16, 16, 3), 77.0, np.float32)
  np.testing.assert_allclose(augment.gaussian_blur(jnp.asarray(flat), jnp.float32(2.0), 6), flat, atol=1e-3)
  s = np.asarray(augment.solarize(jnp.array([0.0, 127.9, 128.0, 255.0])))
  np.testing.assert_array_equal(s, np.float32([0.0, 127.9, 127.0, 0.0]))


def test_blur_radius_and_view_probabilities_follow_the_config():
  cfg = pipeline.default_data_config().to_dict()
  assert augment.blur_radius(cfg, 224) == 6  # 3 x 2.0 px
  assert augment.blur_radius(dict(cfg, blur_sigma_um=(0.05, 0.5), mpp_range=(0.4, 0.7)), 96) == 4  # 0.5/0.4 px
  blur, sol = augment.view_probabilities("global", 2, cfg)
  np.testing.assert_allclose(blur, [1.0, 0.1]) and np.testing.assert_allclose(sol, [0.0, 0.2])
  blur, sol = augment.view_probabilities("local", 3, cfg)
  np.testing.assert_allclose(blur, [0.5] * 3) and np.testing.assert_allclose(sol, [0.0] * 3)


def _device_cfg(**kw):
  cfg = pipeline.default_data_config()
  cfg.global_size, cfg.local_size, cfg.n_local = 64, 32, 2
  cfg.max_nuclei_global, cfg.max_nuclei_local = 32, 8
  cfg.augment_on = "device"
  for k, v in kw.items():
    setattr(cfg, k, v)
  return cfg


def test_render_is_a_function_of_the_key():
  src = pipeline.open_pretrain_source(_device_cfg())
  batch = next(iter(pipeline.make_pretrain_dataset(src, _device_cfg(), seed=3, batch_size=2)))
  lay = pipeline.batch_layout(_device_cfg(), 2)
  assert {g: {k: (v.shape, v.dtype) for k, v in f.items()} for g, f in batch.items()} == \
      {g: {k: (s, np.dtype(d)) for k, (s, d) in f.items()} for g, f in lay.items()}
  render = jax.jit(lambda b, k: augment.render(b, k, _device_cfg()))
  a = render(batch, jax.random.PRNGKey(0))
  b = render(batch, jax.random.PRNGKey(0))
  c = render(batch, jax.random.PRNGKey(1))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert not np.array_equal(np.asarray(a["global"]["images"]), np.asarray(c["global"]["images"]))
  for g, size in (("global", 64), ("local", 32)):
    im = np.asarray(a[g]["images"])
    assert im.shape == (2, batch[g]["crops"].shape[1], size, size, 3) and im.dtype == np.float32
    assert 0.0 <= im.min() and im.max() <= 1.0
    np.testing.assert_array_equal(a[g]["coords"], batch[g]["coords"])


@pytest.mark.slow
def test_device_layout_batches_are_the_same_for_any_worker_count():
  src = pipeline.open_pretrain_source(_device_cfg())
  ref = iter(pipeline.make_pretrain_dataset(src, _device_cfg(num_workers=0), seed=5, batch_size=2))
  it2 = iter(pipeline.make_pretrain_dataset(src, _device_cfg(num_workers=2), seed=5, batch_size=2))
  for _ in range(3):
    jax.tree.map(np.testing.assert_array_equal, next(ref), next(it2))
  it2.close()
