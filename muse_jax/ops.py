"""Small array ops shared by the MUSE backbone, pretraining and evaluation.

All ops take NHWC arrays with static shapes, are jit-able and differentiable, and reproduce the PyTorch semantics
of the official MUSE code (so imported weights behave the same):

* `normalize_images`: uint8 or [0, 1] images -> ImageNet-normalised float32.
* `resize_bilinear_ac`: bilinear resize with ``align_corners=True`` (every resize in the MUSE decoder).
* `resize_pos_embed`: DINO's run-time position-embedding interpolation (PyTorch bicubic, a = -0.75,
  ``align_corners=False``, the ``+0.1`` scale-factor trick).
* `sample_nuclei`: the nucleus feature sampler O_bi (``grid_sample`` bilinear, ``align_corners=True``, zero padding)
  with the official mapping ``u = x * (w - 1) / S``, vectorised over the batch.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC_A = -0.75  # PyTorch's cubic convolution constant (jax.image.resize uses -0.5).


def normalize_images(x: jax.Array) -> jax.Array:
  """ImageNet-normalises images.

  Args:
    x: `[..., H, W, 3]` images, either uint8 in [0, 255] (divided by 255 first) or floating in [0, 1].

  Returns:
    float32 `[..., H, W, 3]`: ``(x - mean) / std`` with ImageNet mean (0.485, 0.456, 0.406) and std
    (0.229, 0.224, 0.225).

  Raises:
    ValueError: if the last axis is not 3 or the dtype is neither uint8 nor floating.
  """
  if x.ndim < 1 or x.shape[-1] != 3:
    raise ValueError(f"normalize_images: `x` must have shape [..., H, W, 3]; got shape {tuple(x.shape)}.")
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32) / 255.0
  elif jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  else:
    raise ValueError(f"normalize_images: `x` must be uint8 or floating; got dtype {x.dtype}.")
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return (x - mean) / std


def _linear_ac_matrix(n_in: int, n_out: int) -> np.ndarray:
  """`[n_out, n_in]` matrix of 1-D linear interpolation with align_corners=True (float64)."""
  m = np.zeros((n_out, n_in), np.float64)
  if n_out == 1 or n_in == 1:
    m[:, 0] = 1.0  # PyTorch: scale 0 when out == 1, so every output reads input 0.
    return m
  src = np.arange(n_out, dtype=np.float64) * (n_in - 1) / (n_out - 1)
  i0 = np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = src - i0
  rows = np.arange(n_out)
  np.add.at(m, (rows, i0), 1.0 - w1)
  np.add.at(m, (rows, i1), w1)
  return m


def resize_bilinear_ac(x: jax.Array, out_hw: Sequence[int]) -> jax.Array:
  """Bilinear resize with ``align_corners=True`` (PyTorch ``F.interpolate(..., mode='bilinear', align_corners=True)``).

  Output pixel ``i`` reads source coordinate ``i * (in - 1) / (out - 1)`` (0 when ``out == 1``). Implemented as two
  small static interpolation matrices (exact, differentiable, no gathers).

  Args:
    x: `[B, H, W, C]` array (any floating dtype; the result keeps it).
    out_hw: output `(h, w)` in pixels, positive ints.

  Returns:
    `[B, h, w, C]`.
  """
  if x.ndim != 4:
    raise ValueError(f"resize_bilinear_ac: `x` must be [B, H, W, C]; got shape {tuple(x.shape)}.")
  h, w = (int(v) for v in out_hw)
  if h < 1 or w < 1:
    raise ValueError(f"resize_bilinear_ac: `out_hw` must be positive; got {tuple(out_hw)}.")
  _, hin, win, _ = x.shape
  if (h, w) == (hin, win):
    return x
  prec = jax.lax.Precision.HIGHEST
  if h != hin:
    mh = jnp.asarray(_linear_ac_matrix(hin, h), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=prec)
  if w != win:
    mw = jnp.asarray(_linear_ac_matrix(win, w), x.dtype)
    x = jnp.einsum("ow,bhwc->bhoc", mw, x, precision=prec)
  return x


def _cubic_weights(t: np.ndarray, a: float = BICUBIC_A) -> np.ndarray:
  """PyTorch ``get_cubic_upsample_coefficients``: weights of taps (-1, 0, 1, 2) for fractional offset `t`."""

  def cc1(v):  # |v| <= 1
    return ((a + 2.0) * v - (a + 3.0)) * v * v + 1.0

  def cc2(v):  # 1 < |v| < 2
    return ((a * v - 5.0 * a) * v + 8.0 * a) * v - 4.0 * a

  return np.stack([cc2(t + 1.0), cc1(t), cc1(1.0 - t), cc2(2.0 - t)], axis=-1)


def _bicubic_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
  """`[n_out, n_in]` matrix of PyTorch 1-D bicubic interpolation, align_corners=False, given `scale_factor`.

  PyTorch uses ``1 / scale_factor`` (not ``n_in / n_out``) for the source coordinate when a scale factor is given:
  ``src = (dst + 0.5) / scale - 0.5`` (no clamping for cubic); taps at ``floor(src) + (-1, 0, 1, 2)`` read the input
  with indices clamped to ``[0, n_in - 1]``.
  """
  ratio = np.float32(1.0 / scale)  # PyTorch computes 1.0 / scale in double and casts to the op type (float32).
  dst = np.arange(n_out, dtype=np.float32)
  src = ratio * (dst + np.float32(0.5)) - np.float32(0.5)
  i0 = np.floor(src).astype(np.int64)
  t = (src - i0).astype(np.float64)
  wts = _cubic_weights(t)
  m = np.zeros((n_out, n_in), np.float64)
  rows = np.arange(n_out)
  for k in range(4):
    idx = np.clip(i0 - 1 + k, 0, n_in - 1)
    np.add.at(m, (rows, idx), wts[:, k])
  return m


def resize_pos_embed(pos: jax.Array, grid_hw: Sequence[int], *, force: bool = False) -> jax.Array:
  """Resizes a ViT position embedding to a new token grid the way DINO does at run time.

  The patch part (N = n*n tokens, row-major) is viewed as an `n x n` grid and resized with PyTorch bicubic
  interpolation (a = -0.75, ``align_corners=False``) using ``scale_factor = (g + 0.1) / n`` per axis; the output
  size is ``floor(n * scale) = g``. The CLS position embedding (index 0) is kept. When the grid already is `n x n`
  the input is returned unchanged (DINO's shortcut) unless `force`. (DINO pairs the width's scale with the rows;
  identical for the square inputs MUSE uses. Here `gh` goes with rows.)

  Args:
    pos: `[1, 1 + N, D]` position embedding with N a perfect square.
    grid_hw: target token grid `(gh, gw)`.
    force: interpolate even when the grid is unchanged (a near-identity with scale (n + 0.1) / n). The official
      MUSE eval wrapper does this once to the stored `pos_embed` when it loads a released checkpoint (its
      load-time helper miscounts patches, so its shortcut never fires); an importer replicating it exactly
      calls `resize_pos_embed(pos, (n, n), force=True)`.

  Returns:
    `[1, 1 + gh * gw, D]`, dtype of `pos`.
  """
  if pos.ndim != 3 or pos.shape[0] != 1:
    raise ValueError(f"resize_pos_embed: `pos` must be [1, 1 + N, D]; got shape {tuple(pos.shape)}.")
  n_tok = pos.shape[1] - 1
  n = int(round(math.sqrt(n_tok)))
  if n * n != n_tok:
    raise ValueError(f"resize_pos_embed: `pos` must hold 1 + n*n tokens; got {pos.shape[1]} tokens.")
  gh, gw = (int(v) for v in grid_hw)
  if gh < 1 or gw < 1:
    raise ValueError(f"resize_pos_embed: `grid_hw` must be positive; got {tuple(grid_hw)}.")
  if (gh, gw) == (n, n) and not force:
    return pos
  mats = []
  for g in (gh, gw):
    scale = (g + 0.1) / math.sqrt(n_tok)
    out = int(math.floor(n * scale))
    if out != g:  # DINO asserts the same thing.
      raise ValueError(f"resize_pos_embed: scale trick gives {out} tokens, expected {g} (n={n}).")
    mats.append(jnp.asarray(_bicubic_matrix(n, g, scale), pos.dtype))
  grid = pos[0, 1:].reshape(n, n, -1)
  out = jnp.einsum("ih,jw,hwd->ijd", mats[0], mats[1], grid, precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([pos[:, :1], out.reshape(1, gh * gw, -1)], axis=1)


def _check_sampler_args(f_map, coords, mask, image_size) -> None:
  if f_map.ndim != 4:
    raise ValueError(f"sample_nuclei: `f_map` must be [B, h, w, C]; got shape {tuple(f_map.shape)}.")
  b = f_map.shape[0]
  if coords.ndim != 3 or coords.shape[0] != b or coords.shape[-1] != 2:
    raise ValueError(
        f"sample_nuclei: `coords` must be [B, N, 2] = [{b}, N, 2] (x, y in input pixels); "
        f"got shape {tuple(coords.shape)}.")
  if not jnp.issubdtype(coords.dtype, jnp.floating):
    raise ValueError(f"sample_nuclei: `coords` must be floating (float32); got dtype {coords.dtype}.")
  if mask is not None:
    if tuple(mask.shape) != tuple(coords.shape[:2]):
      raise ValueError(
          f"sample_nuclei: `mask` must be [B, N] = {tuple(coords.shape[:2])}; got shape {tuple(mask.shape)}.")
    if mask.dtype != jnp.bool_:
      raise ValueError(f"sample_nuclei: `mask` must be bool; got dtype {mask.dtype}.")
  if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
    raise ValueError(f"sample_nuclei: `image_size` must be a positive int (input side S); got {image_size!r}.")


def sample_nuclei(f_map: jax.Array, coords: jax.Array, mask: jax.Array | None, image_size: int) -> jax.Array:
  """Bilinearly samples `f_map` at nucleus coordinates (MUSE's O_bi), vectorised over the batch.

  Same numbers as the official ``grid_sample(f_map, 2 * xy / S - 1, mode='bilinear', align_corners=True,
  padding_mode='zeros')``: in feature-cell units ``u = x * (w - 1) / S`` and ``v = y * (h - 1) / S``; the four
  neighbouring cells are blended and cells outside the map contribute zero.

  Args:
    f_map: `[B, h, w, C]` dense features.
    coords: `[B, N, 2]` float, `(x, y)` = (column, row) in pixels of the `S x S` input image.
    mask: `[B, N]` bool (False = padding; those rows come out as zeros), or None (all valid).
    image_size: the input side `S` in pixels (square inputs).

  Returns:
    `[B, N, C]` in the dtype of `f_map`. Differentiable w.r.t. `f_map` and `coords`.
  """
  _check_sampler_args(f_map, coords, mask, image_size)
  return _sample_nuclei(f_map, coords, mask, int(image_size))


@functools.partial(jax.jit, static_argnums=3)
def _sample_nuclei(f_map: jax.Array, coords: jax.Array, mask: jax.Array | None, image_size: int) -> jax.Array:
  b, h, w, c = f_map.shape
  coords = coords.astype(jnp.float32)
  u = coords[..., 0] * ((w - 1) / image_size)
  v = coords[..., 1] * ((h - 1) / image_size)
  u0 = jnp.floor(u)
  v0 = jnp.floor(v)
  fu = u - u0
  fv = v - v0
  u0 = u0.astype(jnp.int32)
  v0 = v0.astype(jnp.int32)
  flat = f_map.reshape(b, h * w, c)
  bidx = jnp.arange(b)[:, None]
  out = jnp.zeros(coords.shape[:2] + (c,), jnp.float32)
  for du, dv, wt in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
    ui = u0 + du
    vi = v0 + dv
    valid = (ui >= 0) & (ui <= w - 1) & (vi >= 0) & (vi <= h - 1)
    idx = jnp.clip(vi, 0, h - 1) * w + jnp.clip(ui, 0, w - 1)
    vals = flat[bidx, idx]  # [B, N, C]
    out = out + vals.astype(jnp.float32) * jnp.where(valid, wt, 0.0)[..., None]
  if mask is not None:
    out = jnp.where(mask[..., None], out, 0.0)
  return out.astype(f_map.dtype)
