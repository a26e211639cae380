"""CLI: score prediction files against point labels under the benchmarks' matching rules (`ndc.metrics`).

  python -m muse_jax.score --predictions OUT_DIR --labels LABELS --mpp 0.5
      [--modes mcspatnet,muse,ocelot,puma,hungarian]
      [--class-names lymphocyte,tumor,stromal] [--split test] [--radius-um R | --radius-px R] [--json scores.json]
      [--score-threshold T | --sweep auto [--select mcspatnet/f_det]] [--mcspatnet-corrected-fn] [--strict]

- predictions: `<stem>.csv` files as written by `python -m muse_jax.predict` (x, y, class name or index, score). A
  class that is neither a name of `--class-names` nor an index into it is an error naming the file and line.
- labels: a BRCA-M2C root (`labels/<stem>_gt_class_coords.txt`, rows `y x class` with class 1..3; `--split`
  restricts to `brca_ds_<split>.txt`) or a folder of `<stem>.csv` / `<stem>.geojson` point files (class names
  from `--class-names`). Coordinates of both are read as float64 (each mode then computes in its script's own
  precision: float32 for ocelot, float64 for the others).
- every labelled image of the split must have a prediction file (a missing one is an error naming it, because
  silently skipping images inflates F1); `--missing-as-empty` scores it as "nothing found" instead, with a
  warning. A prediction file with no label file at all (in any split) is a warning; `--strict` makes both kinds of
  orphan an error.
- radius: each mode's own radius in px when `--mpp` is its benchmark's (within 10%): mcspatnet 6 px (d < r, as
  its KDTree query), muse 12 px (<=), ocelot 15 px (<=), puma 15 px (d < r); otherwise 3 µm. `--radius-um` or
  `--radius-px` sets one radius for every mode. The radius each mode used is printed in px and µm.
- mcspatnet: the published script counts 6 x #GT (not #GT) as FN for a class map (or the all-cells map) of an
  image without predictions; the published BRCA-M2C numbers include this, so it is applied by default and said
  so; `--mcspatnet-corrected-fn` gives the corrected count. `--json` holds both.
- `--score-threshold T` drops predictions scoring below T before matching (predict once with a low threshold, then
  score at several). `--threshold-from sweep.json` takes the threshold chosen by an earlier `--sweep ... --json`.
- `--sweep auto` (0.05, 0.10, ..., 0.95) or `--sweep 0.3,0.5,0.7` scores at every threshold and reports the one that
  maximises `--select` (`MODE/f_det` or `MODE/f_mean`; ties go to the lower threshold). Choose the threshold on the
  validation split this way, then score the test split at it with `--score-threshold` (choosing it on test inflates F1).
Errors: a bad flag value (checked before any file is read: mpp in [0.01, 10] µm/px, radius > 0 and <= 100 µm,
thresholds in [0, 1], known modes, distinct class names, existing folders) or a bad row (naming file, line and
column: not a number, not finite, |coordinate| > 1e7 px, class outside the class map, extra fields) is one line
`error: <what> (<where>): <why>` on stderr and exit code 2.
Prints a Markdown table (F1 in %; 'undefined' where a benchmark defines none, e.g. puma with no points), one line per
mode on how it matched (radius, comparison, precision, tie rule, the MCSpatNet FN quirk), and writes all numbers to
`--json` when given (per mode: radius in px and µm, the tie rule, whether the FN quirk was applied; null = undefined).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import pathlib
import sys
import warnings

import numpy as np

from muse_jax import cli
from muse_jax.cli import UserError
from muse_jax.ndc import metrics as metrics_lib

BRCA_SUFFIX = "_gt_class_coords.txt"
LABEL_SUFFIXES = (".csv", ".tsv", ".geojson", ".json")
CLASS_COLUMNS = ("class", "label", "classification", "class_name", "name", "type")


# ------------------------------------------------------------------------------------------------ readers (float64)


def _read_text(path: pathlib.Path, encoding: str) -> str:
  try:
    return path.read_text(encoding=encoding)
  except UnicodeDecodeError as e:
    raise UserError("not a text file", str(path), f"byte {e.start} is not {encoding}") from None


MAX_COORD_PX = 1e7
"""Largest |x| or |y| accepted in a point file, in pixels (the largest whole-slide images are ~2e5 px wide); a
larger value is a corrupt or mis-scaled file, and squaring it would overflow the float32 distances of ocelot."""


def _number(text: str | None, where: str, what: str, *, coord: bool = False) -> float:
  """`text` as a finite float (`coord`: also |v| <= MAX_COORD_PX); else a UserError naming `where` and `what`."""
  field = f"{where}, column {what}"
  if text is None or not str(text).strip():
    raise UserError(f"missing {what}", field, "the row has fewer fields than the header")
  try:
    v = float(text)
  except (TypeError, ValueError):
    raise UserError(f"{what} is not a number", field, f"got {text!r}") from None
  if not math.isfinite(v):
    raise UserError(f"{what} is not finite", field, f"got {text!r}")
  if coord and abs(v) > MAX_COORD_PX:
    raise UserError(f"{what} is out of range", field, f"got {text!r} px, expected |{what}| <= {MAX_COORD_PX:g} px")
  return v


def _class_index(name: str | None, class_names: list[str], where: str, *, allow_unknown: bool) -> int:
  """Index of a class given by name (case-insensitive) or by index into `class_names`; -1 for an empty GT class."""
  key = "" if name is None else str(name).strip()
  if not key and allow_unknown:
    return -1
  if not key:
    raise UserError("missing class", f"{where}, column class", "the row is empty there or shorter than the header")
  low = {n.lower(): i for i, n in enumerate(class_names)}
  if key.lower() in low:
    return low[key.lower()]
  try:
    i = int(key)
  except ValueError:
    i = -1
  if 0 <= i < len(class_names):
    return i
  raise UserError(f"class {key!r} is not one of {class_names} (or an index 0..{len(class_names) - 1})",
                  f"{where}, column class", "give a name of --class-names or its index")


def read_predictions(path: str | pathlib.Path, class_names: list[str]) -> dict[str, np.ndarray]:
  """Reads a prediction CSV (header `x,y,class[,score]`; score 1 when absent) in float64.

  Returns:
    `{'points': [K,2] float64 (x, y) px, 'classes': [K] int64, 'scores': [K] float64}`.

  Raises:
    UserError (a ValueError): naming `file:line` and the column for a missing column, a bad number, a coordinate
      beyond `MAX_COORD_PX`, a class outside `class_names`, or a row with more fields than the header.
  """
  pts, cls, sc = [], [], []
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      missing = {"x", "y", "class"} - set(reader.fieldnames or [])
      if missing:
        raise UserError(f"missing columns {sorted(missing)}", f"{path}:1",
                        f"got header {reader.fieldnames}, expected x,y,class[,score]")
      for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
          raise UserError("more fields than the header", where, f"extra {row[None]}")
        pts.append((_number(row["x"], where, "x", coord=True), _number(row["y"], where, "y", coord=True)))
        cls.append(_class_index(row["class"], class_names, where, allow_unknown=False))
        s = row.get("score")
        sc.append(1.0 if s is None or not s.strip() else _number(s, where, "score"))
  except (UnicodeDecodeError, csv.Error) as e:
    raise UserError("not a readable CSV file", str(path), str(e)) from None
  return {"points": np.asarray(pts, np.float64).reshape(-1, 2), "classes": np.asarray(cls, np.int64),
          "scores": np.asarray(sc, np.float64)}


def _read_brca(path: pathlib.Path, class_names: list[str]) -> dict[str, np.ndarray]:
  """BRCA-M2C label rows `y x class` (class 1..C)."""
  pts, cls = [], []
  for lineno, line in enumerate(_read_text(path, "utf-8").splitlines(), 1):
    s = line.strip()
    if not s or s.startswith("#"):
      continue
    parts, where = s.replace(",", " ").split(), f"{path}:{lineno}"
    if len(parts) != 3:
      raise UserError('expected three numbers "y x class"', where, f"got {s!r}")
    y, x = _number(parts[0], where, "y", coord=True), _number(parts[1], where, "x", coord=True)
    c = _number(parts[2], where, "class")
    if c != int(c) or not 1 <= c <= len(class_names):
      raise UserError(f"class {parts[2]!r} is not one of 1..{len(class_names)} ({class_names})",
                      f"{where}, column class")
    pts.append((x, y))
    cls.append(int(c) - 1)
  return {"points": np.asarray(pts, np.float64).reshape(-1, 2), "classes": np.asarray(cls, np.int64)}


def _read_label_csv(path: pathlib.Path, class_names: list[str]) -> dict[str, np.ndarray]:
  """CSV/TSV label points: a header with `x`, `y` and an optional class column, or rows `x,y[,class]`."""
  text = _read_text(path, "utf-8-sig")
  lines = text.splitlines()
  delim = "\t" if path.suffix.lower() == ".tsv" or (lines and "\t" in lines[0]) else ","
  rows = list(csv.reader(lines, delimiter=delim))
  ix, iy, ic, start = 0, 1, 2, 0
  if rows and rows[0]:
    head = [h.strip().lower() for h in rows[0]]
    try:
      [float(h) for h in head[:2]]
    except ValueError:
      if "x" not in head or "y" not in head:
        raise UserError('header has no "x" and "y" columns', f"{path}:1", f"got {rows[0]}") from None
      ix, iy = head.index("x"), head.index("y")
      ic = next((head.index(k) for k in CLASS_COLUMNS if k in head), None)
      start = 1
  pts, cls = [], []
  for lineno, row in enumerate(rows[start:], start + 1):
    if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
      continue
    where = f"{path}:{lineno}"
    if max(ix, iy) >= len(row):
      raise UserError("expected numbers in columns x, y", where, f"got {row}")
    pts.append((_number(row[ix], where, "x", coord=True), _number(row[iy], where, "y", coord=True)))
    name = row[ic] if ic is not None and ic < len(row) else None
    cls.append(_class_index(name, class_names, where, allow_unknown=True))
  return {"points": np.asarray(pts, np.float64).reshape(-1, 2), "classes": np.asarray(cls, np.int64)}


def _read_label_geojson(path: pathlib.Path, class_names: list[str]) -> dict[str, np.ndarray]:
  """GeoJSON label points (QuPath): Point/MultiPoint as given, Polygon/MultiPolygon by the centroid of the
  (largest) outer ring, as `data.readers.read_points_geojson` takes them."""
  from muse_jax.data import readers  # pylint: disable=import-outside-toplevel

  try:
    data = json.loads(_read_text(path, "utf-8"))
  except json.JSONDecodeError as e:
    raise UserError("invalid JSON", f"{path}:{e.lineno}", e.msg) from None
  feats = data.get("features", [data]) if isinstance(data, dict) else data
  if not isinstance(feats, list):
    raise UserError("not a GeoJSON FeatureCollection, Feature or list of features", str(path),
                    f"got a JSON {type(feats).__name__}")
  pts, cls = [], []
  for i, f in enumerate(feats):
    where = f"{path}:feature {i}"
    geom = f.get("geometry") if isinstance(f, dict) else None
    if not isinstance(geom, dict):
      raise UserError("not a GeoJSON Feature with a geometry", where, f"got {str(f)[:60]!r}")
    gtype, gc = geom.get("type"), geom.get("coordinates")
    try:
      if gtype == "Point":
        xy = [gc[:2]]
      elif gtype == "MultiPoint":
        xy = [p[:2] for p in gc]
      elif gtype == "Polygon":
        xy = [readers._polygon_centroid(gc[0])]  # pylint: disable=protected-access
      elif gtype == "MultiPolygon":
        xy = [readers._polygon_centroid(max(gc, key=lambda poly: len(poly[0]))[0])]  # pylint: disable=protected-access
      else:
        raise UserError(f"geometry type {gtype!r} not supported", where, "expected Point, MultiPoint, Polygon or "
                        "MultiPolygon")
      xy = [(_number(p[0], where, "x", coord=True), _number(p[1], where, "y", coord=True)) for p in xy]
    except (TypeError, IndexError, KeyError, ValueError) as e:
      if isinstance(e, UserError):
        raise
      raise UserError(f"malformed {gtype} coordinates", where, f"got {str(gc)[:60]!r}") from None
    props = f.get("properties")
    if props is not None and not isinstance(props, dict):
      raise UserError("properties is not a JSON object", where, f"got {str(props)[:60]!r}")
    name = readers._feature_class(props)  # pylint: disable=protected-access
    c = _class_index(name, class_names, where, allow_unknown=True)
    pts += xy
    cls += [c] * len(xy)
  return {"points": np.asarray(pts, np.float64).reshape(-1, 2), "classes": np.asarray(cls, np.int64)}


def _labels(labels: pathlib.Path, split: str | None, class_names: list[str]) -> tuple[dict[str, dict], set[str]]:
  """The labels of the split's images (by stem) and the stems of every label file there (any split)."""
  from muse_jax.data import readers  # pylint: disable=import-outside-toplevel

  out = {}
  if (labels / "labels").is_dir() and any((labels / "labels").glob("*" + BRCA_SUFFIX)):
    every = {p.name[:-len(BRCA_SUFFIX)] for p in (labels / "labels").glob("*" + BRCA_SUFFIX)}
    try:
      names = readers.brca_split_names(labels, split) if split else [s + ".png" for s in sorted(every)]
    except ValueError as e:
      raise UserError("cannot read the split list", "--split", str(e)) from None
    for n in names:
      stem = pathlib.Path(n).stem
      out[stem] = _read_brca(labels / "labels" / (stem + BRCA_SUFFIX), class_names)
    return out, every
  if split:
    raise UserError("only a BRCA-M2C root has splits", "--split", f"{labels} has no labels/*{BRCA_SUFFIX}")
  files = sorted(p for p in labels.iterdir() if p.suffix.lower() in LABEL_SUFFIXES)
  files += sorted(p for p in labels.glob("*" + BRCA_SUFFIX))
  for p in files:
    if p.name.endswith(BRCA_SUFFIX):
      out[p.name[:-len(BRCA_SUFFIX)]] = _read_brca(p, class_names)
    elif p.suffix.lower() in (".csv", ".tsv"):
      out[p.stem] = _read_label_csv(p, class_names)
    else:
      out[p.stem] = _read_label_geojson(p, class_names)
  if not out:
    raise UserError("no label files", "--labels", f"{labels} has no labels/*{BRCA_SUFFIX} and no "
                    f"{', '.join('*' + x for x in LABEL_SUFFIXES)}")
  return out, set(out)


# ------------------------------------------------------------------------------------------------ scoring


def _check_threshold(t: float, name: str) -> float:
  try:
    return cli.in_range(t, name, 0.0, 1.0)
  except UserError:
    raise UserError("not a score threshold in [0, 1]", name, f"got {t!r}") from None


def parse_sweep(spec: str) -> list[float]:
  """'auto' -> 0.05, 0.10, ..., 0.95; otherwise a comma-separated list of thresholds in [0, 1] (sorted, unique)."""
  if spec.strip() == "auto":
    return [round(0.05 * i, 2) for i in range(1, 20)]
  try:
    ts = [float(x) for x in spec.split(",") if x.strip()]
  except ValueError:
    raise UserError("not 'auto' or comma-separated numbers", "--sweep", f"got {spec!r}") from None
  if not ts:
    raise UserError("no thresholds given", "--sweep", "give 'auto' or comma-separated numbers in [0, 1]")
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
          split: str | None = None, radius_um: float | None = None, radius_px: float | None = None,
          mcspatnet_fn_quirk: bool = True, missing_as_empty: bool = False, strict: bool = False,
          score_threshold: float | None = None) -> list[dict]:
  """Scores every labelled image; returns one `metrics.evaluate` result per mode.

  `radius_um`/`radius_px`: one radius for every mode (default: each mode's own, see `metrics.resolve_radius`).
  `score_threshold`: predictions scoring below it are dropped first (None: all predictions count).
  """
  if score_threshold is not None:
    score_threshold = _check_threshold(score_threshold, "score_threshold")
  preds, gts = load(predictions, labels, class_names=class_names, split=split, missing_as_empty=missing_as_empty,
                    strict=strict)
  return _evaluate_at(preds, gts, score_threshold, modes, class_names=class_names, mpp=mpp, radius_um=radius_um,
                      radius_px=radius_px, mcspatnet_fn_quirk=mcspatnet_fn_quirk)


def _metric(r: dict, metric: str) -> float:
  v = r["detection"]["f1"] if metric == "f_det" else r["mean_f1"]
  return -math.inf if v is None else v


def sweep(predictions: str, labels: str, *, mpp: float, modes: list[str], class_names: list[str],
          thresholds: list[float], select: str = "mcspatnet/f_det", split: str | None = None,
          radius_um: float | None = None, radius_px: float | None = None, mcspatnet_fn_quirk: bool = True,
          missing_as_empty: bool = False, strict: bool = False) -> dict:
  """Scores at every threshold; returns {'thresholds', 'select', 'best_threshold', 'best', 'results'}.

  `results[i]` is the per-mode list at `thresholds[i]`; `best` is the list at the threshold maximising `select`
  (`MODE/f_det` or `MODE/f_mean`, MODE one of `modes`; the lowest threshold wins ties; undefined values lose).
  """
  mode, _, metric = select.partition("/")
  if mode not in modes or metric not in ("f_det", "f_mean"):
    raise UserError("not MODE/f_det or MODE/f_mean with MODE one of --modes", "--select",
                    f"got {select!r}, --modes {modes}")
  preds, gts = load(predictions, labels, class_names=class_names, split=split, missing_as_empty=missing_as_empty,
                    strict=strict)
  results = [_evaluate_at(preds, gts, t, modes, class_names=class_names, mpp=mpp, radius_um=radius_um,
                          radius_px=radius_px, mcspatnet_fn_quirk=mcspatnet_fn_quirk) for t in thresholds]
  vals = [_metric(res[modes.index(mode)], metric) for res in results]
  best = int(max(range(len(vals)), key=lambda i: (vals[i], -i)))
  return {"thresholds": list(thresholds), "select": select, "best_threshold": thresholds[best],
          "best": results[best], "results": results}


def load(predictions: str, labels: str, *, class_names: list[str], split: str | None = None,
         missing_as_empty: bool = False, strict: bool = False) -> tuple[list[dict], list[dict]]:
  """Reads the prediction CSVs and the labels of every labelled image of the split (same order), in float64.

  A labelled image without a prediction file is an error (`missing_as_empty`: scored as 'nothing found', with a
  warning); a prediction file without any label file is a warning. `strict`: both are errors.
  """
  if strict and missing_as_empty:
    raise UserError("give at most one", "--strict, --missing-as-empty")
  pred_dir = pathlib.Path(predictions)
  lab, every = _labels(pathlib.Path(labels), split, list(class_names))
  orphans = sorted(p.name for p in pred_dir.glob("*.csv") if p.stem not in every)
  if orphans:
    msg = (f"--predictions: {len(orphans)} prediction file(s) in {pred_dir} have no label file in {labels} and are "
           f"not scored: {', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''}")
    if strict:
      raise UserError(f"{len(orphans)} prediction file(s) have no label file", "--predictions, --strict",
                      f"{', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''} in {pred_dir} (labels {labels})")
    warnings.warn(msg, stacklevel=2)
  preds, gts, filled = [], [], []
  for stem, gt in lab.items():
    f = pred_dir / f"{stem}.csv"
    if f.exists():
      preds.append(read_predictions(f, list(class_names)))
    elif missing_as_empty:
      preds.append({"points": np.zeros((0, 2)), "classes": np.zeros(0, np.int64), "scores": np.zeros(0)})
      filled.append(stem)
    else:
      raise FileNotFoundError(f"no prediction file for labelled image {stem!r} (--predictions): no {f.name} in "
                              f"{pred_dir}; pass --missing-as-empty to score it as 'nothing found'")
    gts.append(gt)
  if filled:
    warnings.warn(f"--missing-as-empty: {len(filled)} labelled image(s) have no prediction file and count as "
                  f"'nothing found': {', '.join(filled[:5])}{' ...' if len(filled) > 5 else ''}", stacklevel=2)
  return preds, gts


MAX_RADIUS_UM = 100.0
"""Largest matching radius accepted, in µm (benchmarks use 3-7.5 µm; a nucleus is ~10 µm across)."""


def parse_args(argv: list[str] | None = None):
  ap = cli.ArgumentParser(prog="python -m muse_jax.score", description=__doc__.split("\n\n")[0])
  ap.add_argument("--predictions", required=True)
  ap.add_argument("--labels", required=True)
  ap.add_argument("--mpp", required=True, type=float, help="µm/px of the labelled images")
  ap.add_argument("--modes", default="mcspatnet,muse")
  ap.add_argument("--class-names", default="lymphocyte,tumor,stromal")
  ap.add_argument("--split", default=None, choices=("train", "val", "test", "all"))
  rad = ap.add_mutually_exclusive_group()
  rad.add_argument("--radius-um", type=float, default=None,
                   help="one matching radius in µm for every mode (default: each benchmark's own, else 3 µm)")
  rad.add_argument("--radius-px", type=float, default=None, help="one matching radius in px for every mode")
  ap.add_argument("--mcspatnet-corrected-fn", action="store_true",
                  help="mcspatnet: count #GT, not the published script's 6 x #GT, as FN for a map without predictions")
  ap.add_argument("--missing-as-empty", action="store_true")
  ap.add_argument("--strict", action="store_true",
                  help="a labelled image without predictions or a prediction file without labels is an error")
  ap.add_argument("--score-threshold", type=float, default=None,
                  help="drop predictions scoring below this before matching")
  ap.add_argument("--threshold-from", default=None,
                  help="a `--sweep --json` file (e.g. of the val split): score at its best threshold")
  ap.add_argument("--sweep", default=None, help="'auto' or comma-separated thresholds: score at each, report the best")
  ap.add_argument("--select", default="mcspatnet/f_det", help="with --sweep: MODE/f_det or MODE/f_mean to maximise")
  ap.add_argument("--json", default=None, help="write all results here")
  return ap.parse_args(argv)


def _folder(path: str, flag: str) -> pathlib.Path:
  p = pathlib.Path(path)
  if not p.exists():
    raise UserError("no such folder", flag, str(p))
  if not p.is_dir():
    raise UserError("not a folder", flag, str(p))
  return p


def validate(args) -> dict:
  """Checks every flag before any file is scored (one place); returns the parsed values.

  Returns:
    {'modes', 'class_names', 'thresholds' (None unless --sweep), 'score_threshold', 'common' (kwargs of `score` and
    `sweep`)}. Raises UserError naming the flag.
  """
  if sum(x is not None for x in (args.sweep, args.score_threshold, args.threshold_from)) > 1:
    raise UserError("give at most one", "--sweep, --score-threshold, --threshold-from")
  if args.strict and args.missing_as_empty:
    raise UserError("give at most one", "--strict, --missing-as-empty")
  _folder(args.predictions, "--predictions")
  _folder(args.labels, "--labels")
  mpp = cli.mpp(args.mpp, "--mpp")
  radius_um = radius_px = None
  if args.radius_um is not None:
    radius_um = cli.positive(args.radius_um, "--radius-um", upper=MAX_RADIUS_UM, unit="µm")
  if args.radius_px is not None:
    radius_px = cli.positive(args.radius_px, "--radius-px", upper=MAX_RADIUS_UM / mpp, unit="px")
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  bad = [m for m in modes if m not in metrics_lib.MODES]
  if bad or not modes:
    raise UserError("unknown mode" if bad else "no mode given", "--modes",
                    f"got {bad or args.modes!r}, expected some of {list(metrics_lib.MODES)}")
  modes = list(dict.fromkeys(modes))
  names = [n.strip() for n in args.class_names.split(",")]
  if not all(names):
    raise UserError("empty class name", "--class-names", f"got {args.class_names!r}")
  if len({n.lower() for n in names}) != len(names):
    raise UserError("repeated class name", "--class-names", f"got {args.class_names!r}")
  score_threshold = None
  if args.score_threshold is not None:
    score_threshold = _check_threshold(args.score_threshold, "--score-threshold")
  if args.threshold_from is not None:
    try:
      t = json.loads(pathlib.Path(args.threshold_from).read_text())["best_threshold"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError("not a readable `--sweep --json` file", "--threshold-from",
                      f"{args.threshold_from}: {type(e).__name__}: {e}") from None
    score_threshold = _check_threshold(t, f"--threshold-from {args.threshold_from}: best_threshold")
  thresholds = None
  if args.sweep is not None:
    thresholds = parse_sweep(args.sweep)
    mode, _, metric = args.select.partition("/")
    if mode not in modes or metric not in ("f_det", "f_mean"):
      raise UserError("not MODE/f_det or MODE/f_mean with MODE one of --modes", "--select",
                      f"got {args.select!r}, --modes {modes}")
  if args.json is not None:
    j = pathlib.Path(args.json)
    if j.is_dir():
      raise UserError("is a folder, expected a file name", "--json", str(j))
    if not j.parent.is_dir():
      raise UserError("no such folder", "--json", f"{j.parent} (create it first)")
  common = dict(mpp=mpp, modes=modes, class_names=names, split=args.split, radius_um=radius_um,
                radius_px=radius_px, mcspatnet_fn_quirk=not args.mcspatnet_corrected_fn,
                missing_as_empty=args.missing_as_empty, strict=args.strict)
  return {"modes": modes, "thresholds": thresholds, "score_threshold": score_threshold, "common": common}


def _main(argv: list[str] | None) -> int:
  args = parse_args(argv)
  v = validate(args)
  modes = v["modes"]
  if v["thresholds"] is not None:
    res = sweep(args.predictions, args.labels, thresholds=v["thresholds"], select=args.select, **v["common"])
  else:
    res = score(args.predictions, args.labels, score_threshold=v["score_threshold"], **v["common"])
  if args.sweep is not None:
    mode, _, metric = args.select.partition("/")
    print(f"| threshold | {args.select} (%) |\n|---|---|")
    for t, r in zip(res["thresholds"], res["results"]):
      val = _metric(r[modes.index(mode)], metric)
      print(f"| {t:.2f} | {'undefined' if val == -math.inf else f'{100 * val:.2f}'} |")
    print(f"\nbest threshold {res['best_threshold']:.2f} (by {args.select}):")
    shown = res["best"]
  else:
    shown = res
  print(metrics_lib.format_table(shown))
  print()
  for r in shown:
    print("- " + metrics_lib.describe(r))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=2, allow_nan=False)
  return 0


def main(argv: list[str] | None = None) -> int:
  """The CLI: prints the table; a user error is one line on stderr and exit code 2 (`cli.run`)."""
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
