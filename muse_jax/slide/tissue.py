"""Tissue detection on a slide thumbnail, so tiles of background glass are never read or run.

H&E tissue is coloured (pink eosin, purple haematoxylin) while glass, white background and grey scanner padding are not:
the mask thresholds the HSV saturation with Otsu's method, clamped to a safe band so that an all-background slide gives
an empty mask and an all-tissue slide a full one, then cleans it with morphology (closing, opening), fills small holes
and removes components smaller than a minimum area in µm².
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import filters, morphology

SATURATION_BAND = (0.05, 0.15)  # Otsu threshold is clipped into this band (saturation in [0, 1])


def saturation(rgb: np.ndarray) -> np.ndarray:
  """HSV saturation of an RGB image.

  Args:
    rgb: uint8 [H, W, 3].

  Returns:
    float32 [H, W] in [0, 1]; 0 where the pixel is black.
  """
  x = rgb.astype(np.float32)
  mx, mn = x.max(-1), x.min(-1)
  return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def tissue_mask(thumb: np.ndarray, mpp: float, *, min_area_um2: float = 20_000.0, smooth_um: float = 16.0,
                min_value: int = 25) -> np.ndarray:
  """Boolean tissue mask of a thumbnail.

  Args:
    thumb: uint8 [H, W, 3] thumbnail of the whole slide.
    mpp: µm/px of the thumbnail.
    min_area_um2: tissue components (and holes) smaller than this are dropped (filled).
    smooth_um: radius of the closing/opening disk in µm.
    min_value: pixels darker than this grey value (black scanner padding, out-of-focus edges) are never tissue.

  Returns:
    bool [H, W].
  """
  if thumb.ndim != 3 or thumb.shape[-1] != 3 or thumb.dtype != np.uint8:
    raise ValueError(f"thumb: expected uint8 [H, W, 3], got {thumb.dtype} {thumb.shape}")
  sat = saturation(thumb)
  valid = thumb.max(-1) >= min_value
  if sat.size == 0 or float(sat.max()) <= SATURATION_BAND[0]:
    return np.zeros(sat.shape, bool)
  thr = float(filters.threshold_otsu(sat)) if float(sat.min()) < float(sat.max()) else SATURATION_BAND[0]
  thr = float(np.clip(thr, *SATURATION_BAND))
  mask = (sat > thr) & valid
  r = max(int(round(smooth_um / mpp)), 1)
  disk = morphology.disk(r)
  mask = ndimage.binary_closing(np.pad(mask, r), disk)[r:-r, r:-r]
  mask = ndimage.binary_opening(mask, disk)
  min_px = max(int(round(min_area_um2 / mpp ** 2)), 1)
  mask = morphology.remove_small_holes(mask, max_size=min_px)
  mask = morphology.remove_small_objects(mask, max_size=min_px)
  return mask


def tissue_area_mm2(mask: np.ndarray, mpp: float) -> float:
  """Area of a mask in mm², for a mask at `mpp` µm/px."""
  return float(mask.sum()) * (mpp / 1000.0) ** 2
