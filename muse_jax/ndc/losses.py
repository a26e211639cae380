"""Fine-tuning losses of the NDC head (MUSE_SPEC §4): L = λ_reg L_reg + λ_type L_type + λ_cons L_cons.

- Supervised (inside the labelled region only): each GT is assigned one proposal (`matching.hungarian_assign`);
  assigned proposals get cross-entropy to the GT class and a squared-error point loss (in units of the stride);
  every other proposal inside the region gets cross-entropy to background (weight `bg_weight`). Proposals outside
  the region are ignored.
- Consistency (outside the labelled region): FixMatch-style per-proposal pseudo-labels from the EMA teacher's
  prediction on the weak view. Weak and strong views share their geometry (the strong view only adds photometric
  noise), so proposal p of the teacher and of the student are the same anchor. A proposal whose teacher maximum
  foreground probability exceeds `threshold` is supervised with the teacher's class and point; one whose
  background probability exceeds `bg_threshold` with background; the rest are ignored.

All functions are pure JAX; `logits` [B, P, C+1] with background last, `points` [B, P, 2] in input px.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _weighted_mean(x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-6)


def assignment_targets(assign: jax.Array, gt_points: jax.Array, gt_classes: jax.Array, num_proposals: int,
                       num_classes: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-proposal targets from a GT->proposal assignment.

  Args:
    assign: int32 [B, N] (-1 unmatched); gt_points [B, N, 2]; gt_classes [B, N] (-1 unknown class).

  Returns:
    (target class int32 [B, P] (C = background, -1 = matched to an unknown-class GT), target point [B, P, 2],
     matched bool [B, P]).
  """
  B = assign.shape[0]
  idx = jnp.where(assign >= 0, assign, num_proposals)  # out of range: dropped by the scatter
  b = jnp.arange(B)[:, None]
  tcls = jnp.full((B, num_proposals), num_classes, jnp.int32).at[b, idx].set(gt_classes.astype(jnp.int32),
                                                                            mode="drop")
  tpts = jnp.zeros((B, num_proposals, 2), jnp.float32).at[b, idx].set(gt_points.astype(jnp.float32), mode="drop")
  matched = jnp.zeros((B, num_proposals), bool).at[b, idx].set(True, mode="drop")
  return tcls, tpts, matched


def supervised_loss(logits: jax.Array, points: jax.Array, assign: jax.Array, gt_points: jax.Array,
                    gt_classes: jax.Array, valid: jax.Array, *, stride: int, bg_weight: float = 0.5
                    ) -> dict[str, jax.Array]:
  """Class CE over valid proposals and point MSE over matched ones.

  Args:
    logits: [B, P, C+1]; points: [B, P, 2]; assign: [B, N]; gt_points: [B, N, 2]; gt_classes: [B, N];
    valid: [B, P] bool (anchor inside the labelled region).

  Returns:
    {'cls': scalar, 'reg': scalar, 'num_matched': scalar}.
  """
  B, P, C1 = logits.shape
  tcls, tpts, matched = assignment_targets(assign, gt_points, gt_classes, P, C1 - 1)
  known = tcls >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.maximum(tcls, 0))
  w = valid * known * jnp.where(tcls == C1 - 1, bg_weight, 1.0)
  se = jnp.sum(jnp.square((points - tpts) / stride), -1)
  return {"cls": _weighted_mean(ce, w), "reg": _weighted_mean(se, matched * valid),
          "num_matched": jnp.sum(matched * valid)}


def consistency_loss(student_logits: jax.Array, student_points: jax.Array, teacher_logits: jax.Array,
                     teacher_points: jax.Array, mask: jax.Array, *, stride: int, threshold: float = 0.9,
                     bg_threshold: float = 0.9, bg_weight: float = 0.5) -> dict[str, jax.Array]:
  """FixMatch-style consistency on confident teacher proposals (see the module docstring).

  Args:
    student_logits, teacher_logits: [B, P, C+1]; student_points, teacher_points: [B, P, 2];
    mask: [B, P] bool, proposals the loss may use (outside the labelled region).

  Returns:
    {'cls': scalar, 'reg': scalar, 'num_fg': scalar (confident foreground pseudo-labels), 'num_bg': scalar}.
  """
  C = student_logits.shape[-1] - 1
  pt = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), -1)
  tp = jax.lax.stop_gradient(teacher_points)
  fg_prob = jnp.max(pt[..., :C], -1)
  fg = mask & (fg_prob > threshold)
  bg = mask & (pt[..., C] > bg_threshold) & ~fg
  target = jnp.where(fg, jnp.argmax(pt[..., :C], -1), C)
  ce = optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32), target)
  w = fg + bg_weight * bg
  se = jnp.sum(jnp.square((student_points - tp) / stride), -1)
  return {"cls": _weighted_mean(ce, w), "reg": _weighted_mean(se, fg), "num_fg": jnp.sum(fg),
          "num_bg": jnp.sum(bg)}
