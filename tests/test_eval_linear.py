"""Linear probe (spec §5.4): separable data, val selection with later-epoch tie rule, schedule, bad input."""
import numpy as np
import pytest

from muse_jax.evaluation import linear


def _data(rng, n, d=16, scale=3.0, c=3):
  y = rng.integers(0, c, n)
  return scale * np.eye(c, d)[y] + rng.normal(size=(n, d)), y


def test_separable_features_give_high_accuracy_and_selection_follows_val():
  rng = np.random.default_rng(0)
  tr, va, te = _data(rng, 1200), _data(rng, 300), _data(rng, 300)
  res = linear.linear_probe(*tr, *va, *te, 3, epochs=20)
  assert res["accuracy"] > 0.9
  assert res["steps_per_epoch"] == 1200 // 256
  val = np.round(np.asarray(res["val_acc"]) * 300).astype(int)
  assert res["best_epoch"] == int(np.flatnonzero(val == val.max())[-1])
  assert res["accuracy"] == pytest.approx(res["test_acc"][res["best_epoch"]], abs=1 / 300 + 1e-9)
  assert res["head"]["kernel"].shape == (16, 3)
  assert res["train_loss"][-1] < res["train_loss"][0]


def test_random_labels_stay_near_chance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(900, 8))
  y = rng.integers(0, 3, 900)
  res = linear.linear_probe(x[:600], y[:600], x[600:750], y[600:750], x[750:], y[750:], 3, epochs=5)
  assert res["accuracy"] < 0.5


def test_deterministic_given_seed():
  rng = np.random.default_rng(2)
  tr, va, te = _data(rng, 600), _data(rng, 100), _data(rng, 100)
  a = linear.linear_probe(*tr, *va, *te, 3, epochs=3, seed=7)
  b = linear.linear_probe(*tr, *va, *te, 3, epochs=3, seed=7)
  np.testing.assert_array_equal(a["head"]["kernel"], b["head"]["kernel"])


def test_tie_rule_later_epoch_wins():
  assert linear.select_epoch([3, 5, 5, 4]) == 2
  assert linear.select_epoch([5, 5, 5]) == 2
  assert linear.select_epoch([1, 9, 2]) == 1


def test_cosine_schedule_per_epoch():
  assert linear.cosine_lr(0.01, 0, 100) == pytest.approx(0.01)
  assert linear.cosine_lr(0.01, 50, 100) == pytest.approx(0.005)
  assert linear.cosine_lr(0.01, 99, 100) == pytest.approx(0.01 * 0.5 * (1 + np.cos(np.pi * 0.99)))


def test_bad_input_errors():
  rng = np.random.default_rng(3)
  x, y = _data(rng, 50)
  with pytest.raises(ValueError, match="val split has no nuclei"):
    linear.linear_probe(x, y, x[:0], y[:0], x, y, 3, epochs=1)
  with pytest.raises(ValueError, match="outside the class map"):
    linear.linear_probe(x, y, x, y, x, np.full_like(y, 5), 3, epochs=1)
