"""CLI: nucleus detection + classification on image files with a fine-tuned NDC checkpoint.

  python -m muse_jax.predict --checkpoint DIR --inputs FILES_OR_DIR [...] --mpp M --out DIR

Writes per image `<name>.csv` (x, y, class, score), `<name>.geojson` (QuPath classified points) and
`<name>_overlay.png`, plus `summary.json` (what was processed with counts per class and timing, what was skipped and
why, the score threshold used and where it came from). `<name>` is the file's stem; when two inputs share a stem
(`x.png` and `x.jpg`, or `a/x.png` and `b/x.png`) each gets its stem and suffix (`x_png`, `x_jpg`), then a counter,
so no output overwrites another; `summary.json` maps every input to its outputs. Every file is written under a
temporary name and renamed when complete.

`--mpp` is the µm/px of the inputs; images at another resolution than the model's are resampled (`--no-rescale`
makes that an error). `--class-names a,b,c` checks that the checkpoint predicts these classes. Images smaller than
the window are padded; images where nothing is found give empty files.

Score threshold: `--score-threshold T`, else the threshold stored in the checkpoint (chosen on val, see
`python -m muse_jax.ndc.infer`), else the checkpoint's inference default, else 0.5; the one used and its source are
printed and stored in `summary.json`.

Errors and exit codes: every flag is checked before anything is loaded; a bad path, a bad value or an incompatible
checkpoint prints one line `error: ...` on stderr and exits 2. An image that cannot be read (corrupt, truncated,
16-bit, ...) is skipped with a line naming it and the rest are processed; the command then exits 3
(`cli.EXIT_PARTIAL`) and `summary.json` lists the skipped files with the reason. 0: every image was processed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import time

from muse_jax import cli

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
OVERLAY_SUFFIX = "_overlay.png"


def list_inputs(inputs: list[str], out: str | None = None) -> list[pathlib.Path]:
  """The image files of `inputs` (files as given, directories' images sorted by name), each once.

  Overlays this command wrote into `out` are not inputs (when `out` is one of the input directories).
  """
  files, seen = [], set()
  out_dir = pathlib.Path(out).resolve() if out else None
  for s in inputs:
    p = pathlib.Path(s)
    if p.is_dir():
      found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                     and not (f.parent.resolve() == out_dir and f.name.endswith(OVERLAY_SUFFIX)))
    elif p.is_file():
      found = [p]
    else:
      raise cli.UserError("neither a file nor a directory", "--inputs", f"{s!r} does not exist")
    for f in found:
      if f.resolve() not in seen:
        seen.add(f.resolve())
        files.append(f)
  if not files:
    raise cli.UserError("no images", "--inputs", f"no {', '.join(IMAGE_SUFFIXES)} files in {inputs}")
  return files


def output_names(files: list[pathlib.Path]) -> list[str]:
  """One distinct output name per input: its stem, or `<stem>_<suffix>` (then `_2`, `_3`) where stems collide.

  Names are compared case-insensitively (outputs must not collide on case-insensitive file systems either).
  """
  by_stem = collections.Counter(f.stem.lower() for f in files)
  wanted = [f.stem if by_stem[f.stem.lower()] == 1 else f"{f.stem}_{f.suffix.lstrip('.')}" for f in files]
  names, used = [], set()
  for w in wanted:
    name, k = w, 1
    while name.lower() in used:
      k += 1
      name = f"{w}_{k}"
    used.add(name.lower())
    names.append(name)
  return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
      prog="python -m muse_jax.predict", description=__doc__.split("\n\n")[0],
      epilog="exit codes: 0 every image processed; 2 user error (one line on stderr, nothing processed); "
             "3 finished, but some images were skipped (listed with the reason in OUT/summary.json); 1 a bug.")
  ap.add_argument("--checkpoint", required=True, help="NDC export dir (or fine-tuning workdir)")
  ap.add_argument("--inputs", required=True, nargs="+", help="image files and/or directories")
  ap.add_argument("--mpp", required=True, help="µm per pixel of the inputs (0.25 is 40x, 0.5 is 20x)")
  ap.add_argument("--out", required=True, help="output directory")
  ap.add_argument("--class-names", default=None, help="comma-separated expected class names (checked)")
  ap.add_argument("--score-threshold", default=None,
                  help="in [0, 1]; default: the checkpoint's (chosen on val), else its inference default, else 0.5")
  ap.add_argument("--nms-radius-um", default=None, help="point-NMS radius in µm (default: the checkpoint's)")
  ap.add_argument("--window", default=None, help="sliding-window side in px at the model's mpp")
  ap.add_argument("--overlap", default=None, help="sliding-window overlap in px (< window)")
  ap.add_argument("--batch-size", default=None, help="windows per inference call")
  ap.add_argument("--object-type", default="annotation", choices=("annotation", "detection"),
                  help="QuPath object type of the GeoJSON points")
  ap.add_argument("--no-rescale", action="store_true", help="error instead of resampling a different mpp")
  ap.add_argument("--no-overlay", action="store_true")
  return ap.parse_args(argv)


def validate(args: argparse.Namespace) -> dict:
  """Checks every flag before any work; returns the Predictor overrides. Raises `cli.UserError`."""
  from muse_jax.ndc.infer import check_mpp, check_score_threshold, read_checkpoint_config  # noqa: PLC0415

  args.mpp = check_mpp(args.mpp, "--mpp")
  overrides = {}
  if args.score_threshold is not None:
    overrides["score_threshold"] = check_score_threshold(args.score_threshold, "--score-threshold")
  if args.nms_radius_um is not None:
    overrides["nms_radius_um"] = cli.positive(args.nms_radius_um, "--nms-radius-um", allow_zero=True, upper=100.0,
                                              unit="µm")
  if args.window is not None:
    overrides["window"] = cli.positive_int(args.window, "--window")
  if args.overlap is not None:
    overrides["overlap"] = cli.positive_int(args.overlap, "--overlap", allow_zero=True)
  if args.batch_size is not None:
    overrides["batch_size"] = cli.positive_int(args.batch_size, "--batch-size")
  args.class_names = [n.strip() for n in args.class_names.split(",")] if args.class_names else None
  if args.class_names is not None and not all(args.class_names):
    raise cli.UserError("empty class name", "--class-names", f"got {','.join(args.class_names)!r}")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise cli.UserError("exists and is not a directory", "--out", args.out)
  _, cfg = read_checkpoint_config(args.checkpoint)
  model_mpp = check_mpp(cfg["mpp"], f"{args.checkpoint}: mpp")
  infer = cfg.get("infer") or {}
  window = overrides.get("window", infer.get("window", 256))
  overlap = overrides.get("overlap", infer.get("overlap", 32))
  if int(overlap) >= int(window):
    raise cli.UserError(f"must be < the window ({window} px)", "--overlap", f"got {overlap}")
  if args.no_rescale and abs(args.mpp / model_mpp - 1.0) > 0.1:
    raise cli.UserError(f"the inputs are at {args.mpp} µm/px but the model works at {model_mpp} µm/px",
                        "--no-rescale", "drop --no-rescale to resample them")
  args.files = list_inputs(args.inputs, args.out)
  return overrides


def main(argv: list[str] | None = None) -> int:
  """Runs the CLI; returns the exit code (0, 2 = user error as one stderr line, 3 = some images skipped)."""
  return cli.run(_main, argv)


def _main(argv: list[str] | None) -> int:
  args = parse_args(argv)
  overrides = validate(args)
  from muse_jax import outputs  # pylint: disable=import-outside-toplevel
  from muse_jax.data.readers import read_image  # pylint: disable=import-outside-toplevel
  from muse_jax.ndc.infer import Predictor  # pylint: disable=import-outside-toplevel

  pred = Predictor.from_checkpoint(args.checkpoint, **overrides)
  pred.check_class_names(args.class_names)
  print(f"score threshold {pred.score_threshold:g} (source: {pred.threshold_source})", file=sys.stderr, flush=True)
  os.makedirs(args.out, exist_ok=True)
  summary_path = os.path.join(args.out, "summary.json")
  if os.path.exists(summary_path):  # outputs are about to change: no summary of an earlier run beside them
    os.unlink(summary_path)
  summary = {"checkpoint": os.path.abspath(args.checkpoint), "class_names": pred.class_names, "model_mpp": pred.mpp,
             "input_mpp": args.mpp, "score_threshold": pred.score_threshold,
             "score_threshold_source": pred.threshold_source, "complete": False, "images": [], "skipped": []}
  for f, name in zip(args.files, output_names(args.files)):
    try:
      image = read_image(f)
    except (ValueError, OSError) as e:
      reason = " ".join(str(e).split())
      reason = reason[len(f"{f}: "):] if reason.startswith(f"{f}: ") else reason
      print(f"skipped {f}: {reason}", file=sys.stderr, flush=True)
      summary["skipped"].append({"file": str(f), "reason": reason})
      continue
    t = time.time()
    det = pred.predict_image(image, args.mpp, rescale=not args.no_rescale)
    dt = time.time() - t
    stem = os.path.join(args.out, name)
    outputs.write_points_csv(stem + ".csv", det["points"], det["classes"], det["scores"], pred.class_names)
    outputs.write_points_geojson(stem + ".geojson", det["points"], det["classes"], det["scores"], pred.class_names,
                                 object_type=args.object_type)
    written = {"csv": name + ".csv", "geojson": name + ".geojson"}
    if not args.no_overlay:
      outputs.draw_overlay(image, det["points"], det["classes"], pred.class_names, path=stem + OVERLAY_SUFFIX)
      written["overlay"] = name + OVERLAY_SUFFIX
    counts = {n: int((det["classes"] == i).sum()) for i, n in enumerate(pred.class_names)}
    summary["images"].append({"file": str(f), "outputs": written, "height": image.shape[0],
                              "width": image.shape[1], "nuclei": int(len(det["points"])), "per_class": counts,
                              "seconds": round(dt, 3)})
    print(f"{f.name}: {len(det['points'])} nuclei {counts} in {dt:.2f} s", flush=True)
  summary["complete"] = True
  summary["processed"], summary["skipped_count"] = len(summary["images"]), len(summary["skipped"])
  outputs.write_text_atomic(summary_path, json.dumps(summary, indent=2))
  if summary["skipped"]:
    print(f"{len(summary['skipped'])} of {len(args.files)} images skipped (listed in {summary_path})",
          file=sys.stderr, flush=True)
    return cli.EXIT_PARTIAL
  return cli.EXIT_OK


if __name__ == "__main__":
  sys.exit(main())
