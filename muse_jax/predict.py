"""CLI: nucleus detection + classification on image files with a fine-tuned NDC checkpoint.

  python -m muse_jax.predict --checkpoint DIR --inputs FILES_OR_DIR [...] --mpp M --out DIR

Writes per image `<stem>.csv` (x, y, class, score), `<stem>.geojson` (QuPath classified points) and
`<stem>_overlay.png`, plus `summary.json` (counts per class, timing). `--mpp` is the µm/px of the inputs; images
at another resolution than the model's are resampled (`--no-rescale` makes that an error). `--class-names a,b,c`
checks that the checkpoint predicts these classes. Images smaller than the window are padded; images where
nothing is found give empty files.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_inputs(inputs: list[str]) -> list[pathlib.Path]:
  files = []
  for s in inputs:
    p = pathlib.Path(s)
    if p.is_dir():
      files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
      files.append(p)
    else:
      raise FileNotFoundError(f"--inputs: {s} is neither a file nor a directory")
  if not files:
    raise FileNotFoundError(f"--inputs: no images ({', '.join(IMAGE_SUFFIXES)}) in {inputs}")
  return files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m muse_jax.predict", description=__doc__.split("\n\n")[0])
  ap.add_argument("--checkpoint", required=True, help="NDC export dir (or fine-tuning workdir)")
  ap.add_argument("--inputs", required=True, nargs="+", help="image files and/or directories")
  ap.add_argument("--mpp", required=True, type=float, help="µm per pixel of the inputs")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--class-names", default=None, help="comma-separated expected class names (checked)")
  ap.add_argument("--score-threshold", type=float, default=None)
  ap.add_argument("--nms-radius-um", type=float, default=None)
  ap.add_argument("--window", type=int, default=None)
  ap.add_argument("--overlap", type=int, default=None)
  ap.add_argument("--batch-size", type=int, default=None)
  ap.add_argument("--object-type", default="annotation", choices=("annotation", "detection"),
                  help="QuPath object type of the GeoJSON points")
  ap.add_argument("--no-rescale", action="store_true", help="error instead of resampling a different mpp")
  ap.add_argument("--no-overlay", action="store_true")
  return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from muse_jax import outputs  # pylint: disable=import-outside-toplevel
  from muse_jax.data.readers import read_image  # pylint: disable=import-outside-toplevel
  from muse_jax.ndc.infer import Predictor, check_mpp  # pylint: disable=import-outside-toplevel

  check_mpp(args.mpp, "--mpp")
  files = list_inputs(args.inputs)
  overrides = {k: v for k, v in {"score_threshold": args.score_threshold, "nms_radius_um": args.nms_radius_um,
                                 "window": args.window, "overlap": args.overlap,
                                 "batch_size": args.batch_size}.items() if v is not None}
  pred = Predictor.from_checkpoint(args.checkpoint, **overrides)
  names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
  pred.check_class_names(names)
  os.makedirs(args.out, exist_ok=True)
  summary = {"checkpoint": os.path.abspath(args.checkpoint), "class_names": pred.class_names, "model_mpp": pred.mpp,
             "input_mpp": args.mpp, "images": []}
  for f in files:
    image = read_image(f)
    t = time.time()
    det = pred.predict_image(image, args.mpp, rescale=not args.no_rescale)
    dt = time.time() - t
    stem = os.path.join(args.out, f.stem)
    outputs.write_points_csv(stem + ".csv", det["points"], det["classes"], det["scores"], pred.class_names)
    outputs.write_points_geojson(stem + ".geojson", det["points"], det["classes"], det["scores"], pred.class_names,
                                 object_type=args.object_type)
    if not args.no_overlay:
      outputs.draw_overlay(image, det["points"], det["classes"], pred.class_names, path=stem + "_overlay.png")
    counts = {n: int((det["classes"] == i).sum()) for i, n in enumerate(pred.class_names)}
    summary["images"].append({"file": str(f), "height": image.shape[0], "width": image.shape[1],
                              "nuclei": int(len(det["points"])), "per_class": counts, "seconds": round(dt, 3)})
    print(f"{f.name}: {len(det['points'])} nuclei {counts} in {dt:.2f} s", flush=True)
  with open(os.path.join(args.out, "summary.json"), "w") as fh:
    json.dump(summary, fh, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
