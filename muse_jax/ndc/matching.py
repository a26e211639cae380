"""One-to-one assignment of ground-truth nuclei to point proposals (Hungarian algorithm, SciPy on the host).

Cost of giving GT n to proposal p (P2PNet-style, MUSE_SPEC §4): `point_weight * ||point_p - gt_n|| - class_weight *
prob_p[class_n]`, with points in input px. Only proposals marked valid (anchor inside the labelled region) and
within `max_dist` px of the GT can be assigned; a GT with no such proposal stays unmatched (-1). GTs of unknown
class (-1) use the foreground probability (1 - background) instead.

Why a host callback (`jax.pure_callback`) inside the jitted train step: the cost depends on the current
predictions (points and class probabilities), so the matching must sit between the forward pass and the loss of
the *same* step. A callback keeps the whole step one `jax.jit` (one compile, donated state, sharded batch); the
integer assignment carries no gradient, so nothing is lost by leaving JAX for it. The alternatives are worse: a
separate forward pass before the step doubles the forward cost, and matching on stale predictions from the
previous step is incorrect. The cost of the callback is small next to the backbone: SciPy's
`linear_sum_assignment` on an [N, P_candidates] matrix (a few hundred GTs per tile) takes milliseconds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize
from scipy.spatial import cKDTree

BIG = 1e6


def hungarian_assign_single(points: np.ndarray, probs: np.ndarray, valid: np.ndarray, gt_points: np.ndarray,
                            gt_classes: np.ndarray, gt_mask: np.ndarray, *, point_weight: float,
                            class_weight: float, max_dist: float) -> np.ndarray:
  """Assignment for one image.

  Args:
    points: [P, 2] predicted points; probs: [P, C+1] class probabilities (background last); valid: [P] bool.
    gt_points: [N, 2]; gt_classes: [N] (-1 unknown); gt_mask: [N] bool.
    point_weight, class_weight: cost weights; max_dist: largest allowed GT-proposal distance (px).

  Returns:
    int32 [N]: the proposal index given to each GT, -1 if unmatched or padding.
  """
  out = np.full(len(gt_points), -1, np.int32)
  gidx = np.nonzero(gt_mask)[0]
  pidx = np.nonzero(valid)[0]
  if len(gidx) == 0 or len(pidx) == 0:
    return out
  tree = cKDTree(points[pidx])
  near = tree.query_ball_point(gt_points[gidx], r=max_dist)
  cand = np.unique(np.concatenate([np.asarray(n, np.int64) for n in near] + [np.zeros(0, np.int64)]))
  if len(cand) == 0:
    return out
  cols = pidx[cand]
  d = np.linalg.norm(gt_points[gidx, None, :] - points[None, cols, :], axis=-1)
  cls = gt_classes[gidx]
  p = probs[cols]  # [K, C+1]
  fg = 1.0 - p[:, -1]
  pc = np.where(cls[:, None] >= 0, p[:, np.clip(cls, 0, p.shape[1] - 2)].T, fg[None, :])
  cost = point_weight * d - class_weight * pc
  cost = np.where(d <= max_dist, cost, BIG)
  rows, c = optimize.linear_sum_assignment(cost)
  ok = cost[rows, c] < BIG / 2
  out[gidx[rows[ok]]] = cols[c[ok]]
  return out


def hungarian_assign_np(points, probs, valid, gt_points, gt_classes, gt_mask, *, point_weight: float,
                        class_weight: float, max_dist: float) -> np.ndarray:
  """Batched `hungarian_assign_single` on host arrays ([B, ...] each). Returns int32 [B, N]."""
  points, probs, valid = np.asarray(points, np.float64), np.asarray(probs, np.float64), np.asarray(valid, bool)
  gt_points, gt_classes, gt_mask = np.asarray(gt_points, np.float64), np.asarray(gt_classes), np.asarray(gt_mask, bool)
  return np.stack([
    hungarian_assign_single(points[b], probs[b], valid[b], gt_points[b], gt_classes[b], gt_mask[b],
                            point_weight=point_weight, class_weight=class_weight, max_dist=max_dist)
    for b in range(points.shape[0])
  ]).astype(np.int32)


def hungarian_assign(points: jax.Array, probs: jax.Array, valid: jax.Array, gt_points: jax.Array,
                     gt_classes: jax.Array, gt_mask: jax.Array, *, point_weight: float = 0.1,
                     class_weight: float = 1.0, max_dist: float = 16.0) -> jax.Array:
  """Hungarian assignment inside jit through `jax.pure_callback` (no gradient; see the module docstring).

  Args:
    points: [B, P, 2]; probs: [B, P, C+1]; valid: [B, P] bool; gt_points: [B, N, 2]; gt_classes: [B, N];
      gt_mask: [B, N] bool.

  Returns:
    int32 [B, N] proposal index per GT (-1: unmatched).
  """
  fn = functools.partial(hungarian_assign_np, point_weight=point_weight, class_weight=class_weight,
                         max_dist=max_dist)
  shape = jax.ShapeDtypeStruct(gt_mask.shape, jnp.int32)
  args = [jax.lax.stop_gradient(a) for a in (points, probs)] + [valid, gt_points, gt_classes, gt_mask]
  return jax.pure_callback(fn, shape, *args, vmap_method="sequential")
