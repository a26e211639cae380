"""Whole-slide nucleus detection and classification from the command line.

    python -m muse_jax.predict_slide --checkpoint runs/ndc/export --slide slide.svs --out out/slide1 \
        [--mpp 0.25] [--batch 32] [--overlap 64] [--readers 8] [--overwrite] [--annotations]

Writes `nuclei.geojson` (QuPath: File > Import objects), `nuclei.csv`, `summary.json` (counts and densities per mm² of
tissue), `overlay.png` and `tissue.png` into `--out` (coordinates in level-0 pixels of the slide). An interrupted run
resumes when started again with the same arguments. The work is done by `muse_jax.slide.run.run`.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m muse_jax.predict_slide", description=__doc__.split("\n")[0])
  p.add_argument("--checkpoint", required=True, help="NDC checkpoint directory (export/ of a fine-tuning run)")
  p.add_argument("--slide", required=True, help="slide file: Aperio SVS, pyramidal/plain TIFF, or PNG/JPEG")
  p.add_argument("--out", required=True, help="output directory (also holds parts/ for resuming)")
  p.add_argument("--mpp", type=float, default=None,
                 help="level-0 µm/px of the slide; required when its metadata has none (0.25 at 40x, 0.5 at 20x)")
  p.add_argument("--batch", type=int, default=16, help="tiles per inference call (rounded to the device count)")
  p.add_argument("--overlap", type=int, default=64, help="tile overlap in px at the model's mpp (even)")
  p.add_argument("--readers", type=int, default=4, help="tile-reading threads")
  p.add_argument("--merge-radius-um", type=float, default=None,
                 help="seam-merge radius in µm (default: the checkpoint's NMS radius)")
  p.add_argument("--annotations", action="store_true",
                 help="GeoJSON objectType 'annotation' (editable in QuPath) instead of 'detection'")
  p.add_argument("--overwrite", action="store_true", help="discard partial results of a run with other settings")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from muse_jax.ndc.infer import Predictor  # noqa: PLC0415
  from muse_jax.slide import MissingMppError, SlideError  # noqa: PLC0415
  from muse_jax.slide import run as slide_run  # noqa: PLC0415

  predictor = Predictor.from_checkpoint(args.checkpoint)
  cfg = slide_run.SlideRunConfig(mpp=args.mpp, batch_size=args.batch, overlap=args.overlap, num_readers=args.readers,
                                 merge_radius_um=args.merge_radius_um,
                                 object_type="annotation" if args.annotations else "detection",
                                 progress=not args.no_progress, overwrite=args.overwrite)
  try:
    summary = slide_run.run(predictor, args.slide, args.out, cfg)
  except (FileNotFoundError, SlideError, MissingMppError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  keys = ("nuclei", "counts", "tissue_area_mm2", "total_density_per_mm2", "tiles_tissue", "seconds", "s_per_mm2")
  print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
