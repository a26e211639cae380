"""Evaluation tiles (spec §5.1): fixed 224 px valid windows at a target mpp, with context around them.

For each labelled sample and a target mpp:
1. resample the whole sample to the target mpp (bicubic, PIL; 0.5 -> 0.25 µm/px is a 2x *upsampling* of the
   BRCA-M2C tiles, "pseudo-40x": no extra detail, so never compare it with 40x numbers from real slides);
2. cut the annotated area into non-overlapping `valid` px windows on a grid starting at (0, 0) (MUSE's grid:
   `ceil(W / valid) x ceil(H / valid)` windows; the last row/column runs past the tile edge);
3. around each window, cut a centred image of `size` px (`size >= valid`); where it runs past the tile, fill with
   `pad_mode` ('reflect' by default, 'constant' = white). MUSE takes this context from the whole-slide image; we
   only have the tile, so padded context is a *substitute* for slide context (recorded in each tile's `context`);
4. keep the nuclei whose (resampled) position falls in the valid window (each nucleus in exactly one window);
   windows without nuclei are skipped.

Coordinates: integer = pixel centre; resampling by factor s maps x -> (x + 0.5) * s - 0.5.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from muse_jax.data.readers import Sample


def resample(image: np.ndarray, coords: np.ndarray, scale: float,
             resample_filter: int = Image.BICUBIC) -> tuple[np.ndarray, np.ndarray]:
  """Resizes `image` [H,W,3] uint8 by `scale` (output side = round(side * scale)) and maps `coords` [N,2] with it."""
  if scale == 1.0:
    return image, np.asarray(coords, np.float32)
  h, w = image.shape[:2]
  nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
  out = np.asarray(Image.fromarray(image).resize((nw, nh), resample_filter))
  s = np.array([nw / w, nh / h], np.float32)
  return out, ((np.asarray(coords, np.float32) + 0.5) * s - 0.5).astype(np.float32)


def pad_crop(image: np.ndarray, x0: int, y0: int, size: int, pad_mode: str = 'reflect') -> np.ndarray:
  """Crops `[y0:y0+size, x0:x0+size]` from `image`, padding where the window leaves the image.

  `pad_mode`: 'reflect' (numpy 'reflect', repeated for large pads) or 'constant' (white, 255).
  """
  h, w = image.shape[:2]
  pl, pt = max(0, -x0), max(0, -y0)
  pr, pb = max(0, x0 + size - w), max(0, y0 + size - h)
  crop = image[max(0, y0):min(h, y0 + size), max(0, x0):min(w, x0 + size)]
  if pl or pt or pr or pb:
    if pad_mode == 'constant':
      crop = np.pad(crop, ((pt, pb), (pl, pr), (0, 0)), mode='constant', constant_values=255)
    elif pad_mode == 'reflect':
      crop = np.pad(crop, ((pt, pb), (pl, pr), (0, 0)), mode='reflect' if min(crop.shape[:2]) > 1 else 'edge')
    else:
      raise ValueError(f'pad_mode {pad_mode!r}: expected "reflect" or "constant".')
  return np.ascontiguousarray(crop)


def make_eval_tiles(samples: Sequence[Sample], *, target_mpp: float = 0.5, size: int = 224, valid: int = 224,
                    pad_mode: str = 'reflect') -> list[dict]:
  """Cuts evaluation tiles `mpp_{target_mpp}-size_{size}-valid_{valid}` from labelled samples.

  Args:
    samples: labelled `Sample`s (any mpp).
    target_mpp: output resolution, µm/px.
    size: output image side, px (224, 512, 1024); must be >= `valid`.
    valid: side of the labelled central window, px.
    pad_mode: how context beyond the tile is filled: 'reflect' or 'constant' (white).

  Returns:
    One dict per non-empty window: `image` uint8 [size,size,3]; `coords` float32 [N,2] in that image's pixels
    (all inside the central valid window); `classes` int32 [N]; `name` (`<sample>_r<i>_c<j>`); `split`; `mpp`;
    `valid_box` (x0, y0, x1, y1) of the valid window in the image; `context` ('tile' when no padding was needed,
    else 'tile+<pad_mode>-pad (substitute for slide context)'); `resampled` ('none', 'up' or 'down').
  """
  if size < valid:
    raise ValueError(f'size={size} must be >= valid={valid}.')
  margin = (size - valid) // 2
  tiles = []
  for smp in samples:
    scale = smp.mpp / target_mpp
    image, coords = resample(smp.image, smp.coords, scale)
    h, w = image.shape[:2]
    # Window index of each nucleus (nearest pixel), so each nucleus lands in exactly one window.
    pix = np.floor(coords + 0.5).astype(np.int64)
    pix[:, 0] = np.clip(pix[:, 0], 0, w - 1)
    pix[:, 1] = np.clip(pix[:, 1], 0, h - 1)
    col, row = pix[:, 0] // valid, pix[:, 1] // valid
    resampled = 'none' if math.isclose(scale, 1.0) else ('up' if scale > 1 else 'down')
    for i in range(math.ceil(h / valid)):
      for j in range(math.ceil(w / valid)):
        sel = (row == i) & (col == j)
        if not sel.any():
          continue
        vx0, vy0 = j * valid, i * valid
        x0, y0 = vx0 - margin, vy0 - margin
        padded = x0 < 0 or y0 < 0 or x0 + size > w or y0 + size > h
        tiles.append({
            'image': pad_crop(image, x0, y0, size, pad_mode),
            'coords': (coords[sel] - np.array([x0, y0], np.float32)).astype(np.float32),
            'classes': smp.classes[sel].astype(np.int32),
            'name': f'{smp.name}_r{i}_c{j}',
            'split': smp.split,
            'mpp': float(target_mpp),
            'valid_box': (margin, margin, margin + valid, margin + valid),
            'context': f'tile+{pad_mode}-pad (substitute for slide context)' if padded else 'tile',
            'resampled': resampled,
        })
  return tiles
