"""The views' final resize, flips / rotations and photometric augmentations inside the jitted step (issue #23).

With `config.data.augment_on = 'device'` the host pipeline (`muse_jax.data.views`) only crops and packs: each view
arrives as an unresized uint8 window `crops` [B, V, S, S, 3] with its field of view `box` [B, V, 3] (`ox, oy, fov`,
edge coordinates in crop pixels) and its geometric flags `geom` [B, V, 3] (`hflip, vflip, k`); the nucleus
coordinates were already mapped into the final view on the host. `render` turns a batch of that form into the
float views the step trains on, on the accelerator:

1. resize the field of view to `size` x `size` px: PIL's bilinear filter (a triangle kernel whose support grows with
   the downsampling factor, i.e. antialiased, weights normalised per output pixel), as two interpolation-matrix
   matmuls per view;
2. horizontal flip, vertical flip, then `k` counter-clockwise 90° rotations (the host's order; `np.rot90`);
3. the photometric pipeline of `views.photometric_pil` in its order and with its probabilities and ranges: colour
   augmentation (`color_aug` 'rgb': optional H&E stain jitter, then DINO's colour jitter as one affine colour map
   with the four adjustments in random order; 'hed': stain jitter; 'none'), grayscale (ITU-R 601 luma), Gaussian
   blur (sigma in px or `blur_sigma_um` / view mpp; a true Gaussian truncated at 3 sigma with edge replication,
   where PIL approximates it with box blurs), solarisation (x >= 128 -> 255 - x) on the second global view.

Per-view probabilities follow the host: blur `blur_p` = (first global, other globals, locals), solarisation on the
second global view only. Every random draw comes from `jax.random.fold_in(step_rng, AUG_SALT)`, split per group
and per view, so a run is deterministic for a seed, independent of the number of Grain workers (the host part is
per-record deterministic), and a resumed run draws the same augmentations. Values stay float in [0, 255] through
the chain (the host rounds to uint8 after each PIL operation), clipped where the host clips; `render` returns
them / 255.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.data.views import _LUMA, _RGB2YIQ, _YIQ2RGB  # the host's colour constants  # pylint: disable=protected-access

AUG_SALT = 0x61756721  # fold_in constant of the step key for the augmentations (distinct from drop-path's 0, 1)


def _hed_matrices() -> tuple[np.ndarray, np.ndarray]:
  from skimage.color import hed_from_rgb, rgb_from_hed  # pylint: disable=g-import-not-at-top
  return np.asarray(hed_from_rgb, np.float32), np.asarray(rgb_from_hed, np.float32)


# ----------------------------------------------------------------------------------------------- geometric


def resize_matrix(offset: jax.Array, fov: jax.Array, size: int, in_size: int) -> jax.Array:
  """[size, in_size] weights resizing the window `[offset, offset + fov)` (edge coordinates) of an axis of
  `in_size` px to `size` px with PIL's bilinear filter: output pixel `i` samples centre `offset + (i + 0.5) * s`
  (`s = fov / size`) with the triangle kernel of half-width `max(1, s)` input px (antialiased when reducing),
  weights normalised to sum 1."""
  scale = fov / size
  support = jnp.maximum(scale, 1.0)
  center = offset + (jnp.arange(size, dtype=jnp.float32) + 0.5) * scale
  j = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  w = jnp.maximum(0.0, 1.0 - jnp.abs(j[None, :] - center[:, None]) / support)
  return w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def resize_view(crop: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """One view: crop [S, S, 3] (uint8 or float) and box (ox, oy, fov) -> float32 [size, size, 3] in crop units."""
  s = crop.shape[0]
  wy = resize_matrix(box[1], box[2], size, s)
  wx = resize_matrix(box[0], box[2], size, s)
  x = crop.astype(jnp.float32)
  x = jnp.einsum("ij,jkc->ikc", wy, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("lk,ikc->ilc", wx, x, precision=jax.lax.Precision.HIGHEST)


def flip_rotate(x: jax.Array, geom: jax.Array) -> jax.Array:
  """Square view [S, S, C]: h-flip if geom[0], v-flip if geom[1], then geom[2] counter-clockwise 90° rotations
  (the image half of `views.geometric_coords`)."""
  x = jnp.where(geom[0] > 0, x[:, ::-1], x)
  x = jnp.where(geom[1] > 0, x[::-1], x)
  rots = jnp.stack([jnp.rot90(x, k) for k in range(4)])
  return rots[jnp.mod(geom[2], 4)]


# ----------------------------------------------------------------------------------------------- photometric


def stain_jitter(x: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
  """skimage `hed2rgb(rgb2hed(x) * alpha + beta)` on float RGB in [0, 255] ([..., 3]); returns [0, 255]."""
  hed_from_rgb, rgb_from_hed = _hed_matrices()
  log_adjust = math.log(1e-6)
  rgb = jnp.maximum(x / 255.0, 1e-6)
  stains = jnp.maximum((jnp.log(rgb) / log_adjust) @ hed_from_rgb, 0.0)
  stains = stains * alpha + beta
  out = jnp.exp(-(stains * -log_adjust) @ rgb_from_hed)
  return jnp.clip(out, 0.0, 1.0) * 255.0


def color_jitter_matrix(mean_rgb: jax.Array, order: jax.Array, factors: jax.Array,
                        enabled: tuple[bool, bool, bool, bool]) -> tuple[jax.Array, jax.Array]:
  """The affine colour map (A [3, 3], t [3]) of `views.color_jitter`: brightness `b x`, contrast `c x + (1 - c) *
  gray mean`, saturation (blend with luma), hue (YIQ chroma rotation by `theta` radians), composed in `order`
  (a permutation of 0..3); `factors` = (b, c, sat, theta); disabled ops are skipped."""
  eye = jnp.eye(3, dtype=jnp.float32)
  luma = jnp.asarray(_LUMA, jnp.float32)
  a, t = eye, jnp.zeros(3, jnp.float32)
  b, c, sat, theta = factors[0], factors[1], factors[2], factors[3]
  co, si = jnp.cos(theta), jnp.sin(theta)
  rot = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], jnp.float32)
  rot = rot.at[1, 1].set(co).at[1, 2].set(-si).at[2, 1].set(si).at[2, 2].set(co)
  hue_m = jnp.asarray(_YIQ2RGB, jnp.float32) @ rot @ jnp.asarray(_RGB2YIQ, jnp.float32)
  sat_m = sat * eye + (1.0 - sat) * jnp.outer(jnp.ones(3, jnp.float32), luma)
  ms = jnp.stack([b * eye if enabled[0] else eye, c * eye if enabled[1] else eye,
                  sat_m if enabled[2] else eye, hue_m if enabled[3] else eye])
  for p in range(4):
    op = order[p]
    gray_mean = luma @ (a @ mean_rgb + t)
    ds = jnp.stack([jnp.zeros(3), jnp.full(3, (1.0 - c) * gray_mean) if enabled[1] else jnp.zeros(3),
                    jnp.zeros(3), jnp.zeros(3)]).astype(jnp.float32)
    m, d = ms[op], ds[op]
    a, t = m @ a, m @ t + d
  return a, t


def grayscale(x: jax.Array) -> jax.Array:
  """ITU-R 601-2 luma (PIL 'L') replicated on the 3 channels."""
  y = x @ jnp.asarray(_LUMA, jnp.float32)
  return jnp.repeat(y[..., None], 3, axis=-1)


def blur_matrix(sigma: jax.Array, size: int, radius: int) -> jax.Array:
  """[size, size] Gaussian blur of one axis: kernel exp(-d^2 / 2 sigma^2), |d| <= radius, normalised, with the edge
  pixel repeated beyond the border."""
  d = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  g = jnp.exp(-0.5 * (d / jnp.maximum(sigma, 1e-3)) ** 2)
  g = g / g.sum()  # g[r] is the weight of offset r - radius
  i = jnp.arange(size)[:, None]
  off = jnp.arange(size)[None, :] - i  # [size, size]: j - i
  m = jnp.where(jnp.abs(off) <= radius, g[jnp.clip(off + radius, 0, 2 * radius)], 0.0)
  # Taps beyond the border read the edge pixel: column 0 gets every offset r - radius <= -i, column size - 1 every
  # offset >= size - 1 - i.
  cum = jnp.concatenate([jnp.zeros(1), jnp.cumsum(g)])  # cum[n] = sum of g[:n]
  first = cum[jnp.clip(radius - i[:, 0] + 1, 0, 2 * radius + 1)]
  last = 1.0 - cum[jnp.clip(size - 1 - i[:, 0] + radius, 0, 2 * radius + 1)]
  m = m.at[:, 0].set(first)
  return m.at[:, size - 1].set(last)


def gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Separable Gaussian blur of a square view [S, S, 3] (`blur_matrix` on both axes)."""
  m = blur_matrix(sigma, x.shape[0], radius)
  x = jnp.einsum("ij,jkc->ikc", m, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("lk,ikc->ilc", m, x, precision=jax.lax.Precision.HIGHEST)


def solarize(x: jax.Array) -> jax.Array:
  return jnp.where(x >= 128.0, 255.0 - x, x)


def _sigma_bounds(cfg: Mapping[str, Any]) -> tuple[float, float, bool]:
  """(lo, hi, in_um) of the blur sigma draw."""
  um = cfg.get("blur_sigma_um")
  if um is not None:
    return float(um[0]), float(um[1]), True
  return float(cfg["blur_sigma"][0]), float(cfg["blur_sigma"][1]), False


def blur_radius(cfg: Mapping[str, Any], size: int) -> int:
  """Static kernel half-width (px): 3 x the largest sigma the config can draw (µm sigmas at the smallest view
  mpp), at most `size - 1`."""
  lo, hi, in_um = _sigma_bounds(cfg)
  del lo
  if in_um:
    mpps = cfg["mpp_choices"] if cfg["mpp_dist"] == "discrete" else cfg["mpp_range"]
    hi = hi / float(min(mpps))
  return int(max(1, min(size - 1, math.ceil(3.0 * hi))))


def photometric(x: jax.Array, key: jax.Array, mpp: jax.Array, blur_p: jax.Array, solarize_p: jax.Array,
                cfg: Mapping[str, Any], radius: int, do_blur: bool, do_solarize: bool) -> jax.Array:
  """One view [S, S, 3] float in [0, 255] through the host's photometric pipeline (`views.photometric_pil`)."""
  aug = cfg.get("color_aug", "rgb")
  strength = float(cfg.get("stain_jitter", 0.0))
  ks = jax.random.split(key, 10)
  u = jax.random.uniform(ks[0], (4,))  # apply colour, grayscale, blur, solarise?

  def stain(y, k):
    ka, kb = jax.random.split(k)
    alpha = jax.random.uniform(ka, (3,), minval=1 - strength, maxval=1 + strength)
    beta = jax.random.uniform(kb, (3,), minval=-strength, maxval=strength) * 0.05
    return stain_jitter(y, alpha, beta)

  if aug == "rgb":
    if strength > 0:
      x = stain(x, ks[1])
    bri, con, sat, hue = (float(cfg[k]) for k in ("brightness", "contrast", "saturation", "hue"))
    enabled = (bri > 0, con > 0, sat > 0, hue > 0)
    if any(enabled) and float(cfg["color_jitter_p"]) > 0:
      lo = jnp.array([max(0.0, 1 - bri), max(0.0, 1 - con), max(0.0, 1 - sat), -hue], jnp.float32)
      hi = jnp.array([1 + bri, 1 + con, 1 + sat, hue], jnp.float32)
      f = lo + (hi - lo) * jax.random.uniform(ks[2], (4,))
      f = f.at[3].multiply(2 * math.pi)
      order = jax.random.permutation(ks[3], 4)
      a, t = color_jitter_matrix(x.mean(axis=(0, 1)), order, f, enabled)
      jit_x = jnp.clip(x @ a.T + t, 0.0, 255.0)
      x = jnp.where(u[0] < float(cfg["color_jitter_p"]), jit_x, x)
  elif aug == "hed":
    if strength <= 0:
      raise ValueError("data.color_aug='hed' needs data.stain_jitter > 0 (e.g. 0.1)")
    x = jnp.where(u[0] < float(cfg["color_jitter_p"]), stain(x, ks[1]), x)
  elif aug != "none":
    raise ValueError(f"data.color_aug={aug!r}: expected 'rgb', 'hed' or 'none'")
  if float(cfg["grayscale_p"]) > 0:
    x = jnp.where(u[1] < float(cfg["grayscale_p"]), grayscale(x), x)
  if do_blur:
    lo, hi, in_um = _sigma_bounds(cfg)
    sigma = jax.random.uniform(ks[4], (), minval=lo, maxval=hi)
    if in_um:
      sigma = sigma / mpp
    x = jnp.where(u[2] < blur_p, gaussian_blur(x, sigma, radius), x)
  if do_solarize:
    x = jnp.where(u[3] < solarize_p, solarize(x), x)
  return x


# ----------------------------------------------------------------------------------------------- the batch


def view_probabilities(group: str, n_views: int, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """Per-view (blur_p [V], solarize_p [V]) as `views.make_views` assigns them."""
  g1, g2, loc = (float(p) for p in cfg["blur_p"])
  if group == "global":
    blur = np.array([g1] + [g2] * (n_views - 1), np.float32)
    sol = np.array([float(cfg["solarize_p"]) if v == 1 else 0.0 for v in range(n_views)], np.float32)
  else:
    blur, sol = np.full(n_views, loc, np.float32), np.zeros(n_views, np.float32)
  return blur, sol


def render_group(group: Mapping[str, jax.Array], key: jax.Array, name: str, size: int,
                 cfg: Mapping[str, Any]) -> jax.Array:
  """One resolution group's `crops` [B, V, S, S, 3] uint8 + `box` + `geom` + `mpp` -> float32 [B, V, size, size, 3]
  in [0, 255]."""
  crops, box, geom, mpp = group["crops"], group["box"], group["geom"], group["mpp"]
  b, v = crops.shape[:2]
  blur_p, sol_p = view_probabilities(name, v, cfg)
  radius = blur_radius(cfg, size)
  do_blur, do_sol = bool(blur_p.max() > 0), bool(sol_p.max() > 0)
  keys = jax.random.split(key, b * v).reshape((b, v) + jax.random.split(key, 1).shape[1:])

  def one(crop, bx, gm, m, k, bp, sp):
    x = flip_rotate(resize_view(crop, bx, size), gm)
    return photometric(x, k, m, bp, sp, cfg, radius, do_blur, do_sol)

  per_view = jax.vmap(one, in_axes=(0, 0, 0, 0, 0, 0, 0))          # over V
  per_batch = jax.vmap(per_view, in_axes=(0, 0, 0, 0, 0, None, None))  # over B
  return per_batch(crops, box, geom, mpp, keys, jnp.asarray(blur_p), jnp.asarray(sol_p))


def needs_render(batch: Mapping[str, Any]) -> bool:
  """True for a batch in the 'device' layout (`crops` instead of `images`)."""
  return "crops" in batch["global"]


def render(batch: Mapping[str, Any], key: jax.Array, cfg: Mapping[str, Any]) -> dict[str, Any]:
  """A 'device'-layout batch -> the same batch with `images` float32 [B, V, size, size, 3] in [0, 1] per group
  (crops, box and geom removed). `cfg`: the data config (`config.data`); `key`: the step's augmentation key."""
  out = {}
  for gi, name in enumerate(sorted(batch)):
    grp = dict(batch[name])
    size = int(cfg["global_size"] if name == "global" else cfg["local_size"])
    # Clipped to the uint8 range the host produces (the normalised resize and blur can overshoot by ~1e-5).
    images = jnp.clip(render_group(grp, jax.random.fold_in(key, gi), name, size, cfg), 0.0, 255.0)
    for k in ("crops", "box", "geom"):
      grp.pop(k)
    grp["images"] = images / 255.0
    out[name] = grp
  return out
