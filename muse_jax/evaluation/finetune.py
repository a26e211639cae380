"""End-to-end fine-tuning evaluation (spec §5.5, the LP-then-FT protocol).

The backbone + decoder and a linear head on the sampled nucleus features are trained together. The head starts
from the best linear-probe head (§5.4), so the linear probe runs first. AdamW (b1 0.9, b2 0.999, eps 1e-8, the
PyTorch defaults), lr 1e-5 for ViTs and 4e-5 for ResNet-50, weight decay 0, batches of 32 tiles (every labelled
nucleus in them; cross-entropy averaged over those nuclei), shuffled each epoch, the last smaller batch kept,
10 epochs, cosine annealing stepped per epoch down to 0, no augmentation, BatchNorm in train mode (batch
statistics, running averages updated). Drop-path is switched off (an inference: [R] calls `model.train()` on the
released model, whose drop-path rate we take as 0). After each epoch the model is scored on val in eval mode; the
epoch with the best val accuracy (`>=`: later epochs win ties) is kept and its test accuracy reported.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from muse_jax.evaluation import features as features_lib
from muse_jax.evaluation import linear, metrics


def default_lr(model_cfg: ml_collections.ConfigDict) -> float:
  """1e-5 for ViTs, 4e-5 for ResNet-50 (the README's recommendation)."""
  return 4e-5 if model_cfg.arch == "resnet50" else 1e-5


def _batch_arrays(tiles: Sequence[dict], masks: Sequence[np.ndarray], n_pad: int):
  size = tiles[0]["image"].shape[0]
  b = len(tiles)
  images = np.zeros((b, size, size, 3), np.uint8)
  coords = np.zeros((b, n_pad, 2), np.float32)
  labels = np.zeros((b, n_pad), np.int32)
  mask = np.zeros((b, n_pad), bool)
  for i, (t, m) in enumerate(zip(tiles, masks)):
    n = len(t["coords"])
    images[i] = t["image"]
    coords[i, :n] = t["coords"]
    labels[i, :n] = np.maximum(np.asarray(t["classes"]), 0)
    mask[i, :n] = m
  return images, coords, labels, mask


def finetune(model_cfg: ml_collections.ConfigDict, variables: dict, head: dict, train_tiles: Sequence[dict],
             val_tiles: Sequence[dict], test_tiles: Sequence[dict], *, num_classes: int, epochs: int = 10,
             lr: float | None = None, weight_decay: float = 0.0, batch_size: int = 32, seed: int = linear.SEED,
             eval_batch_size: int = 10, class_names: list[str] | None = None,
             progress: Callable[[int], None] | None = None) -> dict:
  """Fine-tunes backbone + head on `train_tiles` and reports the val-selected epoch's test accuracy.

  Args:
    model_cfg, variables: the backbone (`backbone_io.load_backbone`); checked against each other.
    head: {'kernel' [D, C], 'bias' [C]}: the best linear-probe head (`linear.linear_probe(...)['head']`).
    train_tiles, val_tiles, test_tiles: evaluation tiles (see `features.extract_features`).
    num_classes: C.
    epochs, lr (default `default_lr`), weight_decay, batch_size, seed: §5.5 settings.
    eval_batch_size: tiles per eval-mode call.
    progress: called with 1 after each training step (for a progress bar).

  Returns:
    A dict with `best_epoch` (0-based), `val_accuracy`, `accuracy` (test), `metrics` (test), per-epoch
    `val_acc` and `train_loss`, and the settings.
  """
  for name, tiles in (("train", train_tiles), ("val", val_tiles), ("test", test_tiles)):
    if not tiles:
      raise ValueError(f"finetune: split {name!r} has no tiles (empty split)")
  from muse_jax.models import build_backbone  # pylint: disable=import-outside-toplevel

  size = train_tiles[0]["image"].shape[0]
  features_lib.check_image_size(model_cfg, size)
  variables = features_lib.eval_variables(model_cfg, variables, source="backbone variables")
  kernel = np.asarray(head["kernel"], np.float32)
  if kernel.shape != (int(model_cfg.map_dim), num_classes):
    raise ValueError(f"finetune: head kernel has shape {kernel.shape}, expected {(int(model_cfg.map_dim), num_classes)} "
                     f"(map_dim of {model_cfg.get('name', model_cfg.arch)!r} x classes)")
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  if "drop_path_rate" in cfg:
    cfg.drop_path_rate = 0.0
  module = build_backbone(cfg)
  lr = default_lr(model_cfg) if lr is None else float(lr)
  n_pad = features_lib.pad_size(list(train_tiles) + list(val_tiles) + list(test_tiles))
  train_masks = [features_lib.labelled_mask(t, num_classes) for t in train_tiles]
  steps_per_epoch = math.ceil(len(train_tiles) / batch_size)

  def schedule(step):
    epoch = step // steps_per_epoch
    return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))

  tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay)
  from muse_jax import ops  # pylint: disable=import-outside-toplevel

  params = {"backbone": variables["params"], "head": {"kernel": kernel, "bias": np.asarray(head["bias"], np.float32)}}
  batch_stats = variables.get("batch_stats", {})
  mesh = features_lib.data_mesh()
  replicated = NamedSharding(mesh, P())
  params, batch_stats = jax.device_put((params, batch_stats), replicated)
  opt_state = jax.jit(tx.init)(params)

  def loss_fn(params, batch_stats, images, coords, labels, mask):
    v = {"params": params["backbone"]}
    if batch_stats:
      v["batch_stats"] = batch_stats
    out, updates = module.apply(v, ops.normalize_images(images), train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.key(0)})
    feats = ops.sample_nuclei(out["f_map"], coords, mask, size)
    logits = feats @ params["head"]["kernel"] + params["head"]["bias"]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    loss = jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)
    return loss, updates.get("batch_stats", batch_stats)

  @jax.jit
  def train_step(params, batch_stats, opt_state, images, coords, labels, mask):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, coords, labels, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  sampler = features_lib.cached_sampler(cfg, size)

  def predict(params, batch_stats, tiles, split):
    v = {"params": params["backbone"]}
    if batch_stats:
      v["batch_stats"] = batch_stats
    out = features_lib.extract_features(tiles, features_lib.BoundFeatureFn(sampler, v, mesh),
                                        num_classes=num_classes, batch_size=eval_batch_size, n_pad=n_pad,
                                        split=split)
    h = jax.device_get(params["head"])
    return np.argmax(out["features"] @ h["kernel"] + h["bias"], axis=1), out["labels"]

  rng = np.random.default_rng(seed)
  val_acc, losses = [], []
  best = None
  for epoch in range(epochs):
    order = rng.permutation(len(train_tiles))
    epoch_loss = []
    for s in range(steps_per_epoch):
      idx = order[s * batch_size:(s + 1) * batch_size]
      arrays = _batch_arrays([train_tiles[i] for i in idx], [train_masks[i] for i in idx], n_pad)
      spec = P("data") if len(idx) % mesh.size == 0 else P()
      arrays = jax.device_put(arrays, NamedSharding(mesh, spec))
      params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, *arrays)
      epoch_loss.append(float(loss))
      if progress is not None:
        progress(1)
    if not np.all(np.isfinite(epoch_loss)):
      raise FloatingPointError(f"finetune: non-finite loss in epoch {epoch}")
    pred, y = predict(params, batch_stats, val_tiles, "val")
    val_acc.append(metrics.accuracy(y, pred))
    losses.append(float(np.mean(epoch_loss)))
    if best is None or val_acc[-1] >= val_acc[best[0]]:
      best = (epoch, jax.device_get((params, batch_stats)))
  best_epoch, (best_params, best_stats) = best
  pred, y = predict(jax.device_put(best_params, replicated), jax.device_put(best_stats, replicated), test_tiles,
                    "test")
  test_metrics = metrics.classification_metrics(y, pred, num_classes, class_names)
  return {
      "protocol": "finetune", "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
      "optimizer": "adamw(b1=0.9, b2=0.999, eps=1e-8)", "schedule": "cosine per epoch to 0", "seed": seed,
      "bn": "train mode (batch statistics)", "drop_path_rate": 0.0, "steps_per_epoch": steps_per_epoch,
      "n_train_tiles": len(train_tiles), "best_epoch": best_epoch, "val_accuracy": val_acc[best_epoch],
      "accuracy": test_metrics["accuracy"], "metrics": test_metrics, "val_acc": val_acc, "train_loss": losses,
  }
