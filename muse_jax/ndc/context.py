"""Real context around labelled tiles for large-FoV NDC fine-tuning (MUSE_SPEC §4).

MUSE fine-tunes on fields much larger than the labelled tiles; the pixels around a tile should be the tissue that
really surrounds it on the slide. When the user has the slides (or larger context images), a *context manifest*
says where each labelled tile lies in them, and the LFoV sampler (`lfov.make_lfov_sample`) cuts the field from the
context instead of padding the tile.

Manifest: a CSV file with a header row and the columns

  name,context,x,y[,mpp]

- `name`: the tile's sample name (`readers.Sample.name`, e.g. the image file name without its extension);
- `context`: a slide (`.svs`, `.tif`, ... anything `muse_jax.slide.reader.open_slide` reads) or a plain image
  (PNG/JPEG/TIFF), absolute or relative to the manifest's folder;
- `x`, `y`: the tile's top-left corner in level-0 pixels of the context;
- `mpp` (optional): µm/px of the context's level 0. Needed for plain images without metadata; when empty, the
  slide's own mpp, else the tile's mpp.

Tiles without a manifest row fall back to padding (`config.lfov.pad_mode`); the driver logs how many. Each tile is
checked once against the context at the given position (mean absolute difference of the RGB values after
resampling both to the working mpp); a larger difference than `tolerance` means a wrong offset, wrong file or wrong
mpp and raises a `ValueError` naming the manifest row. Crops are cached in memory up to `cache_mb`.

Config (`configs/finetune_ndc.py`): `data.context` (manifest path or None), `data.context_tolerance`,
`data.context_cache_mb`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

COLUMNS = ("name", "context", "x", "y")


@dataclasses.dataclass(frozen=True)
class ContextEntry:
  """Where one tile lies in its context: `path`, level-0 top-left `(x, y)` px, level-0 `mpp` (None: unknown)."""
  name: str
  path: str
  x: float
  y: float
  mpp: float | None
  where: str  # "manifest.csv:LINE", for error messages


def read_manifest(path: str | os.PathLike) -> dict[str, ContextEntry]:
  """Reads a context manifest (see the module docstring) into `{tile name: ContextEntry}`.

  Raises:
    FileNotFoundError: the manifest does not exist.
    ValueError: a missing column, an unparsable number, a negative position or mpp, a duplicate name, or a context
      file that does not exist; the message names the file and line.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"context manifest {path!r} does not exist")
  base = os.path.dirname(os.path.abspath(path))
  out: dict[str, ContextEntry] = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
      raise ValueError(f"{path}: header {header} lacks the column(s) {missing}; expected name,context,x,y[,mpp]")
    for i, row in enumerate(reader, start=2):
      row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
      where = f"{path}:{i}"
      if not any(row.values()):
        continue
      name = row["name"]
      if not name:
        raise ValueError(f"{where}: empty tile name")
      if name in out:
        raise ValueError(f"{where}: tile {name!r} is listed twice (first at {out[name].where})")
      try:
        x, y = float(row["x"]), float(row["y"])
        mpp = float(row["mpp"]) if row.get("mpp") else None
      except ValueError as e:
        raise ValueError(f"{where}: x, y and mpp must be numbers, got x={row['x']!r} y={row['y']!r} "
                         f"mpp={row.get('mpp')!r}") from e
      if not (np.isfinite(x) and np.isfinite(y)) or x < 0 or y < 0:
        raise ValueError(f"{where}: tile position ({x}, {y}) must be finite and non-negative")
      if mpp is not None and not (np.isfinite(mpp) and 0.05 <= mpp <= 50.0):
        raise ValueError(f"{where}: mpp {mpp} is outside [0.05, 50] µm/px")
      ctx = row["context"]
      if not ctx:
        raise ValueError(f"{where}: empty context path")
      ctx = ctx if os.path.isabs(ctx) else os.path.join(base, ctx)
      if not os.path.isfile(ctx):
        raise ValueError(f"{where}: context file {ctx!r} does not exist")
      out[name] = ContextEntry(name, ctx, x, y, mpp, where)
  return out


class ContextProvider:
  """Cuts context crops around labelled tiles at the working mpp.

  Args:
    entries: `read_manifest` output.
    mpp: the model's working µm/px (the tiles have already been resampled to it).
    margin: context pixels (at `mpp`) kept on every side of the tile; the LFoV field side is enough.
    tolerance: largest accepted mean absolute RGB difference between a tile and the context under it.
    cache_mb: in-memory crop cache budget (least recently used crops are dropped).
  """

  def __init__(self, entries: dict[str, ContextEntry], mpp: float, margin: int, *, tolerance: float = 25.0,
               cache_mb: float = 2048.0):
    self.entries = dict(entries)
    self.mpp = float(mpp)
    self.margin = int(margin)
    self.tolerance = float(tolerance)
    self.cache_bytes = int(cache_mb * 2**20)
    self._slides: dict[str, Any] = {}
    self._cache: collections.OrderedDict[str, tuple[np.ndarray, tuple[int, int]]] = collections.OrderedDict()
    self._cached = 0
    self._checked: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.entries

  def _slide(self, e: ContextEntry, tile_mpp: float):
    from muse_jax.slide import reader  # pylint: disable=import-outside-toplevel

    key = e.path
    if key not in self._slides:
      try:
        self._slides[key] = reader.open_slide(e.path, mpp=e.mpp)
      except reader.MissingMppError:
        self._slides[key] = reader.open_slide(e.path, mpp=tile_mpp)  # a plain image at the tile's mpp
    return self._slides[key]

  def get(self, name: str, tile: np.ndarray, tile_mpp: float | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """The context crop around tile `name` and the tile's top-left in it.

    Args:
      name: the tile's sample name (must be in the manifest).
      tile: the tile as the model sees it, uint8 [H, W, 3] at `self.mpp` (used for the position check).
      tile_mpp: µm/px of the tile as stored (the fallback context mpp for plain images); default `self.mpp`.

    Returns:
      `(context uint8 [H + 2m, W + 2m, 3], (m, m))` with m = `margin`; white beyond the slide.
    """
    if name in self._cache:
      self._cache.move_to_end(name)
      return self._cache[name]
    e = self.entries[name]
    slide = self._slide(e, float(tile_mpp or self.mpp))
    H, W = tile.shape[:2]
    m = self.margin
    f = slide.mpp / self.mpp  # working px per context level-0 px
    x, y = e.x * f, e.y * f
    crop = slide.read_at_mpp(x - m, y - m, W + 2 * m, H + 2 * m, self.mpp)
    if name not in self._checked:
      under = crop[m:m + H, m:m + W].astype(np.float32)
      diff = float(np.mean(np.abs(under - tile.astype(np.float32))))
      if diff > self.tolerance:
        raise ValueError(f"{e.where}: tile {name!r} does not match its context {e.path!r} at ({e.x:g}, {e.y:g}) "
                         f"(mean |difference| {diff:.1f} > tolerance {self.tolerance:g} grey levels); check the "
                         f"position, the file and the mpp (context {slide.mpp:g} µm/px, working {self.mpp:g})")
      self._checked.add(name)
    out = (np.ascontiguousarray(crop), (m, m))
    self._cache[name] = out
    self._cached += crop.nbytes
    while self._cached > self.cache_bytes and len(self._cache) > 1:
      _, (old, _) = self._cache.popitem(last=False)
      self._cached -= old.nbytes
    return out

  def close(self) -> None:
    for s in self._slides.values():
      s.close()
    self._slides.clear()


def from_config(data_cfg: Any, margin: int, sample_names: list[str] | None = None) -> ContextProvider | None:
  """The provider named by `data_cfg.context` (None when unset). Logs how many `sample_names` have a context."""
  path = data_cfg.get("context", None)
  if not path:
    return None
  entries = read_manifest(path)
  prov = ContextProvider(entries, float(data_cfg.mpp), margin, tolerance=float(data_cfg.get("context_tolerance", 25.0)),
                         cache_mb=float(data_cfg.get("context_cache_mb", 2048.0)))
  if sample_names is not None:
    have = sum(n in prov for n in sample_names)
    if have == 0:
      raise ValueError(f"config.data.context: none of the {len(sample_names)} training tiles is in {path} (first "
                       f"names: {sample_names[:3]} vs manifest {list(entries)[:3]})")
    log.info("context: %d of %d training tiles have real context from %s; the rest are padded", have,
             len(sample_names), path)
  return prov
