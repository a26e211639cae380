"""Reports of an evaluation run: JSON, Markdown tables in the layout of the published tables (spec §6), and
confusion-matrix PNGs (matplotlib, Agg backend).

A result *row* is a dict with `method`, `dataset`, `mpp`, `mpp_label`, `size`, `protocol` and the protocol's
result dict (`accuracy` in [0, 1], `metrics`, selection details). Tables print accuracies in %.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

PROTOCOL_TITLES = {
    "knn": "KNN Evaluation",
    "linear": "Linear Probing Evaluation",
    "finetune": "Fine-Tuning Evaluation",
}
DATASET_LABELS = {"brca_m2c": "BRCAM2C"}


def column_label(row: dict) -> str:
  """`BRCAM2C (20x)` style column name, with the image size and the upsampled-substitute mark where it applies."""
  mag = "20x" if abs(row["mpp"] - 0.5) < 1e-6 else ("40x" if abs(row["mpp"] - 0.25) < 1e-6 else f"{row['mpp']} mpp")
  if row.get("upsampled"):
    mag += "†"
  ds = DATASET_LABELS.get(row["dataset"], row["dataset"])
  return f"{ds} ({mag}, {row['size']})"


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items() if k != "head"}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def write_json(path: str | os.PathLike, payload: Any) -> None:
  """Writes `payload` as indented JSON (numpy converted, linear-probe `head` arrays dropped)."""
  with open(path, "w") as f:
    json.dump(_jsonable(payload), f, indent=2, sort_keys=False)


def _pct(x: float | None) -> str:
  return "–" if x is None else f"{100 * x:.2f}"


def markdown_tables(rows: Sequence[dict], notes: Sequence[str] = ()) -> str:
  """One table per protocol (`|Method|BRCAM2C (20x, 224)|...|`, test top-1 %), then a details table.

  For kNN, the official row is the best k on test (the published convention); a second row `… [k on val]`
  gives the honest figure.
  """
  out = []
  columns = list(dict.fromkeys(column_label(r) for r in rows))
  for proto in ("knn", "linear", "finetune"):
    prow = [r for r in rows if r["protocol"] == proto]
    if not prow:
      continue
    table: dict[str, dict[str, str]] = {}
    for r in prow:
      res = r["result"]
      col = column_label(r)
      if proto == "knn":
        table.setdefault(r["method"], {})[col] = _pct(res["official"]["accuracy"])
        if "honest" in res:
          table.setdefault(f"{r['method']} [k on val]", {})[col] = _pct(res["honest"]["accuracy"])
      else:
        table.setdefault(r["method"], {})[col] = _pct(res["accuracy"])
    out.append(f"### {PROTOCOL_TITLES[proto]} (top-1 accuracy %, test)\n")
    out.append("|Method|" + "|".join(columns) + "|")
    out.append("| --- |" + " --- |" * len(columns))
    for method, cells in table.items():
      out.append(f"| {method} |" + "|".join(f" {cells.get(c, '–')} " for c in columns) + "|")
    out.append("")
  out.append("### Details (test split)\n")
  out.append("| Method | setting | protocol | top-1 % | macro-F1 % | per-class F1 % | selection | nuclei (train/val/test) |")
  out.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    res = r["result"]
    if r["protocol"] == "knn":
      variants = [("official", res["official"], f"k={res['official']['k']} (best on test)")]
      if "honest" in res:
        variants.append(("honest", res["honest"], f"k={res['honest']['k']} (best on val, "
                                                   f"val {_pct(res['honest']['val_accuracy'])})"))
    else:
      variants = [("", res, f"epoch {res['best_epoch'] + 1}/{res['epochs']} (best on val, "
                            f"val {_pct(res['val_accuracy'])})")]
    for tag, v, sel in variants:
      m = v["metrics"]
      f1 = ", ".join(f"{k} {100 * x:.1f}" for k, x in m["per_class_f1"].items())
      proto = r["protocol"] + (f" ({tag})" if tag else "")
      out.append(f"| {r['method']} | {column_label(r)} | {proto} | {_pct(v['accuracy'])} | {_pct(m['macro_f1'])} | "
                 f"{f1} | {sel} | {r.get('counts', '–')} |")
  out.append("")
  if any(r.get("upsampled") for r in rows):
    out.append("† mpp 0.25 here is an **upsampled substitute** (the 0.5 µm/px tiles resized 2x); it holds no 40x "
               "detail and is not comparable with the paper's 40x columns.")
  out.extend(notes)
  return "\n".join(out) + "\n"


def plot_confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike,
                   title: str = "") -> None:
  """Writes a confusion-matrix PNG (rows true, columns predicted; counts and row-normalised %)."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  cm = np.asarray(cm)
  norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=120)
  ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
  n = len(class_names)
  ax.set_xticks(range(n), class_names, rotation=30, ha="right")
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  for i in range(n):
    for j in range(n):
      ax.text(j, i, f"{cm[i, j]}\n{100 * norm[i, j]:.0f}%", ha="center", va="center", fontsize=8,
              color="white" if norm[i, j] > 0.5 else "black")
  if title:
    ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
