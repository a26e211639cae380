"""Initialisers and small layers shared by the MUSE backbone modules."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# PyTorch's default Conv2d/Linear weight init (kaiming_uniform with a = sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# timm ResNet convs: kaiming_normal(mode='fan_out', nonlinearity='relu').
kaiming_fan_out_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)


def torch_default_bias_init(fan_in: int):
  """PyTorch's default bias init for a layer with `fan_in` inputs: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def batch_norm(train: bool, axis_name: str | None, dtype: Any, name: str, zero_scale: bool = False) -> nn.BatchNorm:
  """PyTorch-equivalent BatchNorm2d: momentum 0.1 (Flax 0.9), eps 1e-5; batch statistics when `train`."""
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      axis_name=axis_name,
      dtype=dtype,
      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
      name=name,
  )


class DropPath(nn.Module):
  """Stochastic depth: zeroes the residual branch per sample with probability `rate` (train only), scales by 1/keep.

  Needs a 'dropout' rng when `train` and `rate > 0`.
  """

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or self.rate <= 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU as PyTorch writes it, x (1 + erf(x / sqrt 2)) / 2.

  `jax.nn.gelu(approximate=False)` computes x erfc(-x / sqrt 2) / 2: the same function (within 2e-6 of it; this
  form gives PyTorch's float32 values), but XLA:CPU makes one more pass over the `[B, T, 4D]` activations for it
  in a forward + backward (three elementwise fusions instead of two; issue #23, WORKSPACE.md attempt 20).
  """
  return x * (0.5 * (1.0 + jax.lax.erf(x * np.asarray(0.5 ** 0.5, x.dtype))))
