"""Whole-slide nucleus detection and classification from the command line.

    python -m muse_jax.predict_slide --checkpoint runs/ndc/export --slide slide.svs --out out/slide1 \
        [--mpp 0.25] [--batch 32] [--overlap 64] [--readers 8] [--score-threshold T] [--restart] [--annotations]

Writes `nuclei.geojson` (QuPath: File > Import objects), `nuclei.csv`, `summary.json` (counts and densities per mm² of
tissue), `overlay.png` and `tissue.png` into `--out` (coordinates in level-0 pixels of the slide). The work is done by
`muse_jax.slide.run.run`.

Resume: an interrupted run resumes when started again into the same `--out`. `--out/parts/meta.json` records what
determines the result (slide, mpp, checkpoint identity by content = SHA-256 of its variables, score threshold, NMS
and merge radii, tile and overlap, tissue-mask settings, package version); a rerun where any of them differs is
refused with one line naming each difference (exit 2). `--restart` discards the partial results and starts over.
Every output is written under a temporary name and renamed; `summary.json` is removed before the outputs change and
written last, so a `summary.json` with `"complete": true` always describes the files beside it.

Score threshold: `--score-threshold T`, else the checkpoint's (chosen on val, see `python -m muse_jax.ndc.infer`),
else its inference default, else 0.5; the one used and its source are printed (stderr) and kept in `summary.json`.

Pixel types: 16-bit and float slides are converted to 8 bits when their range is known (a note is printed), other
types are refused with the reason (`muse_jax.slide.reader`).

Exit codes: 0 done, every output written; 2 user error, one line on stderr (bad
path or value, a directory as --slide, a slide without mpp, an unreadable pixel type, an incompatible checkpoint, an
--out holding another run); 1 a bug. Every flag is checked before anything is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from muse_jax import cli


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m muse_jax.predict_slide", description=__doc__.split("\n")[0],
      epilog="exit codes: 0 done; 2 user error (one line on stderr, nothing changed that a rerun cannot redo); "
             "1 a bug. Rerun the same command to resume an interrupted run; --restart to start over.")
  p.add_argument("--checkpoint", required=True, help="NDC checkpoint directory (export/ of a fine-tuning run)")
  p.add_argument("--slide", required=True, help="slide file: Aperio SVS, pyramidal/plain TIFF, or PNG/JPEG")
  p.add_argument("--out", required=True, help="output directory (also holds parts/ for resuming)")
  p.add_argument("--mpp", default=None,
                 help="level-0 µm/px of the slide; required when its metadata has none (0.25 at 40x, 0.5 at 20x)")
  p.add_argument("--batch", default="16", help="tiles per inference call (rounded to the device count)")
  p.add_argument("--overlap", default="64", help="tile overlap in px at the model's mpp (even, < the tile)")
  p.add_argument("--readers", default="4", help="tile-reading threads")
  p.add_argument("--score-threshold", default=None,
                 help="in [0, 1]; default: the checkpoint's (chosen on val), else its inference default, else 0.5")
  p.add_argument("--merge-radius-um", default=None,
                 help="seam-merge radius in µm (default: the checkpoint's NMS radius)")
  p.add_argument("--annotations", action="store_true",
                 help="GeoJSON objectType 'annotation' (editable in QuPath) instead of 'detection'")
  p.add_argument("--restart", "--overwrite", dest="restart", action="store_true",
                 help="discard the partial results of an earlier run in --out and start over")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def validate(args: argparse.Namespace):
  """Every flag, the checkpoint's config and --out, before any work. Returns `(SlideRunConfig, overrides)`."""
  from muse_jax.ndc import infer  # noqa: PLC0415
  from muse_jax.slide import run as slide_run  # noqa: PLC0415

  cfg = slide_run.SlideRunConfig(
      mpp=None if args.mpp is None else cli.positive(args.mpp, "--mpp", unit="µm/px"),
      batch_size=cli.positive_int(args.batch, "--batch"),
      overlap=cli.positive_int(args.overlap, "--overlap", allow_zero=True),
      num_readers=cli.positive_int(args.readers, "--readers"),
      merge_radius_um=(None if args.merge_radius_um is None
                       else cli.positive(args.merge_radius_um, "--merge-radius-um", unit="µm")),
      object_type="annotation" if args.annotations else "detection",
      progress=not args.no_progress, restart=args.restart)
  slide_run.validate_config(cfg)
  overrides = {}
  if args.score_threshold is not None:
    overrides["score_threshold"] = infer.check_score_threshold(args.score_threshold, "--score-threshold")
  if os.path.isdir(args.slide):
    raise cli.UserError("is a directory, not a slide file", "--slide",
                        f"{args.slide!r}; expected an SVS / pyramidal TIFF file or a PNG/JPEG/TIFF image")
  if not os.path.isfile(args.slide):
    raise cli.UserError("does not exist", "--slide", repr(args.slide))
  from muse_jax.slide import open_slide  # noqa: PLC0415

  with open_slide(args.slide, mpp=cfg.mpp):  # readable, with an mpp and a pixel type we can convert
    pass
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise cli.UserError("exists and is not a directory", "--out", repr(args.out))
  _, ck = infer.read_checkpoint_config(args.checkpoint)
  model_mpp = infer.check_mpp(ck["mpp"], f"{args.checkpoint}: mpp")
  ck_infer = ck.get("infer") or {}
  window = cli.positive_int(ck_infer.get("window", 256), f"{args.checkpoint}: infer.window")
  merge = cfg.merge_radius_um
  if merge is None:
    merge = cli.positive(ck_infer.get("nms_radius_um", 3.0), f"{args.checkpoint}: infer.nms_radius_um", unit="µm")
  slide_run.check_geometry(window, cfg.overlap, model_mpp, float(merge))
  return cfg, overrides


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (a user error: one line on stderr and 2, see `muse_jax.cli`)."""
  return cli.run(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
  args = parse_args(argv)
  cfg, overrides = validate(args)
  from muse_jax.ndc.infer import Predictor  # noqa: PLC0415
  from muse_jax.slide import run as slide_run  # noqa: PLC0415

  predictor = Predictor.from_checkpoint(args.checkpoint, **overrides)
  print(f"score threshold {predictor.score_threshold:g} (source: {predictor.threshold_source})", file=sys.stderr,
        flush=True)
  summary = slide_run.run(predictor, args.slide, args.out, cfg)
  keys = ("nuclei", "counts", "tissue_area_mm2", "total_density_per_mm2", "tiles_tissue", "seconds", "s_per_mm2",
          "score_threshold", "pixel_note")
  print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
  return cli.EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
