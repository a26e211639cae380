"""Classification metrics for the nucleus-classification protocols (spec §5.6).

The official metric is top-1 accuracy over all test nuclei, pooled (micro). Macro-F1, per-class F1 and the
confusion matrix are reported beside it because BRCA-M2C's test split is 69% tumour.
"""
from __future__ import annotations

import numpy as np


def check_labels(labels: np.ndarray, num_classes: int, *, what: str = "labels") -> np.ndarray:
  """Returns `labels` as int32 [N] after checking that every id lies in [0, num_classes).

  Raises:
    ValueError: naming `what`, the offending ids and the valid range.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"{what}: expected a 1-D array of class ids, got shape {labels.shape}")
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise ValueError(
        f"{what}: class ids {sorted(set(labels[bad].tolist()))[:10]} are outside the class map "
        f"[0, {num_classes}) ({int(bad.sum())} of {labels.size} entries)")
  return labels.astype(np.int32)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
  """Returns the confusion matrix int64 [C, C]; rows are true classes, columns predictions."""
  y_true = check_labels(y_true, num_classes, what="y_true")
  y_pred = check_labels(y_pred, num_classes, what="y_pred")
  if y_true.shape != y_pred.shape:
    raise ValueError(f"y_true has shape {y_true.shape} but y_pred has {y_pred.shape}")
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (y_true, y_pred), 1)
  return cm


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Top-1 accuracy in [0, 1] (micro, pooled over all nuclei)."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  if y_true.size == 0:
    raise ValueError("accuracy: no samples (empty split)")
  return float(np.mean(y_true == y_pred))


def per_class_f1(cm: np.ndarray) -> np.ndarray:
  """Per-class F1 float64 [C] from a confusion matrix; a class with no true and no predicted samples gets 0."""
  tp = np.diag(cm).astype(np.float64)
  denom = cm.sum(0) + cm.sum(1)
  return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int,
                           class_names: list[str] | None = None) -> dict:
  """All metrics of one run: accuracy, macro-F1, per-class F1 (by name) and the confusion matrix (lists).

  Accuracies and F1 are fractions in [0, 1]; reports multiply by 100.
  """
  cm = confusion_matrix(y_true, y_pred, num_classes)
  f1 = per_class_f1(cm)
  names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
  return {
      "accuracy": accuracy(y_true, y_pred),
      "macro_f1": float(f1.mean()),
      "per_class_f1": {n: float(v) for n, v in zip(names, f1)},
      "confusion_matrix": cm.tolist(),
      "class_names": names,
      "n": int(np.asarray(y_true).size),
  }
