"""Whole-slide inference: slide reading (tiffslide), tissue masks, tile grids, tiled sharded inference and exports.

Entry points: `open_slide(path, mpp=None)`, `run(predictor, slide_path, out_dir, SlideRunConfig(...))`, the CLI
`python -m muse_jax.predict_slide`, and `cmu_small_region_path()` (a real Aperio slide bundled for tests and demos).
"""
from __future__ import annotations

import pathlib

from muse_jax.slide.reader import MissingMppError, Slide, SlideError, open_slide

__all__ = ["MissingMppError", "Slide", "SlideError", "cmu_small_region_path", "open_slide"]


def cmu_small_region_path() -> pathlib.Path:
  """The bundled CMU-1-Small-Region Aperio SVS (2220 x 2967 px, 0.499 µm/px, CC0; see its README)."""
  return (pathlib.Path(__file__).resolve().parent.parent / "data" / "sample" / "CMU-1-Small-Region"
          / "cmu_small_region.svs")
