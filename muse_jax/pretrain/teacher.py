"""The EMA teacher as the last element of the optax chain.

The transform leaves the updates untouched; its state holds the teacher parameters (an EMA of the post-update
student parameters) and a step count that drives the momentum schedule. Gradients never reach the teacher: it is
only written here, from the student parameters after the update.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class TeacherEmaState(NamedTuple):
  """State of `ema_teacher`.

  Attributes:
    count: int32 scalar, number of optimizer steps taken (drives the momentum schedule).
    teacher_params: pytree like the student params; the EMA of the post-update student params.
  """
  count: jax.Array
  teacher_params: Any


def ema_teacher(momentum: optax.ScalarOrSchedule) -> optax.GradientTransformation:
  """EMA teacher: `teacher <- m teacher + (1 - m) new_student`, with `m = momentum(count)`.

  Must be the LAST transform of the chain (it needs the final updates) and must be called with `params`.

  Args:
    momentum: a float or a schedule `count -> momentum` (e.g. cosine 0.996 -> 1).
  """
  def init_fn(params):
    return TeacherEmaState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.copy, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("ema_teacher needs `params` in tx.update(grads, opt_state, params)")
    m = momentum(state.count) if callable(momentum) else momentum
    new_student = optax.apply_updates(params, updates)
    teacher = optax.incremental_update(new_student, state.teacher_params, 1.0 - m)
    return updates, TeacherEmaState(optax.safe_increment(state.count), teacher)

  return optax.GradientTransformation(init_fn, update_fn)


def get_teacher(opt_state) -> Any:
  """Teacher params held in an optimizer state whose chain contains `ema_teacher`."""
  return optax.tree.get(opt_state, "teacher_params")


def get_teacher_count(opt_state) -> jax.Array:
  """Number of teacher EMA updates taken so far (int32 scalar)."""
  if isinstance(opt_state, TeacherEmaState):
    return opt_state.count
  if isinstance(opt_state, tuple):
    for s in reversed(opt_state):
      try:
        return get_teacher_count(s)
      except ValueError:
        continue
  raise ValueError("no TeacherEmaState in the optimizer state")
