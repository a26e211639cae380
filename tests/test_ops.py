"""Tests of muse_jax.ops against NumPy references written from the PyTorch kernels' semantics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import ops

# ---------------------------------------------------------------------------------------------------------------
# NumPy references (scalar loops, written independently of the matrix implementation in ops.py).


def ref_bilinear_ac(x, out_h, out_w):
  """PyTorch upsample_bilinear2d, align_corners=True, one output pixel at a time. x: [H, W, C]."""
  h_in, w_in, c = x.shape
  out = np.zeros((out_h, out_w, c), np.float64)
  sh = (h_in - 1) / (out_h - 1) if out_h > 1 else 0.0
  sw = (w_in - 1) / (out_w - 1) if out_w > 1 else 0.0
  for i in range(out_h):
    ry = sh * i
    y0 = int(ry)
    y1 = y0 + (1 if y0 < h_in - 1 else 0)
    ly = ry - y0
    for j in range(out_w):
      rx = sw * j
      x0 = int(rx)
      x1 = x0 + (1 if x0 < w_in - 1 else 0)
      lx = rx - x0
      out[i, j] = ((1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1]) + ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1]))
  return out


def _cubic_coeffs(t, a=-0.75):
  def c1(v):
    return ((a + 2) * v - (a + 3)) * v * v + 1

  def c2(v):
    return ((a * v - 5 * a) * v + 8 * a) * v - 4 * a

  return [c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]


def ref_bicubic_scale(x, scale_h, scale_w):
  """PyTorch F.interpolate(mode='bicubic', align_corners=False, scale_factor=(scale_h, scale_w)); x: [H, W, C].

  Output size floor(in * scale); source coordinate (dst + 0.5) / scale - 0.5 (the given scale, not in/out);
  4 x 4 taps with indices clamped to the border.
  """
  h_in, w_in, c = x.shape
  out_h, out_w = int(math.floor(h_in * scale_h)), int(math.floor(w_in * scale_w))
  out = np.zeros((out_h, out_w, c), np.float64)
  for i in range(out_h):
    ry = np.float32(1.0 / scale_h) * (np.float32(i) + np.float32(0.5)) - np.float32(0.5)
    y0 = int(math.floor(ry))
    cy = _cubic_coeffs(float(ry - y0))
    for j in range(out_w):
      rx = np.float32(1.0 / scale_w) * (np.float32(j) + np.float32(0.5)) - np.float32(0.5)
      x0 = int(math.floor(rx))
      cx = _cubic_coeffs(float(rx - x0))
      acc = np.zeros(c, np.float64)
      for a in range(4):
        yy = min(max(y0 - 1 + a, 0), h_in - 1)
        row = np.zeros(c, np.float64)
        for b in range(4):
          xx = min(max(x0 - 1 + b, 0), w_in - 1)
          row += cx[b] * x[yy, xx]
        acc += cy[a] * row
      out[i, j] = acc
  return out


def ref_dino_pos_embed(pos, gh, gw):
  """DINO's interpolate_pos_encoding on a [1, 1+N, D] array."""
  n_tok = pos.shape[1] - 1
  n = int(math.sqrt(n_tok))
  grid = pos[0, 1:].reshape(n, n, -1)
  out = ref_bicubic_scale(grid, (gh + 0.1) / math.sqrt(n_tok), (gw + 0.1) / math.sqrt(n_tok))
  assert out.shape[:2] == (gh, gw)
  return np.concatenate([pos[:, :1], out.reshape(1, gh * gw, -1)], axis=1)


def ref_grid_sample(f_map, coords, image_size):
  """torch grid_sample(bilinear, align_corners=True, zeros) at g = 2 * xy / S - 1, one point at a time.

  f_map: [h, w, C]; coords: [N, 2] (x, y). Returns [N, C].
  """
  h, w, c = f_map.shape
  out = np.zeros((len(coords), c), np.float64)
  for n, (x, y) in enumerate(coords):
    gx, gy = 2.0 * x / image_size - 1.0, 2.0 * y / image_size - 1.0
    ix, iy = (gx + 1) / 2 * (w - 1), (gy + 1) / 2 * (h - 1)
    x0, y0 = math.floor(ix), math.floor(iy)
    for xx, yy, wt in ((x0, y0, (x0 + 1 - ix) * (y0 + 1 - iy)), (x0 + 1, y0, (ix - x0) * (y0 + 1 - iy)),
                       (x0, y0 + 1, (x0 + 1 - ix) * (iy - y0)), (x0 + 1, y0 + 1, (ix - x0) * (iy - y0))):
      if 0 <= xx < w and 0 <= yy < h:
        out[n] += wt * f_map[yy, xx]
  return out


# ---------------------------------------------------------------------------------------------------------------


def test_normalize_images_uint8_and_float_agree():
  x = np.random.RandomState(0).randint(0, 256, (2, 4, 4, 3)).astype(np.uint8)
  a = ops.normalize_images(jnp.asarray(x))
  b = ops.normalize_images(jnp.asarray(x, jnp.float32) / 255.0)
  assert a.dtype == jnp.float32
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  zero = ops.normalize_images(jnp.zeros((1, 1, 3), jnp.uint8))
  np.testing.assert_allclose(zero[0, 0], -np.array(ops.IMAGENET_MEAN) / np.array(ops.IMAGENET_STD), rtol=1e-6)


@pytest.mark.parametrize("x", [np.zeros((4, 4, 1), np.float32), np.zeros((4, 4, 3), np.int32)])
def test_normalize_images_rejects_bad_input(x):
  with pytest.raises(ValueError, match="normalize_images"):
    ops.normalize_images(jnp.asarray(x))


@pytest.mark.parametrize("hw_in,hw_out", [((7, 7), (28, 28)), ((14, 14), (56, 56)), ((13, 13), (6, 6)),
                                          ((6, 9), (13, 4)), ((5, 5), (1, 1)), ((3, 3), (3, 3))])
def test_resize_bilinear_ac_matches_reference(hw_in, hw_out):
  x = np.random.RandomState(1).randn(2, *hw_in, 3).astype(np.float32)
  got = np.asarray(ops.resize_bilinear_ac(jnp.asarray(x), hw_out))
  assert got.shape == (2, *hw_out, 3)
  for b in range(2):
    np.testing.assert_allclose(got[b], ref_bilinear_ac(x[b], *hw_out), rtol=1e-5, atol=1e-5)


def test_resize_bilinear_ac_corners_and_linear_ramp():
  # align_corners=True keeps the corner values and reproduces a linear ramp exactly.
  ramp = np.arange(7, dtype=np.float32)
  x = (ramp[:, None] * 2 + ramp[None, :])[None, :, :, None]
  got = np.asarray(ops.resize_bilinear_ac(jnp.asarray(x), (13, 25)))[0, :, :, 0]
  yy = np.linspace(0, 6, 13)[:, None]
  xx = np.linspace(0, 6, 25)[None, :]
  np.testing.assert_allclose(got, yy * 2 + xx, atol=1e-5)


@pytest.mark.parametrize("n,grid", [(14, (6, 6)), (14, (13, 13)), (14, (32, 32)), (14, (64, 64)), (4, (6, 13))])
def test_resize_pos_embed_matches_dino_reference(n, grid):
  pos = np.random.RandomState(2).randn(1, 1 + n * n, 5).astype(np.float32)
  got = np.asarray(ops.resize_pos_embed(jnp.asarray(pos), grid))
  want = ref_dino_pos_embed(pos, *grid)
  assert got.shape == want.shape == (1, 1 + grid[0] * grid[1], 5)
  np.testing.assert_array_equal(got[:, 0], pos[:, 0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resize_pos_embed_known_answers():
  pos = np.random.RandomState(3).randn(1, 1 + 14 * 14, 4).astype(np.float32)
  # Same grid: returned unchanged (DINO's shortcut).
  np.testing.assert_array_equal(ops.resize_pos_embed(jnp.asarray(pos), (14, 14)), pos)
  # force=True: the official load-time near-identity interpolation (scale 14.1 / 14), not a no-op.
  forced = np.asarray(ops.resize_pos_embed(jnp.asarray(pos), (14, 14), force=True))
  np.testing.assert_allclose(forced, ref_dino_pos_embed(pos, 14, 14), rtol=1e-5, atol=1e-5)
  assert np.abs(forced - pos).max() > 1e-3
  # Cubic weights sum to 1: a constant embedding stays constant at any size.
  const = np.full((1, 1 + 14 * 14, 4), 0.7, np.float32)
  np.testing.assert_allclose(ops.resize_pos_embed(jnp.asarray(const), (32, 32)), 0.7, rtol=1e-6)
  # a = -0.75 differs from jax.image.resize's Keys a = -0.5: check we are not accidentally using it.
  grid = jnp.asarray(pos[0, 1:].reshape(14, 14, 4))
  keys = np.asarray(jax.image.resize(grid, (32, 32, 4), "bicubic"))
  ours = np.asarray(ops.resize_pos_embed(jnp.asarray(pos), (32, 32)))[0, 1:].reshape(32, 32, 4)
  assert np.abs(keys - ours).max() > 1e-3


def test_resize_pos_embed_rejects_bad_input():
  with pytest.raises(ValueError, match=r"1 \+ n\*n"):
    ops.resize_pos_embed(jnp.zeros((1, 1 + 15, 4)), (4, 4))
  with pytest.raises(ValueError, match=r"\[1, 1 \+ N, D\]"):
    ops.resize_pos_embed(jnp.zeros((1 + 16, 4)), (4, 4))


def _sampler_inputs(b=3, h=7, w=7, c=5, n=11, s=28, seed=0):
  rng = np.random.RandomState(seed)
  f_map = rng.randn(b, h, w, c).astype(np.float32)
  coords = rng.uniform(-4, s + 4, (b, n, 2)).astype(np.float32)  # some outside the image
  coords[:, 0] = 0.0
  coords[:, 1] = s  # pixel S maps to the last cell
  mask = rng.rand(b, n) > 0.2
  mask[:, :2] = True
  return f_map, coords, mask


def test_sample_nuclei_matches_grid_sample_reference():
  f_map, coords, mask = _sampler_inputs()
  got = np.asarray(ops.sample_nuclei(jnp.asarray(f_map), jnp.asarray(coords), jnp.asarray(mask), 28))
  assert got.shape == (3, 11, 5)
  for b in range(3):
    want = ref_grid_sample(f_map[b], coords[b], 28) * mask[b][:, None]
    np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)


def test_sample_nuclei_known_answers_at_grid_points():
  f_map, _, _ = _sampler_inputs(b=2, h=7, w=9)
  s = 32
  # Cell (i, j) sits at x = j * S / (w - 1), y = i * S / (h - 1).
  ii, jj = np.meshgrid(np.arange(7), np.arange(9), indexing="ij")
  coords = np.stack([jj.ravel() * s / 8, ii.ravel() * s / 6], -1).astype(np.float32)
  coords = np.broadcast_to(coords, (2,) + coords.shape)
  got = np.asarray(ops.sample_nuclei(jnp.asarray(f_map), jnp.asarray(coords), None, s))
  np.testing.assert_allclose(got, f_map.reshape(2, 63, -1), rtol=1e-5, atol=1e-5)
  # Far outside: all four corners out of range -> zeros.
  far = jnp.full((2, 3, 2), -100.0)
  assert float(jnp.abs(ops.sample_nuclei(jnp.asarray(f_map), far, None, s)).max()) == 0.0


def test_sample_nuclei_jit_grad_and_batch_independence():
  f_map, coords, mask = _sampler_inputs()
  fn = jax.jit(ops.sample_nuclei, static_argnums=3)
  out = fn(jnp.asarray(f_map), jnp.asarray(coords), jnp.asarray(mask), 28)
  per_image = [ops.sample_nuclei(jnp.asarray(f_map[b:b + 1]), jnp.asarray(coords[b:b + 1]),
                                 jnp.asarray(mask[b:b + 1]), 28) for b in range(3)]
  np.testing.assert_allclose(out, np.concatenate(per_image), rtol=1e-6, atol=1e-6)

  def loss(fm, xy):
    return jnp.sum(ops.sample_nuclei(fm, xy, jnp.asarray(mask), 28) ** 2)

  g_map, g_xy = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(f_map), jnp.asarray(coords))
  assert np.isfinite(g_map).all() and np.isfinite(g_xy).all()
  assert float(jnp.abs(g_xy[mask]).max()) > 0 and float(jnp.abs(g_xy[~mask]).max()) == 0.0
  # The bilinear weights of one in-range point sum to 1: d sum(out) / d f_map sums to #valid points per channel.
  inside = mask & np.all((coords >= 0) & (coords <= 28), axis=-1)
  g_lin = jax.grad(lambda fm: jnp.sum(ops.sample_nuclei(fm, jnp.asarray(coords), jnp.asarray(inside), 28)))(
      jnp.asarray(f_map))
  np.testing.assert_allclose(np.asarray(g_lin).sum(axis=(1, 2)), inside.sum(1)[:, None] * np.ones((1, 5)), rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(coords=np.zeros((3, 11), np.float32)), r"`coords` must be \[B, N, 2\].*got shape \(3, 11\)"),
    (dict(coords=np.zeros((2, 11, 2), np.float32)), r"`coords` must be \[B, N, 2\] = \[3, N, 2\]"),
    (dict(coords=np.zeros((3, 11, 2), np.int32)), r"`coords` must be floating.*int32"),
    (dict(mask=np.ones((3, 10), bool)), r"`mask` must be \[B, N\] = \(3, 11\); got shape \(3, 10\)"),
    (dict(mask=np.ones((3, 11), np.float32)), r"`mask` must be bool"),
    (dict(f_map=np.zeros((7, 7, 5), np.float32)), r"`f_map` must be \[B, h, w, C\]"),
    (dict(image_size=0), r"`image_size` must be a positive int"),
])
def test_sample_nuclei_rejects_bad_input(kwargs, match):
  f_map, coords, mask = _sampler_inputs()
  args = dict(f_map=f_map, coords=coords, mask=mask, image_size=28)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    ops.sample_nuclei(jnp.asarray(args["f_map"]), jnp.asarray(args["coords"]), jnp.asarray(args["mask"]),
                      args["image_size"])
