"""kNN protocol (spec §5.3) and metrics: a direct NumPy transcription, separable data, selection rules, bad input."""
import numpy as np
import pytest

from muse_jax.evaluation import knn, metrics


def _reference_knn(train, train_y, query, k, t, num_classes):
  """Literal transcription of §5.3, one query at a time."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  query = query / np.linalg.norm(query, axis=1, keepdims=True)
  preds = []
  for q in query:
    sim = train @ q
    nn = np.argsort(-sim, kind="stable")[:k]
    votes = np.zeros(num_classes)
    for j in nn:
      votes[train_y[j]] += np.exp(sim[j] / t)
    preds.append(int(np.argmax(votes)))
  return np.array(preds)


def test_vote_matches_numpy_transcription():
  rng = np.random.default_rng(0)
  train = rng.normal(size=(700, 16)).astype(np.float32)
  train_y = rng.integers(0, 4, size=700)
  query = rng.normal(size=(90, 16)).astype(np.float32)
  ks = (1, 10, 20, 100, 200, 500, 700)
  got = knn.knn_predict(train, train_y, query, 4, ks, 0.07, chunk=32)
  for k in ks:
    np.testing.assert_array_equal(got[k], _reference_knn(train, train_y, query, k, 0.07, 4), err_msg=f"k={k}")


def test_separable_clusters_are_perfect_and_noise_is_chance():
  rng = np.random.default_rng(1)
  centers = 5 * np.eye(3, 8)
  tr_y, te_y = rng.integers(0, 3, 600), rng.integers(0, 3, 300)
  tr = centers[tr_y] + rng.normal(size=(600, 8))
  te = centers[te_y] + rng.normal(size=(300, 8))
  res = knn.knn_eval(tr, tr_y, te, te_y, 3, te, te_y)
  assert res["official"]["accuracy"] == 1.0
  assert res["honest"]["accuracy"] == 1.0
  noise = knn.knn_eval(rng.normal(size=(600, 8)), tr_y, rng.normal(size=(300, 8)), te_y, 3)
  assert 0.2 < noise["official"]["accuracy"] < 0.5


def test_official_is_best_on_test_and_honest_is_best_on_val():
  rng = np.random.default_rng(2)
  tr, tr_y = rng.normal(size=(800, 6)), rng.integers(0, 3, 800)
  te, te_y = rng.normal(size=(200, 6)), rng.integers(0, 3, 200)
  va, va_y = rng.normal(size=(150, 6)), rng.integers(0, 3, 150)
  res = knn.knn_eval(tr, tr_y, te, te_y, 3, va, va_y)
  test_acc = {int(k): v for k, v in res["test_acc_by_k"].items()}
  val_acc = {int(k): v for k, v in res["val_acc_by_k"].items()}
  assert res["official"]["accuracy"] == max(test_acc.values())
  assert res["official"]["k"] == min(k for k, v in test_acc.items() if v == max(test_acc.values()))
  assert res["honest"]["k"] == min(k for k, v in val_acc.items() if v == max(val_acc.values()))
  assert res["honest"]["accuracy"] == test_acc[res["honest"]["k"]]


def test_k_larger_than_train_is_clamped():
  rng = np.random.default_rng(3)
  tr, tr_y = rng.normal(size=(30, 4)), rng.integers(0, 2, 30)
  res = knn.knn_eval(tr, tr_y, tr, tr_y, 2)
  assert res["k_clamped"] and set(res["test_acc_by_k"]) == {"10", "20", "100", "200", "500"}


def test_metrics_known_answer():
  y = np.array([0, 0, 1, 1, 2, 2])
  p = np.array([0, 1, 1, 1, 2, 0])
  m = metrics.classification_metrics(y, p, 3, ["a", "b", "c"])
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
  np.testing.assert_allclose(list(m["per_class_f1"].values()), [0.5, 0.8, 2 / 3])
  assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_bad_input_errors():
  x = np.ones((5, 3), np.float32)
  with pytest.raises(ValueError, match="outside the class map"):
    knn.knn_predict(x, np.array([0, 1, 2, 3, 0]), x, 3)
  with pytest.raises(ValueError, match="empty split"):
    knn.knn_predict(x[:0], np.zeros(0, int), x, 3)
  with pytest.raises(ValueError, match="empty split"):
    knn.knn_predict(x, np.zeros(5, int), x[:0], 3)
  with pytest.raises(ValueError, match="empty split"):
    metrics.accuracy(np.zeros(0), np.zeros(0))
