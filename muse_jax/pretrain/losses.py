"""Pure loss functions for MUSE pretraining (DINO image loss, NuLo nucleus loss, centers, temperature schedule).

Conventions: `K` is the number of prototypes of a head, `B` the per-step batch (global batch inside jit), `Vg` the
number of global views (the teacher sees only those), `Vs = Vg + Vl` the number of student views, ordered globals
first then locals. Teacher logits are *not* yet centred or sharpened; the functions below do it.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_steps: int):
  """DINO teacher temperature: linear warm-up `warmup_temp -> temp` over `warmup_steps`, then constant.

  Returns:
    A function `step -> float32 scalar` usable inside jit.
  """
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps <= 0:
      return jnp.asarray(temp, jnp.float32)
    frac = jnp.clip(step / float(warmup_steps), 0.0, 1.0)
    return jnp.asarray(warmup_temp + frac * (temp - warmup_temp), jnp.float32)
  return schedule


def teacher_probs(logits: jax.Array, center: jax.Array, temperature) -> jax.Array:
  """Centred, sharpened teacher distribution `softmax((logits - center) / temperature)`; float32 [..., K]."""
  logits = logits.astype(jnp.float32)
  return jax.nn.softmax((logits - center) / temperature, axis=-1)


def student_log_probs(logits: jax.Array, temperature) -> jax.Array:
  """Student log-distribution `log_softmax(logits / temperature)`; float32 [..., K]."""
  return jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)


def dino_loss(teacher_logits: jax.Array, student_logits: jax.Array, center: jax.Array, teacher_temp,
              student_temp, teacher_targets: jax.Array | None = None) -> jax.Array:
  """Image-level DINO cross-entropy.

  Every teacher global view `i` is compared with every student view `j != i` (student views `0..Vg-1` are the same
  global crops as the teacher's, the rest are local crops). The teacher side is stop-gradiented.

  Args:
    teacher_logits: [Vg, B, K] teacher CLS-head logits on the global views.
    student_logits: [Vs, B, K] student CLS-head logits on all views, globals first.
    center: [K] teacher center.
    teacher_temp: scalar teacher temperature.
    student_temp: scalar student temperature.
    teacher_targets: optional [Vg, B, K] teacher distributions used instead of the centred, sharpened softmax
      (e.g. `sinkhorn_knopp`).

  Returns:
    Scalar float32: mean over (pairs, batch) of `-sum_k P_t log P_s`.
  """
  vg, vs = teacher_logits.shape[0], student_logits.shape[0]
  if vs < vg:
    raise ValueError(f"student has {vs} views, fewer than the teacher's {vg} global views")
  if teacher_targets is None:
    p_t = jax.lax.stop_gradient(teacher_probs(teacher_logits, center, teacher_temp))  # [Vg,B,K]
  else:
    p_t = jax.lax.stop_gradient(teacher_targets.astype(jnp.float32))
  log_p_s = student_log_probs(student_logits, student_temp)  # [Vs,B,K]
  ce = -jnp.einsum("ibk,jbk->ijb", p_t, log_p_s)  # [Vg,Vs,B]
  pair_mask = 1.0 - np.eye(vg, vs, dtype=np.float32)  # j != i
  n_pairs = float(pair_mask.sum())
  if n_pairs == 0:
    return jnp.zeros((), jnp.float32)
  return jnp.sum(ce.mean(-1) * pair_mask) / n_pairs


def _same_nucleus(ids_a: jax.Array, mask_a: jax.Array, ids_b: jax.Array, mask_b: jax.Array) -> jax.Array:
  """[B, Ma, Mb] bool: slot a of one view and slot b of another hold the same (valid) nucleus."""
  return (ids_a[:, :, None] == ids_b[:, None, :]) & mask_a[:, :, None] & mask_b[:, None, :]


def match_nuclei(teacher_ids: jax.Array, teacher_mask: jax.Array, student_ids: jax.Array,
                 student_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Matches the nuclei of one teacher view to those of one student view by id.

  Ids are unique within a view (padding has id -1 and mask False).

  Args:
    teacher_ids: [B, Mi] int ids of teacher-view nuclei.
    teacher_mask: [B, Mi] bool validity.
    student_ids: [B, Mj] int ids of student-view nuclei.
    student_mask: [B, Mj] bool validity.

  Returns:
    `(index, matched)`: index [B, Mi] int32 position in the student view of the same nucleus (0 when unmatched),
    matched [B, Mi] bool, True where the teacher nucleus is valid and present (valid) in the student view.
  """
  eq = _same_nucleus(teacher_ids, teacher_mask, student_ids, student_mask)  # [B,Mi,Mj]
  matched = jnp.any(eq, axis=-1)
  index = jnp.argmax(eq, axis=-1).astype(jnp.int32)
  return index, matched


def nulo_loss(teacher_logits: Sequence[jax.Array], teacher_ids: Sequence[jax.Array], teacher_masks: Sequence[jax.Array],
              student_logits: Sequence[jax.Array], student_ids: Sequence[jax.Array], student_masks: Sequence[jax.Array],
              center: jax.Array, teacher_temp, student_temp,
              teacher_targets: Sequence[jax.Array] | None = None) -> dict[str, jax.Array]:
  """Nucleus-level NuLo loss over all (teacher view i, student view j != i) pairs.

  For each pair the nuclei present in both views (same id, both valid) are matched; the cross-entropy between the
  teacher's centred/sharpened nucleus distribution in view i and the student's in view j is averaged over the
  matched nuclei of the pair, then over the valid (pair, sample) combinations. A (pair, sample) with no shared
  nucleus is masked out (contributes 0, never NaN); if nothing matches at all the loss is 0.

  Args:
    teacher_logits: Vg arrays [B, M_i, K] (nucleus-head logits of teacher global view i).
    teacher_ids: Vg arrays [B, M_i] int32 nucleus ids (-1 = pad).
    teacher_masks: Vg arrays [B, M_i] bool.
    student_logits: Vs arrays [B, M_j, K], student views globals first (view j < Vg is the teacher's view j).
    student_ids: Vs arrays [B, M_j].
    student_masks: Vs arrays [B, M_j].
    center: [K] nucleus-head center.
    teacher_temp: scalar teacher temperature.
    student_temp: scalar student temperature.
    teacher_targets: optional Vg arrays [B, M_i, K] of teacher distributions to use instead of the centred,
      sharpened softmax (e.g. `sinkhorn_knopp`); the center statistics are still returned.

  Returns:
    dict with `loss` (scalar), `shared` (mean number of shared nuclei per (pair, sample), scalar),
    `valid_frac` (fraction of (pair, sample) with >= 1 shared nucleus), `center_sum` ([K] sum of the raw teacher
    logits of the nuclei matched in at least one pair) and `center_count` (scalar number of those nuclei), from which
    the caller updates the center.
  """
  total = jnp.zeros((), jnp.float32)
  n_valid = jnp.zeros((), jnp.float32)
  n_shared = jnp.zeros((), jnp.float32)
  n_pairs = 0
  k = center.shape[-1]
  center_sum = jnp.zeros((k,), jnp.float32)
  center_count = jnp.zeros((), jnp.float32)
  s_logp = [student_log_probs(s, student_temp) for s in student_logits]
  for i, (t_logit, t_id, t_m) in enumerate(zip(teacher_logits, teacher_ids, teacher_masks)):
    if teacher_targets is not None:
      p_t = jax.lax.stop_gradient(teacher_targets[i].astype(jnp.float32))  # [B,Mi,K]
    else:
      p_t = jax.lax.stop_gradient(teacher_probs(t_logit, center, teacher_temp))  # [B,Mi,K]
    any_match = jnp.zeros(t_id.shape, bool)
    for j, (lp_s, s_id, s_m) in enumerate(zip(s_logp, student_ids, student_masks)):
      if j == i:
        continue
      eq = _same_nucleus(t_id, t_m, s_id, s_m)  # [B,Mi,Mj]
      matched = jnp.any(eq, axis=-1)  # [B,Mi]: nuclei of view i present in view j (for the center)
      # The teacher distribution is gathered to the student's nuclei, not the student's log-probs to the teacher's:
      # ids are unique within a view, so matched nuclei pair one to one and the sum over them is the same, but the
      # gathered operand is then constant (stop-gradient) and the backward pass has no scatter-add into the
      # student's [B, Mj, K] log-probs (on XLA:CPU those scatters were most of the loss's time; issue #23).
      s_matched = jnp.any(eq, axis=1)  # [B,Mj]
      s_index = jnp.argmax(eq, axis=1).astype(jnp.int32)  # [B,Mj]: position of the same nucleus in view i
      p_aligned = jnp.take_along_axis(p_t, s_index[..., None], axis=1)  # [B,Mj,K]
      ce = -jnp.sum(p_aligned * lp_s, axis=-1)  # [B,Mj]
      w = s_matched.astype(jnp.float32)
      count = w.sum(-1)  # [B], = matched.sum(-1)
      pair_loss = jnp.sum(ce * w, -1) / jnp.maximum(count, 1.0)  # [B]
      valid = (count > 0).astype(jnp.float32)
      total = total + jnp.sum(pair_loss * valid)
      n_valid = n_valid + valid.sum()
      n_shared = n_shared + count.sum()
      n_pairs += count.shape[0]
      any_match = any_match | matched
    am = any_match.astype(jnp.float32)
    center_sum = center_sum + jnp.einsum("bm,bmk->k", am, jax.lax.stop_gradient(t_logit.astype(jnp.float32)))
    center_count = center_count + am.sum()
  loss = total / jnp.maximum(n_valid, 1.0)
  return {
      "loss": loss,
      "shared": n_shared / max(n_pairs, 1),
      "valid_frac": n_valid / max(n_pairs, 1),
      "center_sum": center_sum,
      "center_count": center_count,
  }


def head_health(teacher_logits: jax.Array, student_logits: jax.Array | None, center: jax.Array, teacher_temp,
                student_temp, weights: jax.Array | None = None) -> dict[str, jax.Array]:
  """Collapse diagnostics of one head on matched teacher / student outputs (all float32 scalars).

  Args:
    teacher_logits: [N, K] raw teacher logits (not centred), one row per sample (image view or nucleus).
    student_logits: [N, K] student logits of the SAME samples (same view), or None (then `kl` is omitted).
    center: [K] the teacher center used by the loss.
    teacher_temp, student_temp: the loss temperatures.
    weights: [N] sample weights (0 for padding); None = all ones.

  Returns:
    `teacher_entropy` (mean per-sample entropy of the centred, sharpened teacher distribution, nats; ln K = uniform),
    `batch_entropy` (entropy of the weighted batch-mean teacher distribution; ~0 = every sample on one prototype),
    `kl` (mean KL(teacher || student) on the same samples, nats), `max_prob` (mean of the teacher's largest
    probability), `logit_std` (std of the raw teacher logits across samples, averaged over prototypes; compare it
    with the temperature), `center_norm` (L2 norm of the center).
  """
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  n = t.shape[0]
  w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
  wsum = jnp.maximum(w.sum(), 1.0)
  log_p_t = jax.nn.log_softmax((t - center) / teacher_temp, axis=-1)
  p_t = jnp.exp(log_p_t)
  ent = -jnp.sum(p_t * log_p_t, axis=-1)
  mean_p = jnp.einsum("n,nk->k", w, p_t) / wsum
  batch_ent = -jnp.sum(mean_p * jnp.log(jnp.maximum(mean_p, 1e-30)))
  mu = jnp.einsum("n,nk->k", w, t) / wsum
  var = jnp.einsum("n,nk->k", w, (t - mu) ** 2) / wsum
  out = {
      "teacher_entropy": jnp.sum(w * ent) / wsum,
      "batch_entropy": batch_ent,
      "max_prob": jnp.sum(w * p_t.max(-1)) / wsum,
      "logit_std": jnp.mean(jnp.sqrt(var)),
      "center_norm": jnp.linalg.norm(center.astype(jnp.float32)),
  }
  if student_logits is not None:
    log_p_s = jax.nn.log_softmax(jax.lax.stop_gradient(student_logits.astype(jnp.float32)) / student_temp, axis=-1)
    kl = jnp.sum(p_t * (log_p_t - log_p_s), axis=-1)
    out["kl"] = jnp.sum(w * kl) / wsum
  return out


def update_center(center: jax.Array, batch_mean: jax.Array, momentum: float, has_data=True) -> jax.Array:
  """Center EMA `c <- m c + (1 - m) mean`; kept unchanged where `has_data` is False. Shapes [K]."""
  new = momentum * center + (1.0 - momentum) * jax.lax.stop_gradient(batch_mean)
  return jnp.where(has_data, new, center)


def sinkhorn_knopp(teacher_logits: jax.Array, teacher_temp, weights: jax.Array | None = None,
                   n_iters: int = 3) -> jax.Array:
  """Teacher targets by Sinkhorn-Knopp normalisation (SwAV / DINOv2) instead of centering.

  Alternately rescales `exp(logits / T)` so that every prototype gets the same total mass over the batch and every
  sample sums to 1: a batch cannot put all its samples on a few prototypes (the partial collapse that centering
  allows on small batches). Padding rows (weight 0) take no mass and return zeros.

  Args:
    teacher_logits: [N, K] raw teacher logits (N samples of the global batch; under jit the sums are global).
    teacher_temp: scalar teacher temperature.
    weights: [N] 1 for real samples, 0 for padding; None = all real.
    n_iters: Sinkhorn iterations (DINOv2: 3).

  Returns:
    float32 [N, K]: rows of real samples sum to 1, padding rows are 0; stop-gradiented.
  """
  t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  n, k = t.shape
  w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
  n_real = jnp.maximum(w.sum(), 1.0)
  z = t / teacher_temp
  real = w[:, None] > 0
  z = z - jnp.max(jnp.where(real, z, -jnp.inf), initial=-1e30)  # global shift: cancels out below
  q = jnp.where(real, jnp.exp(jnp.clip(z, -80.0, 0.0)), 0.0)  # [N, K]
  q = q / jnp.maximum(q.sum(), 1e-30)
  for _ in range(n_iters):
    q = q / jnp.maximum(q.sum(0, keepdims=True), 1e-30) / k  # every prototype: mass 1/K
    q = q / jnp.maximum(q.sum(1, keepdims=True), 1e-30) / n_real  # every real sample: mass 1/N
    q = q * w[:, None]
  return jax.lax.stop_gradient(q * n_real)


def koleo_loss(features: jax.Array, weights: jax.Array | None = None, eps: float = 1e-8) -> jax.Array:
  """Kozachenko-Leonenko entropy regulariser (DINOv2): `-mean_i log(min_{j != i} ||x_i - x_j||)` on L2-normalised rows.

  Pushes each feature away from its nearest neighbour in the batch, spreading the features over the sphere (a
  kNN classifier then sees distinct neighbourhoods instead of a few tight clusters).

  Args:
    features: [N, C] features (float; normalised here).
    weights: [N] 1 for real rows, 0 for padding (padding is neither a query nor a neighbour); None = all real.
    eps: added inside the log.

  Returns:
    float32 scalar; 0 when fewer than 2 real rows.
  """
  x = features.astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
  n = x.shape[0]
  w = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
  dots = x @ x.T  # [N, N]
  usable = (w[None, :] > 0) & ~jnp.eye(n, dtype=bool)
  dots = jnp.where(usable, dots, -2.0)
  nn_idx = jax.lax.stop_gradient(jnp.argmax(dots, axis=1))  # nearest neighbour (max cosine)
  dist = jnp.linalg.norm(x - x[nn_idx] + eps, axis=-1)  # gradient through both ends, as DINOv2's pdist
  has_nn = jnp.any(usable, axis=1) & (w > 0)
  wq = has_nn.astype(jnp.float32)
  return -jnp.sum(wq * jnp.log(dist + eps)) / jnp.maximum(wq.sum(), 1.0)
