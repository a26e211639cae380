"""Synthetic whole-slide images and a matching fake predictor, for tests and benchmarks.

`write_synthetic_slide` writes a tiled, pyramidal RGB TIFF with tifffile (levels in SubIFDs, mpp in the TIFF
resolution tags, which tiffslide reads as `tiffslide.mpp-x`). The scene is analytic, so every level and every tile is
rendered on its own and writing stays memory-flat however large the slide is:

- a light grey background with mild noise (what a scanner sees around tissue);
- a pink "tissue" ellipse covering roughly the middle of the slide (no tissue at all with `tissue=False`);
- dark Gaussian dots ("nuclei") of two classes on a jittered grid inside the tissue, each centred on an integer level-0
  pixel so that the dot's darkest pixel is exactly its position.

`DotPredictor` implements the predictor protocol used by `muse_jax.slide.run` (`predict_tiles`, `class_names`, `mpp`,
`window`, `merge_radius_um`) with a small jitted local-minimum finder, so seams, resume and sharding can be tested
without a trained model.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import tifffile

BACKGROUND = np.array([242.0, 241.0, 243.0], np.float32)
TISSUE = np.array([236.0, 170.0, 205.0], np.float32)
# Dot colours at full strength: class 0 dark blue (haematoxylin-like), class 1 dark red-brown.
DOT_COLOURS = np.array([[60.0, 40.0, 140.0], [150.0, 40.0, 60.0]], np.float32)
DOT_SIGMA_PX = 2.0  # at level 0


@dataclasses.dataclass(frozen=True)
class SyntheticSlide:
  """What was written.

  Attributes:
    path: the TIFF file.
    width, height: level-0 size in pixels.
    mpp: level-0 µm/px written in the resolution tags (None when written without).
    points: float32 [N, 2] dot centres (x, y) in level-0 pixels (integers stored as float).
    classes: int32 [N] dot classes (0 or 1).
    tissue_ellipse: (cx, cy, rx, ry) of the tissue ellipse in level-0 pixels (zeros when there is no tissue).
  """
  path: pathlib.Path
  width: int
  height: int
  mpp: float | None
  points: np.ndarray
  classes: np.ndarray
  tissue_ellipse: tuple[float, float, float, float]


def make_dots(width: int, height: int, ellipse: tuple[float, float, float, float], spacing: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Dot centres on a jittered grid inside the ellipse.

  Returns:
    points float32 [N, 2] (x, y) integer level-0 pixel positions, classes int32 [N].
  """
  cx, cy, rx, ry = ellipse
  if rx <= 0 or ry <= 0:
    return np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)
  rng = np.random.default_rng(seed)
  gx, gy = np.meshgrid(np.arange(spacing / 2, width, spacing), np.arange(spacing / 2, height, spacing))
  pts = np.stack([gx.ravel(), gy.ravel()], -1)
  pts = pts + rng.uniform(-0.3 * spacing, 0.3 * spacing, pts.shape)
  pts = np.round(pts)
  inside = ((pts[:, 0] - cx) / rx) ** 2 + ((pts[:, 1] - cy) / ry) ** 2 < 0.97
  inside &= (pts[:, 0] >= 4) & (pts[:, 0] < width - 4) & (pts[:, 1] >= 4) & (pts[:, 1] < height - 4)
  pts = pts[inside].astype(np.float32)
  classes = rng.integers(0, 2, len(pts)).astype(np.int32)
  return pts, classes


def render_region(x0: int, y0: int, w: int, h: int, scale: float, ellipse: tuple[float, float, float, float],
                  points: np.ndarray, classes: np.ndarray, seed: int = 0) -> np.ndarray:
  """Renders the scene for a region of a pyramid level.

  Args:
    x0, y0, w, h: region in pixels of the level.
    scale: level downsample (level pixel = scale level-0 pixels).
    ellipse: tissue ellipse in level-0 pixels.
    points, classes: dots in level-0 pixels.
    seed: noise seed (mixed with the region position).

  Returns:
    uint8 [h, w, 3].
  """
  ys = (np.arange(y0, y0 + h, dtype=np.float32) + 0.5) * scale - 0.5
  xs = (np.arange(x0, x0 + w, dtype=np.float32) + 0.5) * scale - 0.5
  cx, cy, rx, ry = ellipse
  img = np.broadcast_to(BACKGROUND, (h, w, 3)).copy()
  if rx > 0 and ry > 0:
    inside = ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2 < 1.0
    img[inside] = TISSUE
  rng = np.random.default_rng([seed, x0, y0, int(scale * 16)])
  img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)
  sigma = DOT_SIGMA_PX / scale
  if len(points):
    pad = 4.0 * DOT_SIGMA_PX
    sel = ((points[:, 0] > xs[0] - pad) & (points[:, 0] < xs[-1] + pad) &
           (points[:, 1] > ys[0] - pad) & (points[:, 1] < ys[-1] + pad))
    for (px, py), c in zip(points[sel], classes[sel]):
      lx, ly = (px + 0.5) / scale - 0.5 - x0, (py + 0.5) / scale - 0.5 - y0
      r = int(np.ceil(3 * max(sigma, 0.5)))
      ix0, iy0 = max(int(np.floor(lx)) - r, 0), max(int(np.floor(ly)) - r, 0)
      ix1, iy1 = min(int(np.floor(lx)) + r + 2, w), min(int(np.floor(ly)) + r + 2, h)
      if ix1 <= ix0 or iy1 <= iy0:
        continue
      gx = np.arange(ix0, ix1, dtype=np.float32) - lx
      gy = np.arange(iy0, iy1, dtype=np.float32) - ly
      wgt = np.exp(-(gx[None, :] ** 2 + gy[:, None] ** 2) / (2 * max(sigma, 0.5) ** 2))[..., None]
      patch = img[iy0:iy1, ix0:ix1]
      img[iy0:iy1, ix0:ix1] = patch * (1 - 0.9 * wgt) + DOT_COLOURS[c] * 0.9 * wgt
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def write_synthetic_slide(path: str | pathlib.Path, width: int = 2048, height: int = 2048, *, mpp: float | None = 0.5,
                          tissue: bool = True, spacing: float = 24.0, tile: int = 256, levels: int | None = None,
                          compression: str | None = "zlib", seed: int = 0) -> SyntheticSlide:
  """Writes a synthetic pyramidal RGB TIFF (tiled, levels in SubIFDs) and returns its ground truth.

  Args:
    path: output `.tif` file.
    width, height: level-0 size in pixels.
    mpp: level-0 µm/px stored in the resolution tags (unit centimetre); None writes no resolution (readers see no
      mpp).
    tissue: False writes background only (no tissue, no dots).
    spacing: dot grid spacing in level-0 pixels.
    tile: TIFF tile side (multiple of 16).
    levels: pyramid levels (each halves the size); default until the side drops under 2 tiles.
    compression: tifffile compression name ('zlib' keeps dots exact, 'jpeg' is realistic and lossy, None raw).
    seed: dots and noise seed.
  """
  path = pathlib.Path(path)
  ellipse = (width * 0.5, height * 0.5, width * 0.38, height * 0.36) if tissue else (0.0, 0.0, 0.0, 0.0)
  points, classes = make_dots(width, height, ellipse, spacing, seed)
  if levels is None:
    levels = 1
    while max(width, height) / 2 ** levels >= 2 * tile:
      levels += 1

  def tiles(lw: int, lh: int, scale: float) -> Iterator[np.ndarray]:
    for ty in range(0, lh, tile):
      for tx in range(0, lw, tile):
        yield render_region(tx, ty, tile, tile, scale, ellipse, points, classes, seed)

  kw = dict(tile=(tile, tile), photometric="rgb", compression=compression, dtype=np.uint8)
  res = {} if mpp is None else dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
  with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2 ** 31) as tw:
    tw.write(tiles(width, height, 1.0), shape=(height, width, 3), subifds=levels - 1, **res, **kw)
    for lvl in range(1, levels):
      lw, lh = -(-width // 2 ** lvl), -(-height // 2 ** lvl)
      lres = {} if mpp is None else dict(resolution=(1e4 / (mpp * 2 ** lvl),) * 2, resolutionunit="CENTIMETER")
      tw.write(tiles(lw, lh, float(2 ** lvl)), shape=(lh, lw, 3), subfiletype=1, **lres, **kw)
  return SyntheticSlide(path, width, height, mpp, points, classes, ellipse)


class DotPredictor:
  """A fake nucleus detector for synthetic slides: finds dark local minima and classes them by colour.

  Implements the `muse_jax.slide.run` predictor protocol. The work is one jitted function, so sharded batches and
  device placement are exercised exactly as with a real model.

  Args:
    mpp: µm/px the "model" runs at.
    window: tile side in pixels.
    max_points: static number of candidates per tile.
    threshold: minimum darkness (tissue brightness minus grey value) of a dot centre.
    merge_radius_um: seam-merge radius reported to `run`.
    pull_px: moves every point this many px towards the tile centre along x and y (negative: away from it). Mimics a
      model whose answer depends on the context, so that neighbouring tiles place a seam nucleus differently.
  """

  class_names = ("blue_dot", "red_dot")

  def __init__(self, mpp: float = 0.5, window: int = 128, max_points: int = 256, threshold: float = 50.0,
               merge_radius_um: float = 3.0, pull_px: float = 0.0):
    self.mpp = float(mpp)
    self.window = int(window)
    self.merge_radius_um = float(merge_radius_um)
    self.max_points = int(max_points)
    self.threshold = float(threshold)
    self.pull_px = float(pull_px)
    self.calls = 0
    self._fn = jax.jit(self._detect)

  @property
  def fingerprint(self) -> dict[str, float | int]:
    """What determines its answers (the resume check of `muse_jax.slide.run` compares it)."""
    return dict(kind="DotPredictor", mpp=self.mpp, window=self.window, max_points=self.max_points,
                threshold=self.threshold, pull_px=self.pull_px)

  def _detect(self, tiles: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = tiles.astype(jnp.float32)
    dark = 200.0 - x.mean(-1)  # [B, S, S]
    pooled = jax.lax.reduce_window(dark, -jnp.inf, jax.lax.max, (1, 7, 7), (1, 1, 1), "SAME")
    peak = (dark >= pooled) & (dark > self.threshold)
    score = jnp.where(peak, dark, 0.0).reshape(dark.shape[0], -1)
    top, idx = jax.lax.top_k(score, self.max_points)
    s = self.window
    ys, xs = idx // s, idx % s
    red = jnp.take_along_axis(x[..., 0].reshape(x.shape[0], -1), idx, axis=1)
    blue = jnp.take_along_axis(x[..., 2].reshape(x.shape[0], -1), idx, axis=1)
    cls = (red > blue).astype(jnp.int32)
    return jnp.stack([xs, ys], -1).astype(jnp.float32), cls, top

  def predict_tiles(self, tiles) -> list[dict[str, np.ndarray]]:
    """Dots in each tile.

    Args:
      tiles: uint8 [B, S, S, 3] (numpy or a sharded jax.Array), S = `window`.

    Returns:
      B dicts with `points` float32 [K, 2] (x, y) in tile pixels, `classes` int32 [K], `scores` float32 [K] in (0, 1].
    """
    self.calls += 1
    pts, cls, top = jax.device_get(self._fn(tiles))
    if self.pull_px:
      centre = (self.window - 1) / 2
      pts = pts + self.pull_px * np.sign(centre - pts)
    out = []
    for p, c, t in zip(pts, cls, top):
      keep = t > 0
      out.append(dict(points=p[keep], classes=c[keep], scores=np.minimum(t[keep] / 200.0, 1.0).astype(np.float32)))
    return out


def write_random_ndc_checkpoint(path: str | pathlib.Path, variant: str = "tiny", *, window: int = 128,
                                mpp: float = 0.5, class_names: tuple[str, ...] = ("lymphocyte", "tumor", "stromal"),
                                score_threshold: float = 0.0, max_detections: int = 64, batch_size: int = 8,
                                seed: int = 0) -> pathlib.Path:
  """Writes an NDC checkpoint (`muse_jax.ndc.infer` layout) of a randomly initialised model, for tests and benchmarks.

  A random head scores every proposal low, so `score_threshold` defaults to 0 and `max_detections` bounds the
  points per tile (before point NMS).

  Args:
    path: checkpoint directory to create.
    variant: backbone config name in `configs/models.py` ('tiny', 'vit_s16', ...).
    window: tile side the predictor uses (multiple of 16).
    mpp: µm/px the model runs at.
    class_names: class names stored in the checkpoint.
    score_threshold, max_detections, batch_size: inference defaults stored in the checkpoint.
    seed: initialisation seed.
  """
  import ml_collections  # noqa: PLC0415

  from configs import models as model_configs  # noqa: PLC0415
  from muse_jax.ndc import head as head_lib  # noqa: PLC0415
  from muse_jax.ndc import infer as infer_lib  # noqa: PLC0415

  model_cfg = model_configs.get_config(variant)
  head_cfg = ml_collections.ConfigDict(dict(stride=4, hidden_dim=64, num_layers=2, bg_prior=0.9))
  module = head_lib.build_model(model_cfg, head_cfg, len(class_names))
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, window, window, 3), jnp.float32),
                                              train=False))
  # numpy initialisation from the shapes alone: compiling `module.init` costs far more than the model's forward
  rng = np.random.default_rng(seed)

  def init_leaf(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean"):
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(init_leaf, shapes)
  infer_cfg = dict(window=window, batch_size=batch_size, score_threshold=score_threshold,
                   max_detections=max_detections)
  return pathlib.Path(infer_lib.save_predictor(path, model_cfg, head_cfg, class_names, mpp, dict(variables),
                                               infer_cfg=infer_cfg))
