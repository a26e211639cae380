"""Weighted kNN classification of nucleus features (spec §5.3, the DINO kNN).

Features are L2-normalised; each query gets the cosine similarity to **all** train nuclei; the top k neighbours
vote with weight exp(sim / T), T = 0.07; the prediction is the argmax of the summed weights (ties go to the lower
class id). The official figure is the best k on **test**; we also report the k chosen on val ("honest").

The similarity matrix is computed in chunks of queries with a NumPy (BLAS) matmul, and the top-k_max neighbours
per query come from `np.argpartition`, so 8,900 x 18,600 x 384 takes seconds on 2 cores.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from muse_jax.evaluation import metrics

KS = (10, 20, 100, 200, 500)
TEMPERATURE = 0.07


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
  """Row-wise L2 normalisation, float32 [N, D] (a zero row stays zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray, query_features: np.ndarray,
                num_classes: int, ks: Sequence[int] = KS, temperature: float = TEMPERATURE,
                chunk: int = 1024) -> dict[int, np.ndarray]:
  """Weighted-kNN predictions for several k at once.

  Args:
    train_features: float [N_train, D] (not necessarily normalised).
    train_labels: int [N_train], ids in [0, num_classes).
    query_features: float [N_query, D].
    num_classes: C.
    ks: neighbour counts; a k above N_train is clamped to N_train (the returned key stays k).
    temperature: T in exp(sim / T).
    chunk: queries per matmul block (memory ~ chunk * N_train * 4 bytes).

  Returns:
    {k: int32 [N_query] predictions}.
  """
  if len(train_features) == 0:
    raise ValueError("knn_predict: the train split has no nuclei (empty split)")
  if len(query_features) == 0:
    raise ValueError("knn_predict: the query split has no nuclei (empty split)")
  if train_features.shape[1] != query_features.shape[1]:
    raise ValueError(f"knn_predict: train features have dim {train_features.shape[1]}, "
                     f"query features {query_features.shape[1]}")
  labels = metrics.check_labels(train_labels, num_classes, what="train labels")
  if labels.shape[0] != train_features.shape[0]:
    raise ValueError(f"knn_predict: {train_features.shape[0]} train features but {labels.shape[0]} labels")
  train = l2_normalize(train_features)
  query = l2_normalize(query_features)
  n_train = train.shape[0]
  ks = [int(k) for k in ks]
  k_max = min(max(ks), n_train)
  onehot = np.eye(num_classes, dtype=np.float64)[labels]  # [N_train, C]
  out = {k: np.empty(query.shape[0], np.int32) for k in ks}
  for start in range(0, query.shape[0], chunk):
    sim = query[start:start + chunk] @ train.T  # [b, N_train]
    if k_max < n_train:
      idx = np.argpartition(-sim, k_max - 1, axis=1)[:, :k_max]
    else:
      idx = np.broadcast_to(np.arange(n_train), (sim.shape[0], n_train))
    top = np.take_along_axis(sim, idx, axis=1)
    order = np.argsort(-top, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    top = np.take_along_axis(top, order, axis=1)
    weights = np.exp(top.astype(np.float64) / temperature)  # [b, k_max]
    votes = weights[:, :, None] * onehot[idx]  # [b, k_max, C]
    cum = np.cumsum(votes, axis=1)
    for k in ks:
      out[k][start:start + chunk] = np.argmax(cum[:, min(k, k_max) - 1], axis=1)
  return out


def knn_eval(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
             test_labels: np.ndarray, num_classes: int, val_features: np.ndarray | None = None,
             val_labels: np.ndarray | None = None, ks: Sequence[int] = KS,
             temperature: float = TEMPERATURE, class_names: list[str] | None = None) -> dict:
  """The full §5.3 protocol: test (and val) accuracy for every k, the official and the honest figure.

  Returns:
    A dict with `test_acc_by_k` {k: acc}, `official` {k, accuracy, metrics} = the best k on test (the
    published convention, optimistic; ties go to the smaller k), and, when val is given, `val_acc_by_k` and
    `honest` {k, val_accuracy, accuracy, metrics} = the k with the best val accuracy (ties: smaller k) and its
    test accuracy. `k_clamped` is True when some k exceeded the number of train nuclei.
  """
  test_labels = metrics.check_labels(test_labels, num_classes, what="test labels")
  preds = knn_predict(train_features, train_labels, test_features, num_classes, ks, temperature)
  test_acc = {k: metrics.accuracy(test_labels, p) for k, p in preds.items()}
  best_k = max(ks, key=lambda k: (test_acc[k], -k))
  result = {
      "protocol": "knn", "ks": list(ks), "temperature": temperature,
      "n_train": int(len(train_features)), "n_test": int(len(test_features)),
      "k_clamped": bool(max(ks) > len(train_features)),
      "test_acc_by_k": {str(k): v for k, v in test_acc.items()},
      "official": {"k": best_k, "accuracy": test_acc[best_k],
                   "metrics": metrics.classification_metrics(test_labels, preds[best_k], num_classes,
                                                             class_names)},
  }
  if val_features is not None:
    val_labels = metrics.check_labels(val_labels, num_classes, what="val labels")
    vpreds = knn_predict(train_features, train_labels, val_features, num_classes, ks, temperature)
    val_acc = {k: metrics.accuracy(val_labels, p) for k, p in vpreds.items()}
    k_val = max(ks, key=lambda k: (val_acc[k], -k))
    result["val_acc_by_k"] = {str(k): v for k, v in val_acc.items()}
    result["honest"] = {"k": k_val, "val_accuracy": val_acc[k_val], "accuracy": test_acc[k_val],
                        "metrics": metrics.classification_metrics(test_labels, preds[k_val], num_classes,
                                                                  class_names)}
  return result
