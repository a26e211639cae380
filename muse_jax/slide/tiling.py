"""The tile grid of a slide at the model's resolution, with overlap and core-region ownership.

All coordinates here are pixels of the slide resampled to the model mpp ("model pixels"). Tiles are `tile` px squares
on a stride `s = tile - overlap`: tile (ix, iy) covers `[ix*s, ix*s + tile) x [iy*s, iy*s + tile)`. The *cores* of the
tiles partition the plane: along x, tile ix owns `[ix*s + overlap/2, (ix+1)*s + overlap/2)`, the first tile's core
starting at -inf and the last one's ending at +inf (same along y). Every core lies inside its tile with a margin of
`overlap/2` px of context on each inner side, so a nucleus is kept only by the tile that owns its position: each
nucleus once, with context on every side. A seam pass (`muse_jax.slide.run`) then merges the rare pairs that two
neighbours placed on either side of a core border: `run` keeps, per tile, the points inside its core grown by the merge
radius r, and a k-d tree merges points of different tiles within r of each other near the core borders (the only points
that can be duplicated), so a nucleus that two tiles place a little apart, on either side of the border, is still
kept once.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """A regular grid of overlapping tiles over a `width` x `height` image (model pixels).

  Attributes:
    width, height: image size in model pixels.
    tile: tile side in pixels.
    overlap: pixels shared by neighbouring tiles (even, < tile).
    nx, ny: tiles per row and per column.
  """
  width: int
  height: int
  tile: int
  overlap: int
  nx: int
  ny: int

  @property
  def stride(self) -> int:
    return self.tile - self.overlap

  @property
  def num_tiles(self) -> int:
    return self.nx * self.ny

  def origin(self, index: np.ndarray | int) -> np.ndarray:
    """Top-left corners (x, y) of tiles given by flat index `iy * nx + ix`; int64 [..., 2]."""
    index = np.asarray(index)
    return np.stack([(index % self.nx) * self.stride, (index // self.nx) * self.stride], -1).astype(np.int64)

  def core(self, index: int) -> tuple[float, float, float, float]:
    """Core region (x0, y0, x1, y1) of a tile in model pixels (±inf at the image borders)."""
    ix, iy = index % self.nx, index // self.nx
    h = self.overlap / 2
    x0 = -math.inf if ix == 0 else ix * self.stride + h
    y0 = -math.inf if iy == 0 else iy * self.stride + h
    x1 = math.inf if ix == self.nx - 1 else (ix + 1) * self.stride + h
    y1 = math.inf if iy == self.ny - 1 else (iy + 1) * self.stride + h
    return x0, y0, x1, y1

  def owner(self, xy: np.ndarray) -> np.ndarray:
    """Flat index of the tile whose core holds each point.

    Args:
      xy: float [..., 2] (x, y) in model pixels.

    Returns:
      int64 [...].
    """
    xy = np.asarray(xy, np.float64)
    ix = np.clip(np.floor((xy[..., 0] - self.overlap / 2) / self.stride), 0, self.nx - 1).astype(np.int64)
    iy = np.clip(np.floor((xy[..., 1] - self.overlap / 2) / self.stride), 0, self.ny - 1).astype(np.int64)
    return iy * self.nx + ix

  def in_core(self, index: int, xy: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Whether points lie in a tile's core grown by `margin` px on every inner side (shrunk if negative).

    Args:
      index: flat tile index.
      xy: float [K, 2] (x, y) model pixels.
      margin: px added to each finite core border.

    Returns:
      bool [K].
    """
    x0, y0, x1, y1 = self.core(index)
    xy = np.asarray(xy, np.float64)
    x, y = xy[..., 0], xy[..., 1]
    return (x >= x0 - margin) & (x < x1 + margin) & (y >= y0 - margin) & (y < y1 + margin)


def make_grid(width: int, height: int, tile: int, overlap: int) -> TileGrid:
  """The tile grid covering a `width` x `height` image (model pixels); the last row/column may pass the border.

  Raises:
    ValueError: bad tile/overlap.
  """
  if tile <= 0 or overlap < 0 or overlap >= tile or overlap % 2:
    raise ValueError(f"tile={tile}, overlap={overlap}: expected 0 <= overlap < tile with an even overlap")
  if width <= 0 or height <= 0:
    raise ValueError(f"image size {width}x{height}: expected positive")
  s = tile - overlap
  nx = max(1, math.ceil((width - overlap) / s))
  ny = max(1, math.ceil((height - overlap) / s))
  return TileGrid(int(width), int(height), int(tile), int(overlap), nx, ny)


def tissue_tiles(grid: TileGrid, mask: np.ndarray, mask_scale: float) -> np.ndarray:
  """Flat indices of the tiles whose core touches tissue.

  Args:
    grid: the tile grid.
    mask: bool [h, w] tissue mask of the whole slide.
    mask_scale: mask pixels per model pixel (model_mpp / mask_mpp, < 1 for a thumbnail).

  Returns:
    int64 [T] sorted flat indices (row-major, so neighbouring tiles are read together).
  """
  h, w = mask.shape
  integral = np.zeros((h + 1, w + 1), np.int64)
  integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1)
  s, half = grid.stride, grid.overlap / 2
  # core bounds along each axis (the outer cores end at the tile's own edge)

  def bounds(n: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(n)
    lo = np.where(i == 0, 0.0, i * s + half)
    hi = np.where(i == n - 1, np.maximum((n - 1) * s + grid.tile, length), (i + 1) * s + half)
    lo = np.clip(np.floor(lo * mask_scale) - 1, 0, None).astype(np.int64)
    hi = np.ceil(hi * mask_scale + 1).astype(np.int64)
    return lo, hi

  x0, x1 = bounds(grid.nx, grid.width)
  y0, y1 = bounds(grid.ny, grid.height)
  x0, x1 = np.clip(x0, 0, w), np.clip(x1, 0, w)  # one mask pixel of slack on each side, for rounding
  y0, y1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
  total = (integral[y1[:, None], x1[None, :]] - integral[y0[:, None], x1[None, :]]
           - integral[y1[:, None], x0[None, :]] + integral[y0[:, None], x0[None, :]])
  return np.nonzero(total.ravel() > 0)[0].astype(np.int64)
