"""CLI: score prediction files against point labels under the benchmarks' matching rules (`ndc.metrics`).

  python -m muse_jax.score --predictions OUT_DIR --labels LABELS --mpp 0.5 [--modes mcspatnet,muse,ocelot,puma,hungarian]
      [--class-names lymphocyte,tumor,stromal] [--split test] [--radius-um 3] [--json scores.json]

- predictions: `<stem>.csv` files as written by `python -m muse_jax.predict` (x, y, class name or id, score).
- labels: a BRCA-M2C root (`labels/<stem>_gt_class_coords.txt`, rows `y x class` with class 1..3; `--split`
  restricts to `brca_ds_<split>.txt`) or a folder of `<stem>.csv` / `<stem>.geojson` point files (class names
  from `--class-names`).
- every labelled image of the split must have a prediction file (a missing one is an error naming it, because
  silently skipping images inflates F1); `--missing-as-empty` scores it as "nothing found" instead.
Prints a Markdown table (F1 in %) and writes all numbers to `--json` when given.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from muse_jax.ndc import metrics as metrics_lib

BRCA_SUFFIX = "_gt_class_coords.txt"


def _labels(labels: pathlib.Path, split: str | None, class_names: list[str]) -> dict[str, dict]:
  from muse_jax.data import readers  # pylint: disable=import-outside-toplevel

  out = {}
  if (labels / "labels").is_dir() and any((labels / "labels").glob("*" + BRCA_SUFFIX)):
    names = readers.brca_split_names(labels, split) if split else [
      p.name[:-len(BRCA_SUFFIX)] + ".png" for p in sorted((labels / "labels").glob("*" + BRCA_SUFFIX))]
    for n in names:
      stem = pathlib.Path(n).stem
      xy, cls = readers.read_brca_labels(labels / "labels" / (stem + BRCA_SUFFIX))
      out[stem] = {"points": xy, "classes": cls}
    return out
  if split:
    raise ValueError(f"--split: {labels} is not a BRCA-M2C root (no labels/*{BRCA_SUFFIX})")
  cmap = {n: i for i, n in enumerate(class_names)}
  files = sorted(p for p in labels.iterdir() if p.suffix.lower() in (".csv", ".tsv", ".geojson", ".json"))
  files += sorted(p for p in labels.glob("*" + BRCA_SUFFIX))
  for p in files:
    if p.name.endswith(BRCA_SUFFIX):
      xy, cls = readers.read_brca_labels(p)
      out[p.name[:-len(BRCA_SUFFIX)]] = {"points": xy, "classes": cls}
    else:
      xy, cls = readers.read_points(p, cmap)
      out[p.stem] = {"points": xy, "classes": cls}
  if not out:
    raise FileNotFoundError(f"--labels: no label files in {labels}")
  return out


def score(predictions: str, labels: str, *, mpp: float, modes: list[str], class_names: list[str],
          split: str | None = None, radius_um: float = 3.0, missing_as_empty: bool = False) -> list[dict]:
  """Scores every labelled image; returns one `metrics.evaluate` result per mode."""
  from muse_jax import outputs  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  pred_dir, lab = pathlib.Path(predictions), _labels(pathlib.Path(labels), split, class_names)
  preds, gts = [], []
  for stem, gt in lab.items():
    f = pred_dir / f"{stem}.csv"
    if f.exists():
      preds.append(outputs.read_points_csv(f, class_names))
    elif missing_as_empty:
      preds.append({"points": np.zeros((0, 2)), "classes": np.zeros(0, int), "scores": np.zeros(0)})
    else:
      raise FileNotFoundError(f"--predictions: no {f.name} in {pred_dir} for labelled image {stem!r} "
                              "(pass --missing-as-empty to score it as 'nothing found')")
    gts.append(gt)
  return [metrics_lib.evaluate(preds, gts, mode=m, class_names=class_names, mpp=mpp, radius_um=radius_um)
          for m in modes]


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m muse_jax.score", description=__doc__.split("\n\n")[0])
  ap.add_argument("--predictions", required=True)
  ap.add_argument("--labels", required=True)
  ap.add_argument("--mpp", required=True, type=float, help="µm/px of the labelled images")
  ap.add_argument("--modes", default="mcspatnet,muse")
  ap.add_argument("--class-names", default="lymphocyte,tumor,stromal")
  ap.add_argument("--split", default=None)
  ap.add_argument("--radius-um", type=float, default=metrics_lib.DEFAULT_RADIUS_UM)
  ap.add_argument("--missing-as-empty", action="store_true")
  ap.add_argument("--json", default=None, help="write all results here")
  args = ap.parse_args(argv)
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in modes if m not in metrics_lib.MODES]
  if bad:
    ap.error(f"--modes: unknown {bad}; expected some of {metrics_lib.MODES}")
  names = [n.strip() for n in args.class_names.split(",")]
  res = score(args.predictions, args.labels, mpp=args.mpp, modes=modes, class_names=names, split=args.split,
              radius_um=args.radius_um, missing_as_empty=args.missing_as_empty)
  print(metrics_lib.format_table(res))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
