"""Linear probe on frozen nucleus features (spec §5.4), one jit-compiled program.

`nn.Linear(D, C)` with weights ~ N(0, 0.01²) and bias 0, no feature normalisation, cross-entropy, SGD with
momentum 0.9 (PyTorch semantics: buf = m * buf + g; p -= lr * buf), lr 0.01, weight decay 0, batch 256 (shuffled
each epoch, drop_last), 100 epochs, cosine annealing stepped per epoch down to 0 (lr_e = lr * (1 + cos(pi e / E)) / 2
for epoch e = 0..E-1). After each epoch the head is scored on val and test; the reported epoch is the one with
the best val accuracy, with `>=` so that later epochs win ties, and its test accuracy is the result.

The whole run (all epochs, all batches, the per-epoch val/test scoring) is one `jax.jit` over `lax.scan`s.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from muse_jax.evaluation import metrics

SEED = 2025


def select_epoch(val_correct: np.ndarray) -> int:
  """Index of the epoch with the best val score; ties go to the **later** epoch (the `>=` rule)."""
  val_correct = np.asarray(val_correct)
  return int(np.flatnonzero(val_correct == val_correct.max())[-1])


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _probe_program(key, lrs, train_x, train_y, val_x, val_y, test_x, test_y, *, num_classes: int, epochs: int,
                   batch_size: int, momentum: float, weight_decay: float):
  """Runs every epoch; returns per-epoch heads [E, D, C] / [E, C], val and test correct counts [E], mean loss [E]."""
  n, d = train_x.shape
  n_batches = n // batch_size
  init_key, shuffle_key = jax.random.split(key)
  params = {"kernel": 0.01 * jax.random.normal(init_key, (d, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  mom = jax.tree.map(jnp.zeros_like, params)

  def loss_fn(p, x, y):
    logits = x @ p["kernel"] + p["bias"]
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  def correct(p, x, y):
    return jnp.sum(jnp.argmax(x @ p["kernel"] + p["bias"], axis=1) == y)

  def epoch_fn(carry, e):
    p, m = carry
    lr_e = lrs[e]
    perm = jax.random.permutation(jax.random.fold_in(shuffle_key, e), n)[:n_batches * batch_size]
    perm = perm.reshape(n_batches, batch_size)

    def step(c, idx):
      p, m = c
      loss, g = jax.value_and_grad(loss_fn)(p, train_x[idx], train_y[idx])
      g = jax.tree.map(lambda gi, pi: gi + weight_decay * pi, g, p)
      m = jax.tree.map(lambda mi, gi: momentum * mi + gi, m, g)
      p = jax.tree.map(lambda pi, mi: pi - lr_e * mi, p, m)
      return (p, m), loss

    (p, m), losses = jax.lax.scan(step, (p, m), perm)
    out = (p, correct(p, val_x, val_y), correct(p, test_x, test_y), jnp.mean(losses))
    return (p, m), out

  _, (heads, val_c, test_c, loss) = jax.lax.scan(epoch_fn, (params, mom), jnp.arange(epochs))
  return heads, val_c, test_c, loss


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                 val_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray,
                 num_classes: int, *, epochs: int = 100, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 0.0, batch_size: int = 256, seed: int = SEED,
                 class_names: list[str] | None = None) -> dict:
  """The §5.4 protocol on precomputed features.

  Args:
    train_features, val_features, test_features: float [N_split, D] nucleus features.
    train_labels, val_labels, test_labels: int [N_split] in [0, num_classes).
    num_classes: C.
    epochs, lr, momentum, weight_decay, batch_size, seed: the protocol's settings (defaults = §5.4). When the
      train split holds fewer nuclei than `batch_size`, one full batch per epoch is used (`batch_size_used`).

  Returns:
    A dict with `best_epoch` (0-based), `val_accuracy`, `accuracy` (test, the reported figure), `metrics` (test),
    per-epoch curves `val_acc`, `test_acc`, `train_loss`, the settings, and `head` = {'kernel' [D, C],
    'bias' [C]} numpy arrays of the selected epoch (used to initialise fine-tuning; not JSON).
  """
  for name, x in (("train", train_features), ("val", val_features), ("test", test_features)):
    if len(x) == 0:
      raise ValueError(f"linear_probe: the {name} split has no nuclei (empty split)")
  ys = [metrics.check_labels(y, num_classes, what=f"{n} labels")
        for n, y in (("train", train_labels), ("val", val_labels), ("test", test_labels))]
  xs = [np.asarray(x, np.float32) for x in (train_features, val_features, test_features)]
  for n, x, y in zip(("train", "val", "test"), xs, ys):
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"linear_probe: {n} has {x.shape[0]} features but {y.shape[0]} labels")
  if epochs < 1:
    raise ValueError(f"linear_probe: epochs must be >= 1, got {epochs}")
  bs = min(int(batch_size), xs[0].shape[0])
  lrs = np.array([cosine_lr(lr, e, epochs) for e in range(epochs)], np.float32)
  heads, val_c, test_c, loss = _probe_program(
      jax.random.key(seed), lrs, xs[0], ys[0], xs[1], ys[1], xs[2], ys[2], num_classes=num_classes,
      epochs=int(epochs), batch_size=bs, momentum=float(momentum),
      weight_decay=float(weight_decay))
  val_c, test_c, loss = np.asarray(val_c), np.asarray(test_c), np.asarray(loss)
  if not np.all(np.isfinite(loss)):
    raise FloatingPointError(f"linear_probe: non-finite training loss at epoch "
                             f"{int(np.flatnonzero(~np.isfinite(loss))[0])}")
  best = select_epoch(val_c)
  head = {"kernel": np.asarray(heads["kernel"][best]), "bias": np.asarray(heads["bias"][best])}
  test_pred = np.argmax(xs[2] @ head["kernel"] + head["bias"], axis=1)
  n_val, n_test = xs[1].shape[0], xs[2].shape[0]
  test_metrics = metrics.classification_metrics(ys[2], test_pred, num_classes, class_names)
  return {
      "protocol": "linear", "epochs": int(epochs), "lr": lr, "momentum": momentum,
      "weight_decay": weight_decay, "batch_size": int(batch_size), "batch_size_used": bs,
      "steps_per_epoch": xs[0].shape[0] // bs, "seed": seed,
      "n_train": int(xs[0].shape[0]), "n_val": n_val, "n_test": n_test,
      "best_epoch": best, "val_accuracy": float(val_c[best] / n_val),
      "accuracy": test_metrics["accuracy"], "metrics": test_metrics,
      "val_acc": (val_c / n_val).tolist(), "test_acc": (test_c / n_test).tolist(),
      "train_loss": loss.tolist(), "head": head,
  }


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
  """CosineAnnealingLR (eta_min 0) value for a 0-based epoch, stepped per epoch."""
  return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
