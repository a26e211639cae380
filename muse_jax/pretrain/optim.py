"""Optimizer and schedules for MUSE pretraining (DINO recipe, spec §3.7).

`build_optimizer` returns `optax.chain(clip, freeze_last(grads), adamw(lr, wd schedule, mask), freeze_last(updates),
ema_teacher(momentum))`. All schedules are functions of the optimizer step.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from muse_jax.pretrain import teacher as teacher_lib

Schedule = Callable[[Any], jax.Array]


def warmup_cosine(base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> Schedule:
  """Linear warm-up `warmup_start -> base` over `warmup_steps`, then cosine `base -> final` until `total_steps`."""
  total_steps = max(int(total_steps), 1)
  warmup_steps = int(min(max(warmup_steps, 0), total_steps))
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_start + (base - warmup_start) * step / max(warmup_steps, 1)
    t = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    cos = final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * t))
    return jnp.where(step < warmup_steps, warm, cos).astype(jnp.float32)
  return schedule


class Schedules(NamedTuple):
  """All step-indexed schedules of a run."""
  lr: Schedule
  wd: Schedule
  momentum: Schedule
  teacher_temp: Schedule


def momentum_for_half_life(half_life_steps: float) -> float:
  """The EMA momentum `m` with `m ** half_life_steps = 1/2`: the teacher forgets half of its past in that many steps."""
  if not half_life_steps > 0:
    raise ValueError(f"teacher half-life must be > 0 steps (got {half_life_steps})")
  return float(0.5 ** (1.0 / half_life_steps))


def half_life_of(momentum: float) -> float:
  """Steps for an EMA of constant `momentum` to forget half of its past (inf for momentum 1)."""
  return math.inf if momentum >= 1.0 else math.log(0.5) / math.log(momentum)


def _opt(opt_cfg, name: str, default: float = -1.0) -> float:
  return float(opt_cfg[name]) if name in opt_cfg else default


def schedule_steps(opt_cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> dict[str, Any]:
  """The run-length-dependent numbers of the schedules, resolved to steps.

  Each warm-up or freeze is `<name>_frac * total_steps` when that fraction field is >= 0 (run-length-aware configs),
  else `<name>_epochs * steps_per_epoch` (DINO's epoch-based fields, the default of the full-size configs). The
  starting teacher momentum is `momentum_for_half_life(teacher_half_life_frac * total_steps)` when
  `teacher_half_life_frac > 0`, else `momentum_teacher`.

  Returns:
    {'warmup_steps', 'teacher_temp_warmup_steps', 'freeze_last_layer_steps', 'momentum_teacher',
    'teacher_half_life_steps'} (the half-life of the starting momentum, for the record).
  """
  def steps(name: str, epochs_field: str) -> int:
    frac = _opt(opt_cfg, name)
    if frac >= 0:
      return int(round(frac * total_steps))
    return int(round(float(opt_cfg[epochs_field]) * steps_per_epoch))

  hl = _opt(opt_cfg, "teacher_half_life_frac", 0.0)
  mom = momentum_for_half_life(max(hl * total_steps, 1.0)) if hl > 0 else float(opt_cfg.momentum_teacher)
  return {"warmup_steps": steps("warmup_frac", "warmup_epochs"),
          "teacher_temp_warmup_steps": steps("warmup_teacher_temp_frac", "warmup_teacher_temp_epochs"),
          "freeze_last_layer_steps": steps("freeze_last_layer_frac", "freeze_last_layer_epochs"),
          "momentum_teacher": mom, "teacher_half_life_steps": half_life_of(mom)}


def make_schedules(opt_cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int,
                   global_batch: int) -> Schedules:
  """Schedules from the `optim` config block (lengths from `schedule_steps`).

  The peak learning rate is `base_lr * global_batch / 256` (DINO linear scaling) when `opt_cfg.scale_lr` is True.
  """
  from muse_jax.pretrain import losses  # local import keeps module import order simple
  st = schedule_steps(opt_cfg, steps_per_epoch, total_steps)
  peak = opt_cfg.base_lr * (global_batch / 256.0 if opt_cfg.scale_lr else 1.0)
  lr = warmup_cosine(peak, opt_cfg.min_lr, total_steps, st["warmup_steps"])
  wd = warmup_cosine(opt_cfg.weight_decay, opt_cfg.weight_decay_end, total_steps)
  mom = warmup_cosine(st["momentum_teacher"], opt_cfg.momentum_teacher_end, total_steps)
  tt = losses.teacher_temperature_schedule(opt_cfg.warmup_teacher_temp, opt_cfg.teacher_temp,
                                           st["teacher_temp_warmup_steps"])
  return Schedules(lr, wd, mom, tt)


def decay_mask(params) -> Any:
  """True for leaves that get weight decay: every leaf with ndim > 1 (biases, norm scales, 1-d gains get none)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def last_layer_mask(params, name: str = "last_layer") -> Any:
  """True for the leaves whose path contains a module named `name` (the heads' last, prototype layer)."""
  def f(path, _):
    return any(getattr(k, "key", getattr(k, "name", None)) == name for k in path)
  return jax.tree_util.tree_map_with_path(f, params)


class _FreezeState(NamedTuple):
  count: jax.Array


def freeze_for(mask, steps: int) -> optax.GradientTransformation:
  """Zeroes the updates of the `mask`ed leaves while `count < steps` (DINO's frozen last layer)."""
  def init_fn(params):
    del params
    return _FreezeState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    active = state.count >= steps
    updates = jax.tree.map(lambda u, m: jnp.where(active, u, jnp.zeros_like(u)) if m else u, updates, mask)
    return updates, _FreezeState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def build_optimizer(opt_cfg: ml_collections.ConfigDict, params, schedules: Schedules,
                    steps_per_epoch: int, last_layer_name: str = "last_layer",
                    total_steps: int = 0) -> optax.GradientTransformation:
  """The full chain; the EMA teacher is last.

  Args:
    opt_cfg: the `optim` config block (fields: clip_grad, b1, b2, eps, freeze_last_layer_epochs, ...).
    params: student params (used only for masks; shapes/paths).
    schedules: from `make_schedules`.
    steps_per_epoch: optimizer steps per epoch (for the frozen-last-layer period).
    total_steps: the run's length (for `freeze_last_layer_frac`; unused when that field is < 0).
    last_layer_name: module name of the heads' last layer (frozen for `freeze_last_layer_epochs`).
  """
  freeze_steps = schedule_steps(opt_cfg, steps_per_epoch, total_steps)["freeze_last_layer_steps"]
  last = last_layer_mask(params, last_layer_name)
  parts = []
  if opt_cfg.clip_grad and opt_cfg.clip_grad > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.clip_grad))
  if freeze_steps > 0:
    parts.append(freeze_for(last, freeze_steps))
  parts.append(optax.adamw(schedules.lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=schedules.wd, mask=decay_mask(params)))
  if freeze_steps > 0:
    parts.append(freeze_for(last, freeze_steps))
  parts.append(teacher_lib.ema_teacher(schedules.momentum))
  return optax.chain(*parts)
