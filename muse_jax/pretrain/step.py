"""The MUSE pretraining step: one `jax.jit` over global arrays on a mesh, state donated.

Views are forwarded per resolution group (all global views of the batch together, then all local views), so the
BatchNorm statistics are per group and over the global batch (under jit the batch axis is global; XLA inserts the
cross-device reductions). The teacher runs BN in train mode on the global views with drop-path 0; the student uses
drop-path with keys folded with the step.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from muse_jax import ops
from muse_jax.pretrain import augment
from muse_jax.pretrain import losses
from muse_jax.pretrain import optim as optim_lib
from muse_jax.pretrain import teacher as teacher_lib
from muse_jax.pretrain.state import Networks, State


NU_HEALTH_NUCLEI = 16  # nucleus slots per global view that the nucleus head's health metrics are computed on


def _flat_views(group: dict[str, jax.Array]) -> tuple[jax.Array, int, int]:
  """[B, V, S, S, 3] uint8 -> normalised float [B*V, S, S, 3] (batch-major, keeps the batch sharding)."""
  img = group["images"]
  b, v = img.shape[:2]
  return ops.normalize_images(img.reshape((b * v,) + img.shape[2:])), b, v


def _per_view(x: jax.Array, b: int, v: int) -> list[jax.Array]:
  """[B*V, ...] -> list of V arrays [B, ...]."""
  x = x.reshape((b, v) + x.shape[1:])
  return [x[:, i] for i in range(v)]


def _backbone(module, variables, images, train: bool, rng=None):
  """Runs a backbone in train mode (BN batch stats, mutable) and returns (out, new_batch_stats)."""
  kwargs = {"rngs": {"dropout": rng}} if rng is not None else {}
  if variables.get("batch_stats"):
    out, upd = module.apply(variables, images, train=train, mutable=["batch_stats"], **kwargs)
    return out, upd["batch_stats"]
  out = module.apply(variables, images, train=train, **kwargs)
  return out, variables.get("batch_stats", {})


def _nucleus_logits(head, head_params, f_map, group, b, v, image_size, return_features: bool = False):
  """Samples `f_map` [B*V, h, w, C] at the group's nuclei and applies the nucleus head: V arrays [B, M, K].

  With `return_features`, returns `(logits, feats)` where feats is [B*V, M, C] (the sampled backbone features).
  """
  m = group["coords"].shape[2]
  coords = group["coords"].reshape(b * v, m, 2)
  mask = group["mask"].reshape(b * v, m)
  feats = ops.sample_nuclei(f_map, coords, mask, image_size)  # [B*V, M, C]
  # Padded slots are zeros; a zero vector has an infinite-gradient L2 norm inside the head, which turns the masked
  # (zero-weight) terms into NaN gradients. Give padded slots a constant non-zero feature instead (they never
  # contribute to a loss or a center).
  feats = jnp.where(mask[..., None], feats, jnp.ones_like(feats))
  logits = head.apply({"params": head_params}, feats)
  if return_features:
    return _per_view(logits, b, v), feats
  return _per_view(logits, b, v)


def loss_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The loss fields added by issue #21 with their defaults (configs written before them lack them).

  `loss.image_targets` / `loss.nu_targets`: 'center' (DINO: centred, sharpened softmax) or 'sinkhorn'
  (Sinkhorn-Knopp over the global batch, `loss.sinkhorn_iters` iterations); `loss.w_koleo_nu`: weight of a KoLeo
  term on the student's sampled nucleus features of the global views (0 = off).
  """
  loss = config.loss
  return {"image_targets": str(loss.get("image_targets", "center")), "nu_targets": str(loss.get("nu_targets", "center")),
          "sinkhorn_iters": int(loss.get("sinkhorn_iters", 3)), "w_koleo_nu": float(loss.get("w_koleo_nu", 0.0))}


def compute_losses(nets: Networks, params, batch_stats, teacher_params, teacher_batch_stats, centers,
                   batch: dict[str, Any], rng: jax.Array, teacher_temp, config: ml_collections.ConfigDict):
  """Forward teacher and student and compute the losses.

  Returns:
    `(loss, aux)`; aux holds the new student/teacher batch stats, the raw teacher logits statistics for the
    centers, and scalar metrics.
  """
  w_img, w_nu = float(config.loss.w_image), float(config.loss.w_nu)
  opts = loss_options(config)
  student_temp = config.optim.student_temp
  groups = ["global"] + (["local"] if "local" in batch else [])
  teacher_params = jax.lax.stop_gradient(teacher_params)

  # Teacher: global views only, BN in train mode, no drop-path.
  g = batch["global"]
  g_img, b, vg = _flat_views(g)
  g_size = g["images"].shape[2]
  t_out, t_bs = _backbone(nets.teacher, {"params": teacher_params["backbone"],
                                         "batch_stats": teacher_batch_stats["backbone"]}, g_img, train=True)
  t_out = jax.lax.stop_gradient(t_out)

  # Student: each resolution group separately; BN stats carried from one group to the next.
  s_bs = batch_stats["backbone"]
  s_outs = {}
  for gi, name in enumerate(groups):
    grp = batch[name]
    img, bb, vv = (g_img, b, vg) if name == "global" else _flat_views(grp)
    out, s_bs = _backbone(nets.student, {"params": params["backbone"], "batch_stats": s_bs}, img, train=True,
                          rng=jax.random.fold_in(rng, gi))
    s_outs[name] = (out, bb, vv, grp["images"].shape[2])

  metrics = {}
  loss = jnp.zeros((), jnp.float32)
  new_centers = dict(centers)
  if nets.cls_head is not None:
    t_cls = nets.cls_head.apply({"params": teacher_params["cls_head"]}, t_out["f_cls"])  # [B*Vg, K]
    t_cls = jnp.stack(_per_view(t_cls, b, vg))  # [Vg, B, K]
    s_cls = jnp.concatenate([
        jnp.stack(_per_view(nets.cls_head.apply({"params": params["cls_head"]}, o["f_cls"]), bb, vv))
        for (o, bb, vv, _) in s_outs.values()])  # [Vs, B, K]
    img_targets = None
    if opts["image_targets"] == "sinkhorn":
      vg_, b_, k_ = t_cls.shape
      img_targets = losses.sinkhorn_knopp(t_cls.reshape(vg_ * b_, k_), teacher_temp,
                                          n_iters=opts["sinkhorn_iters"]).reshape(vg_, b_, k_)
    l_img = losses.dino_loss(t_cls, s_cls, centers["cls"], teacher_temp, student_temp, teacher_targets=img_targets)
    loss = loss + w_img * l_img
    metrics["loss_image"] = l_img
    k_cls = t_cls.shape[-1]
    health = losses.head_health(t_cls.reshape(vg * b, k_cls), s_cls[:vg].reshape(vg * b, k_cls), centers["cls"],
                                teacher_temp, student_temp)
    metrics.update({f"image_{k}": v for k, v in health.items()})
    new_centers["cls"] = losses.update_center(centers["cls"], t_cls.astype(jnp.float32).mean(axis=(0, 1)),
                                              config.optim.center_momentum)
  if nets.nu_head is not None:
    t_nu = _nucleus_logits(nets.nu_head, teacher_params["nu_head"], t_out["f_map"], g, b, vg, g_size)
    t_nu = [jax.lax.stop_gradient(x) for x in t_nu]
    s_nu, s_ids, s_mask = [], [], []
    for name, (o, bb, vv, size) in s_outs.items():
      grp = batch[name]
      logits, feats = _nucleus_logits(nets.nu_head, params["nu_head"], o["f_map"], grp, bb, vv, size,
                                      return_features=True)
      s_nu += logits
      s_ids += [grp["ids"][:, i] for i in range(vv)]
      s_mask += [grp["mask"][:, i] for i in range(vv)]
      if name == "global" and opts["w_koleo_nu"] > 0:
        # KoLeo per global view over the global batch's nuclei ([B*M, C] each): spreads the nucleus features.
        c = feats.shape[-1]
        per_view = feats.reshape(bb, vv, -1, c)  # batch-major, as _flat_views
        kl_terms = [losses.koleo_loss(per_view[:, i].reshape(-1, c), grp["mask"][:, i].reshape(-1))
                    for i in range(vv)]
        l_koleo = sum(kl_terms) / len(kl_terms)
        loss = loss + opts["w_koleo_nu"] * l_koleo
        metrics["loss_koleo_nu"] = l_koleo
    nu_targets = None
    if opts["nu_targets"] == "sinkhorn":
      # One Sinkhorn-Knopp over every nucleus of every global view (all views of a group share M).
      stacked = jnp.stack(t_nu)  # [Vg, B, M, K]
      q = losses.sinkhorn_knopp(stacked.reshape(-1, stacked.shape[-1]), teacher_temp,
                                weights=jnp.moveaxis(g["mask"], 1, 0).reshape(-1), n_iters=opts["sinkhorn_iters"])
      nu_targets = list(q.reshape(stacked.shape))
    nu = losses.nulo_loss(t_nu, [g["ids"][:, i] for i in range(vg)], [g["mask"][:, i] for i in range(vg)],
                          s_nu, s_ids, s_mask, centers["nu"], teacher_temp, student_temp, teacher_targets=nu_targets)
    loss = loss + w_nu * nu["loss"]
    # Diagnostics only: on the first NU_HEALTH_NUCLEI slots of each global view (valid nuclei come first), so that
    # a second softmax over [B, M, K_nu] (8.6 GB at vit_s16's batch 512, M 256, K 8192) is not added to the step.
    k_nu, n_h = t_nu[0].shape[-1], min(NU_HEALTH_NUCLEI, t_nu[0].shape[1])
    health = losses.head_health(
        jnp.concatenate([x[:, :n_h].reshape(-1, k_nu) for x in t_nu]),
        jnp.concatenate([x[:, :n_h].reshape(-1, k_nu) for x in s_nu[:vg]]), centers["nu"], teacher_temp,
        student_temp, weights=jnp.concatenate([g["mask"][:, i, :n_h].reshape(-1) for i in range(vg)]))
    metrics.update({f"nu_{k}": v for k, v in health.items()})
    metrics["loss_nu"] = nu["loss"]
    metrics["shared_nuclei"] = nu["shared"]
    metrics["valid_pairs"] = nu["valid_frac"]
    count = nu["center_count"]
    new_centers["nu"] = losses.update_center(centers["nu"], nu["center_sum"] / jnp.maximum(count, 1.0),
                                             config.optim.center_momentum, has_data=count > 0)
  metrics["loss"] = loss
  aux = {"batch_stats": {"backbone": s_bs}, "teacher_batch_stats": {"backbone": t_bs},
         "centers": new_centers, "metrics": metrics}
  return loss, aux


def teacher_student_distance(teacher_params, student_params) -> jax.Array:
  """Relative L2 distance `||teacher - student|| / ||student||` over all leaves (float32 scalar).

  Near 0 for the whole run means the EMA teacher is a copy of the student (momentum too low); a teacher that stays
  at its initialisation while the student moves shows up in the health summary as a large, growing value.
  """
  diff = jax.tree.map(lambda t, s: jnp.sum((t.astype(jnp.float32) - s.astype(jnp.float32)) ** 2),
                      teacher_params, student_params)
  norm = jax.tree.map(lambda s: jnp.sum(s.astype(jnp.float32) ** 2), student_params)
  return jnp.sqrt(sum(jax.tree.leaves(diff)) / jnp.maximum(sum(jax.tree.leaves(norm)), 1e-30))


def make_step_fn(config: ml_collections.ConfigDict, nets: Networks, tx: optax.GradientTransformation,
                 schedules: optim_lib.Schedules) -> Callable[[State, dict, jax.Array], tuple[State, dict]]:
  """The pure (un-jitted) step `(state, batch, base_rng) -> (new_state, metrics)`."""

  def step_fn(state: State, batch: dict, base_rng: jax.Array):
    step = state["step"]
    rng = jax.random.fold_in(base_rng, step)
    teacher_params = teacher_lib.get_teacher(state["opt_state"])
    tt = schedules.teacher_temp(step)
    if augment.needs_render(batch):
      # data.augment_on='device': resize, flips / rotations and photometric augmentations here, keyed by the step.
      batch = augment.render(batch, jax.random.fold_in(rng, augment.AUG_SALT), config.data)

    def loss_fn(params):
      return compute_losses(nets, params, state["batch_stats"], teacher_params, state["teacher_batch_stats"],
                            state["centers"], batch, rng, tt, config)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(aux["metrics"])
    metrics.update(grad_norm=optax.global_norm(grads), lr=schedules.lr(step), wd=schedules.wd(step),
                   momentum=schedules.momentum(step), teacher_temp=tt,
                   teacher_student_dist=teacher_student_distance(teacher_params["backbone"],
                                                                 state["params"]["backbone"]))
    new_state = {
        "step": step + 1,
        "params": params,
        "batch_stats": aux["batch_stats"],
        "opt_state": opt_state,
        "teacher_batch_stats": aux["teacher_batch_stats"],
        "centers": aux["centers"],
    }
    return new_state, metrics

  return step_fn


def jit_step(step_fn, state_shardings, batch_sharding, replicated):
  """Jits the step with explicit shardings; the state (argument 0) is donated."""
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))
