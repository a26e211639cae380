"""CLI: score prediction files against point labels under the benchmarks' matching rules (`ndc.metrics`).

  python -m muse_jax.score --predictions OUT_DIR --labels LABELS --mpp 0.5 [--modes mcspatnet,muse,ocelot,puma,hungarian]
      [--class-names lymphocyte,tumor,stromal] [--split test] [--radius-um 3] [--json scores.json]
      [--score-threshold T | --sweep auto [--select mcspatnet/f_det]]

- predictions: `<stem>.csv` files as written by `python -m muse_jax.predict` (x, y, class name or id, score).
- labels: a BRCA-M2C root (`labels/<stem>_gt_class_coords.txt`, rows `y x class` with class 1..3; `--split`
  restricts to `brca_ds_<split>.txt`) or a folder of `<stem>.csv` / `<stem>.geojson` point files (class names
  from `--class-names`).
- every labelled image of the split must have a prediction file (a missing one is an error naming it, because
  silently skipping images inflates F1); `--missing-as-empty` scores it as "nothing found" instead.
- `--score-threshold T` drops predictions scoring below T before matching (predict once with a low threshold, then
  score at several). `--threshold-from sweep.json` takes the threshold chosen by an earlier `--sweep ... --json`.
- `--sweep auto` (0.05, 0.10, ..., 0.95) or `--sweep 0.3,0.5,0.7` scores at every threshold and reports the one that
  maximises `--select` (`MODE/f_det` or `MODE/f_mean`; ties go to the lower threshold). Choose the threshold on the
  validation split this way, then score the test split at it with `--score-threshold` (choosing it on test inflates F1).
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


def _check_threshold(t: float, name: str) -> float:
  if not (0.0 <= t <= 1.0):  # also rejects NaN
    raise ValueError(f"{name}: got {t}, expected a score threshold in [0, 1]")
  return float(t)


def parse_sweep(spec: str) -> list[float]:
  """'auto' -> 0.05, 0.10, ..., 0.95; otherwise a comma-separated list of thresholds in [0, 1] (sorted, unique)."""
  if spec.strip() == "auto":
    return [round(0.05 * i, 2) for i in range(1, 20)]
  try:
    ts = [float(x) for x in spec.split(",") if x.strip()]
  except ValueError as e:
    raise ValueError(f"--sweep: got {spec!r}, expected 'auto' or comma-separated numbers") from e
  if not ts:
    raise ValueError("--sweep: no thresholds given")
  return sorted({_check_threshold(t, "--sweep") for t in ts})


def _filter(pred: dict, threshold: float) -> dict:
  keep = pred["scores"] >= threshold
  return {"points": pred["points"][keep], "classes": pred["classes"][keep], "scores": pred["scores"][keep]}


def _evaluate_at(preds: list[dict], gts: list[dict], threshold: float | None, modes: list[str], **kw) -> list[dict]:
  """One `metrics.evaluate` result per mode for the predictions scoring >= `threshold` (None: all of them)."""
  if threshold is not None:
    preds = [_filter(p, threshold) for p in preds]
  out = [metrics_lib.evaluate(preds, gts, mode=m, **kw) for m in modes]
  for r in out:
    r["score_threshold"] = threshold
  return out


def score(predictions: str, labels: str, *, mpp: float, modes: list[str], class_names: list[str],
          split: str | None = None, radius_um: float = 3.0, missing_as_empty: bool = False,
          score_threshold: float | None = None) -> list[dict]:
  """Scores every labelled image; returns one `metrics.evaluate` result per mode.

  `score_threshold`: predictions scoring below it are dropped first (None: all predictions count).
  """
  if score_threshold is not None:
    score_threshold = _check_threshold(score_threshold, "score_threshold")
  preds, gts = load(predictions, labels, class_names=class_names, split=split, missing_as_empty=missing_as_empty)
  return _evaluate_at(preds, gts, score_threshold, modes, class_names=class_names, mpp=mpp, radius_um=radius_um)


def sweep(predictions: str, labels: str, *, mpp: float, modes: list[str], class_names: list[str],
          thresholds: list[float], select: str = "mcspatnet/f_det", split: str | None = None,
          radius_um: float = 3.0, missing_as_empty: bool = False) -> dict:
  """Scores at every threshold; returns {'thresholds', 'select', 'best_threshold', 'best', 'results'}.

  `results[i]` is the per-mode list at `thresholds[i]`; `best` is the list at the threshold maximising `select`
  (`MODE/f_det` or `MODE/f_mean`, MODE one of `modes`; the lowest threshold wins ties).
  """
  mode, _, metric = select.partition("/")
  if mode not in modes or metric not in ("f_det", "f_mean"):
    raise ValueError(f"--select: got {select!r}, expected MODE/f_det or MODE/f_mean with MODE in {modes}")
  preds, gts = load(predictions, labels, class_names=class_names, split=split, missing_as_empty=missing_as_empty)
  results = [_evaluate_at(preds, gts, t, modes, class_names=class_names, mpp=mpp, radius_um=radius_um)
             for t in thresholds]
  key = (lambda r: r["detection"]["f1"]) if metric == "f_det" else (lambda r: r["mean_f1"])
  vals = [key(res[modes.index(mode)]) for res in results]
  best = int(max(range(len(vals)), key=lambda i: (vals[i], -i)))
  return {"thresholds": list(thresholds), "select": select, "best_threshold": thresholds[best],
          "best": results[best], "results": results}


def load(predictions: str, labels: str, *, class_names: list[str], split: str | None = None,
         missing_as_empty: bool = False) -> tuple[list[dict], list[dict]]:
  """Reads the prediction CSVs and the labels of every labelled image (same order)."""
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
  return preds, gts


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
  ap.add_argument("--score-threshold", type=float, default=None,
                  help="drop predictions scoring below this before matching")
  ap.add_argument("--threshold-from", default=None,
                  help="a `--sweep --json` file (e.g. of the val split): score at its best threshold")
  ap.add_argument("--sweep", default=None, help="'auto' or comma-separated thresholds: score at each, report the best")
  ap.add_argument("--select", default="mcspatnet/f_det", help="with --sweep: MODE/f_det or MODE/f_mean to maximise")
  ap.add_argument("--json", default=None, help="write all results here")
  args = ap.parse_args(argv)
  if sum(x is not None for x in (args.sweep, args.score_threshold, args.threshold_from)) > 1:
    ap.error("--sweep, --score-threshold, --threshold-from: give at most one")
  if args.threshold_from is not None:
    try:
      args.score_threshold = float(json.loads(pathlib.Path(args.threshold_from).read_text())["best_threshold"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      ap.error(f"--threshold-from {args.threshold_from}: not a readable `--sweep --json` file ({e!r})")
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in modes if m not in metrics_lib.MODES]
  if bad:
    ap.error(f"--modes: unknown {bad}; expected some of {metrics_lib.MODES}")
  names = [n.strip() for n in args.class_names.split(",")]
  common = dict(mpp=args.mpp, modes=modes, class_names=names, split=args.split, radius_um=args.radius_um,
                missing_as_empty=args.missing_as_empty)
  try:
    if args.sweep is not None:
      res = sweep(args.predictions, args.labels, thresholds=parse_sweep(args.sweep), select=args.select, **common)
    else:
      res = score(args.predictions, args.labels, score_threshold=args.score_threshold, **common)
  except ValueError as e:
    ap.error(str(e))
  if args.sweep is not None:
    mode, _, metric = args.select.partition("/")
    print(f"| threshold | {args.select} (%) |\n|---|---|")
    for t, r in zip(res["thresholds"], res["results"]):
      x = r[modes.index(mode)]
      v = x["detection"]["f1"] if metric == "f_det" else x["mean_f1"]
      print(f"| {t:.2f} | {100 * v:.2f} |")
    print(f"\nbest threshold {res['best_threshold']:.2f} (by {args.select}):")
    print(metrics_lib.format_table(res["best"]))
  else:
    print(metrics_lib.format_table(res))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
