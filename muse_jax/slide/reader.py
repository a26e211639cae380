"""Whole-slide reading at a requested resolution (µm/px).

Backend choice: **tiffslide** (pinned `tiffslide==3.0.1`, with `tifffile` and `imagecodecs`), not OpenSlide. tiffslide
is a pure `pip install` (no system library such as `libopenslide`, nothing to build), keeps OpenSlide's API
(`level_dimensions`, `level_downsamples`, `read_region`, `properties`), reads Aperio SVS and generic pyramidal TIFF
(levels in SubIFDs or pages, JPEG/JPEG2000/LZW/zlib tiles through imagecodecs), and reports the resolution as
`tiffslide.mpp-x/-y` (from the Aperio `MPP` field or the TIFF resolution tags). Formats only OpenSlide reads (MRXS, VMS)
are out of scope. Plain images (PNG, JPEG, BMP, and TIFFs that tiffslide cannot parse) are read with Pillow as a
degenerate one-level slide held in memory; they need the mpp from the user.

Coordinates: `(x, y)` = (column, row). A region "at mpp m" is given in pixels of a virtual image of the whole slide
resampled to m µm/px. `read_at_mpp` picks the coarsest pyramid level that is still at least as fine as m (within 1%),
reads the covering box there and resamples it with Pillow (antialiased bilinear). Areas outside the slide are white.

Pixel types: 8-bit RGB, RGBA (alpha dropped) and grey are read as they are. Other sample types are converted to 8
bits when their range is known, and `Slide.pixel_note` says how (the CLI prints it, `summary.json` keeps it):
unsigned 16-bit by the bit depth its coarsest level needs (8, 10, 12, 14 or 16 bits: 255 / (2^bits - 1)); float
samples in [0, 1] times 255, float samples in [0, 255] as they are. Anything else (signed integers, 32-bit integers,
float samples outside [0, 255] or NaN, channel counts other than 1, 3 and 4) is refused with `SlideError` naming the
type, rather than read as garbage (a 16-bit slide cast to uint8 has no tissue).
"""
from __future__ import annotations

import math
import pathlib
import threading
import warnings

import numpy as np
from PIL import Image

from muse_jax import cli

MPP_RANGE = (0.05, 20.0)  # µm/px accepted from metadata; outside it the value is treated as absent (e.g. 72 dpi)
PAD_VALUE = 255
_PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class SlideError(cli.UserError):
  """A file that is not a readable slide or image (a user error: one line, exit 2 in the CLIs)."""


class MissingMppError(cli.UserError):
  """A slide whose metadata holds no usable resolution and no mpp was given (a user error)."""


def pixel_conversion(dtype: np.dtype, sample: np.ndarray, what: str) -> tuple[float, str | None]:
  """How samples of `dtype` become uint8: `(scale, note)` with uint8 = round(value * scale), note None for uint8.

  Args:
    dtype: the sample type of the slide or image.
    sample: some of its pixels (the coarsest level), to find the range actually used.
    what: the file, for messages.

  Raises:
    SlideError: a type or range that cannot be converted without guessing.
  """
  dtype = np.dtype(dtype)
  if dtype == np.uint8:
    return 1.0, None
  if dtype == np.uint16:
    top = int(sample.max()) if sample.size else 0
    bits = next(b for b in (8, 10, 12, 14, 16) if top < 2 ** b)
    scale = 255.0 / (2 ** bits - 1)
    how = "used as they are" if bits == 8 else f"scaled to 8 bits by 255/{2 ** bits - 1} ({bits}-bit range)"
    return scale, f"{what}: 16-bit samples (max {top} in the coarsest level), {how}"
  if dtype.kind == "f":
    sample = sample.astype(np.float64)
    if sample.size and not np.isfinite(sample).all():
      raise SlideError(f"{what}: float samples with NaN or inf; expected 8-bit RGB (or float in [0, 1] or [0, 255])")
    lo, hi = (float(sample.min()), float(sample.max())) if sample.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1.0:
      return 255.0, f"{what}: {dtype.name} samples in [{lo:.3g}, {hi:.3g}], scaled to 8 bits by 255"
    if lo >= 0 and hi <= 255.0:
      return 1.0, f"{what}: {dtype.name} samples in [{lo:.3g}, {hi:.3g}], used as 8-bit values"
    raise SlideError(f"{what}: {dtype.name} samples in [{lo:.3g}, {hi:.3g}] have no known 8-bit mapping; expected "
                     "8-bit RGB, or float in [0, 1] or [0, 255]; convert the slide to 8-bit RGB")
  raise SlideError(f"{what}: {dtype.name} samples are not supported; expected 8-bit RGB (16-bit unsigned and float "
                   "in [0, 1] or [0, 255] are converted); convert the slide to 8-bit RGB")


def _to_uint8(arr: np.ndarray, scale: float) -> np.ndarray:
  if arr.dtype == np.uint8:
    return arr
  return np.clip(np.rint(arr.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def _to_rgb(arr: np.ndarray, what: str) -> np.ndarray:
  """[H, W] or [H, W, 1 | 3 | 4] -> [H, W, 3] (grey repeated, alpha dropped)."""
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise SlideError(f"{what}: pixels of shape {arr.shape[2:] or '()'} per position; expected grey, RGB or RGBA")
  if arr.shape[-1] == 1:
    return np.repeat(arr, 3, -1)
  return arr[..., :3]


class Slide:
  """A read-only slide: level-0 size, mpp and region reads at any resolution.

  Thread-safe: each thread that reads gets its own tiffslide handle.

  Attributes:
    path: the file.
    mpp: level-0 µm/px (from metadata, or the user's value).
    mpp_source: 'metadata' or 'user'.
    dimensions: level-0 (width, height) in pixels.
    level_dimensions: (width, height) per level.
    level_downsamples: level-0 pixels per level pixel, per level.
    vendor: tiffslide's vendor string ('aperio', 'generic-tiff', ...) or 'image' for Pillow images.
  """

  def __init__(self, path: str | pathlib.Path, mpp: float | None = None):
    self.path = pathlib.Path(path)
    if self.path.is_dir():
      raise SlideError("is a directory, not a slide file", str(self.path),
                       "expected an SVS / pyramidal TIFF file or a PNG/JPEG/TIFF image (folder formats such as "
                       "MRXS are not supported)")
    if not self.path.is_file():
      raise FileNotFoundError(f"slide file {str(self.path)!r} does not exist")
    self._local = threading.local()
    self._handles: list = []
    self._lock = threading.Lock()
    self._array: np.ndarray | None = None
    self._scale = 1.0
    self.pixel_note: str | None = None
    meta_mpp = None
    try:
      ts = self._open_tiffslide()
    except Exception as tiff_err:  # not a TIFF tiffslide understands: try a plain image
      ts = None
      self._array = self._open_plain(tiff_err)
    if ts is not None:
      self.vendor = str(ts.properties.get("tiffslide.vendor") or "generic-tiff")
      self.level_dimensions = tuple((int(w), int(h)) for w, h in ts.level_dimensions)
      self.level_downsamples = tuple(float(d) for d in ts.level_downsamples)
      series = ts.ts_tifffile.series[int(ts.properties.get("tiffslide.series-index") or 0)]
      if np.dtype(series.dtype) != np.uint8:
        coarse = np.asarray(series.levels[-1].asarray())
        self._scale, self.pixel_note = pixel_conversion(series.dtype, coarse, str(self.path))
      mx, my = ts.properties.get("tiffslide.mpp-x"), ts.properties.get("tiffslide.mpp-y")
      if mx is not None:
        mx = float(mx)
        my = float(my) if my is not None else mx
        if abs(mx - my) > 0.02 * mx:
          warnings.warn(f"{self.path}: non-square pixels (mpp-x {mx}, mpp-y {my}); using their mean")
        meta_mpp = 0.5 * (mx + my)
        if not MPP_RANGE[0] <= meta_mpp <= MPP_RANGE[1]:
          meta_mpp = None
    else:
      h, w = self._array.shape[:2]
      self.vendor = "image"
      self.level_dimensions = ((w, h),)
      self.level_downsamples = (1.0,)
    self.dimensions = self.level_dimensions[0]
    if mpp is not None:
      if not (isinstance(mpp, (int, float)) and not isinstance(mpp, bool) and math.isfinite(float(mpp))
              and MPP_RANGE[0] <= float(mpp) <= MPP_RANGE[1]):
        raise cli.UserError(f"µm/px must be in [{MPP_RANGE[0]}, {MPP_RANGE[1]}]", "--mpp",
                            f"got {mpp!r} for {self.path} (0.25 at 40x, 0.5 at 20x)")
      self.mpp, self.mpp_source = float(mpp), "user"
    elif meta_mpp is not None:
      self.mpp, self.mpp_source = meta_mpp, "metadata"
    else:
      raise MissingMppError(
          f"{self.path}: no resolution in the metadata (no Aperio MPP, no usable TIFF resolution tags; "
          f"vendor {self.vendor!r}). Pass the level-0 µm/px yourself: --mpp 0.25 for 40x, --mpp 0.5 for 20x "
          f"(`mpp=` in Python).")

  def _open_tiffslide(self):
    import tiffslide  # noqa: PLC0415
    if self.path.suffix.lower() in _PLAIN_SUFFIXES:
      raise SlideError("plain image suffix")
    ts = getattr(self._local, "ts", None)
    if ts is None:
      ts = tiffslide.TiffSlide(self.path)
      if ts.properties.get("tiffslide.series-axes") not in ("YXS", "YX", "CYX"):
        raise SlideError(f"unsupported axes {ts.properties.get('tiffslide.series-axes')}")
      self._local.ts = ts
      with self._lock:
        self._handles.append(ts)
    return ts

  def _open_plain(self, tiff_err: Exception) -> np.ndarray:
    try:
      with Image.open(self.path) as im:
        if im.mode in ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "YCbCr"):
          return np.asarray(im.convert("RGB"))
        arr = np.asarray(im)
    except Exception as err:
      raise SlideError(
          f"{self.path} is not a slide or image we can read: tiffslide said {type(tiff_err).__name__}: {tiff_err}; "
          f"Pillow said {type(err).__name__}: {err}. Expected an SVS / pyramidal TIFF, or a PNG/JPEG/TIFF image."
      ) from err
    if arr.dtype.byteorder == ">":
      arr = arr.astype(arr.dtype.newbyteorder("="))
    self._scale, self.pixel_note = pixel_conversion(arr.dtype, arr, str(self.path))
    return _to_rgb(_to_uint8(arr, self._scale), str(self.path))

  def __enter__(self) -> "Slide":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    with self._lock:
      handles, self._handles = self._handles, []
    for ts in handles:
      ts.close()
    self._local = threading.local()

  def level_mpp(self, level: int) -> float:
    """µm/px of a pyramid level."""
    return self.mpp * self.level_downsamples[level]

  def best_level(self, target_mpp: float) -> int:
    """The coarsest level whose mpp is at most `target_mpp` (+1%); level 0 when the target is finer than the slide."""
    best = 0
    for lvl in range(len(self.level_downsamples)):
      if self.level_mpp(lvl) <= target_mpp * 1.01:
        best = lvl if self.level_downsamples[lvl] >= self.level_downsamples[best] else best
    return best

  def size_at_mpp(self, mpp: float) -> tuple[int, int]:
    """(width, height) of the whole slide resampled to `mpp` µm/px (rounded up)."""
    f = self.mpp / mpp
    return math.ceil(self.dimensions[0] * f - 1e-6), math.ceil(self.dimensions[1] * f - 1e-6)

  def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
    """Reads pixels of one level; white outside the level.

    Args:
      level: pyramid level.
      x, y, w, h: box in pixels of that level (any integers, may leave the image).

    Returns:
      uint8 [h, w, 3].
    """
    lw, lh = self.level_dimensions[level]
    out = np.full((h, w, 3), PAD_VALUE, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
    if x1 <= x0 or y1 <= y0:
      return out
    if self._array is not None:
      out[y0 - y:y1 - y, x0 - x:x1 - x] = self._array[y0:y1, x0:x1]
      return out
    ds = self.level_downsamples[level]
    ts = self._open_tiffslide()
    loc = (int(math.ceil(x0 * ds)), int(math.ceil(y0 * ds)))
    arr = np.asarray(ts.read_region(loc, level, (x1 - x0, y1 - y0), as_array=True, padding=False))
    arr = _to_rgb(_to_uint8(arr, self._scale), str(self.path))
    out[y0 - y:y0 - y + arr.shape[0], x0 - x:x0 - x + arr.shape[1]] = arr
    return out

  def read_at_mpp(self, x: float, y: float, w: int, h: int, mpp: float) -> np.ndarray:
    """Reads a region of the slide resampled to `mpp`.

    Args:
      x, y: top-left corner in pixels at `mpp`.
      w, h: output size in pixels at `mpp`.
      mpp: µm/px of the output.

    Returns:
      uint8 [h, w, 3]; white outside the slide.
    """
    level = self.best_level(mpp)
    f = mpp / self.level_mpp(level)  # level pixels per output pixel
    fx0, fy0, fx1, fy1 = x * f, y * f, (x + w) * f, (y + h) * f
    if abs(f - 1.0) < 1e-6 and float(x).is_integer() and float(y).is_integer():
      return self.read_level(level, int(x), int(y), w, h)
    ix0, iy0 = math.floor(fx0) - 1, math.floor(fy0) - 1
    ix1, iy1 = math.ceil(fx1) + 1, math.ceil(fy1) + 1
    box = self.read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)
    im = Image.fromarray(box).resize((w, h), Image.Resampling.BILINEAR,
                                     box=(fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0))
    return np.asarray(im)

  def thumbnail(self, mpp: float = 8.0, block: int = 512) -> np.ndarray:
    """The whole slide at `mpp` (coarse), assembled block by block so memory stays small.

    Args:
      mpp: µm/px of the thumbnail (coarser than level 0).
      block: block side in thumbnail pixels.

    Returns:
      uint8 [H, W, 3], (W, H) = `size_at_mpp(mpp)`.
    """
    tw, th = self.size_at_mpp(mpp)
    out = np.empty((th, tw, 3), np.uint8)
    for by in range(0, th, block):
      for bx in range(0, tw, block):
        bw, bh = min(block, tw - bx), min(block, th - by)
        out[by:by + bh, bx:bx + bw] = self.read_at_mpp(bx, by, bw, bh, mpp)
    return out


def open_slide(path: str | pathlib.Path, mpp: float | None = None) -> Slide:
  """Opens a slide (SVS, pyramidal or plain TIFF) or a plain image as a one-level slide.

  Args:
    path: the file.
    mpp: level-0 µm/px; overrides the metadata. Required when the metadata has none.

  Raises:
    FileNotFoundError: no such file.
    SlideError: the file is neither a slide nor an image.
    MissingMppError: no mpp in the metadata and none given.
  """
  return Slide(path, mpp)
