"""MUSE CNN decoder: reassembly, three U-Net blocks and hyper-features (spec §2.2-2.4, §2.8).

NHWC throughout. Every resize is a bilinear align_corners=True resize to an explicit size (`ops.resize_bilinear_ac`),
so any input side that is a multiple of the encoder's patch size works (the official ViT code breaks at 208 px);
where the official code's scale factors divide evenly the numbers are the same.

Conv init: PyTorch's default (kaiming_uniform, a = sqrt(5)); BatchNorm gamma 1, beta 0. `conv_impl` ('auto' | 'xla' |
'winograd'): how the 3x3 convolutions are computed (`muse_jax/models/conv.py`; same parameters, same values up to
float rounding).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax import ops
from muse_jax.models import conv as conv_lib
from muse_jax.models.layers import batch_norm, torch_default_kernel_init


class ConvLayer(nn.Module):
  """Conv k x k (stride 1, 'same' padding, no bias) -> BatchNorm -> ReLU (or no activation). Official `ConvLayer`."""

  features: int
  kernel_size: int = 3
  act: bool = True
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k = self.kernel_size
    x = nn.Conv(self.features, (k, k), padding=[(k // 2, k // 2)] * 2, use_bias=False, dtype=self.dtype,
                kernel_init=torch_default_kernel_init,
                conv_general_dilated=conv_lib.conv_fn(self.conv_impl, self.dtype), name="conv")(x)
    x = batch_norm(train, self.bn_axis_name, self.dtype, "bn")(x)
    return nn.relu(x) if self.act else x


class BasicResBlock(nn.Module):
  """ReLU(ConvLayer3x3+ReLU -> ConvLayer3x3 + shortcut), shortcut identity or 1x1 ConvLayer (official BasicResBlock)."""

  channels: int
  features: int
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    kw = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, conv_impl=self.conv_impl)
    y = ConvLayer(self.channels, 3, True, name="conv1", **kw)(x, train)
    y = ConvLayer(self.features, 3, False, name="conv2", **kw)(y, train)
    if x.shape[-1] != self.features:
      x = ConvLayer(self.features, 1, False, name="shortcut", **kw)(x, train)
    return nn.relu(y + x)


class UnetBlock(nn.Module):
  """Upsample the decoder input to the skip's size, concat [decoder, skip], ConvLayer3x3, BasicResBlock.

  Official `UnetBlock` with n_block=2 (no middle blocks).
  """

  channels: int
  features: int
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x_de: jax.Array, x_en: jax.Array, train: bool) -> jax.Array:
    kw = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, conv_impl=self.conv_impl)
    x_de = ops.resize_bilinear_ac(x_de, x_en.shape[1:3])
    x = jnp.concatenate([x_de, x_en.astype(x_de.dtype)], axis=-1)
    x = ConvLayer(self.channels, 3, True, name="first_block", **kw)(x, train)
    return BasicResBlock(self.features, self.features, name="last_block", **kw)(x, train)


class HyperFeats(nn.Module):
  """Per level 1x1 ConvLayer (no activation) to `features`, resize to the first level's size, concat on channels."""

  features: int
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], train: bool) -> jax.Array:
    out_hw = feats[0].shape[1:3]
    outs = []
    for i, f in enumerate(feats):
      y = ConvLayer(self.features, 1, False, self.bn_axis_name, self.dtype, self.conv_impl, name=f"conv_list_{i}")(
          f, train)
      outs.append(ops.resize_bilinear_ac(y, out_hw))
    return jnp.concatenate(outs, axis=-1)


class Decoder(nn.Module):
  """MUSE decoder over four feature levels (strides 4, 8, 16, 32 after reassembly).

  Attributes:
    dims: channels of the four levels (e1..e4). ViT: (D/4, D/2, D, 2D); ResNet-50: (256, 512, 1024, 2048).
    hyper_dim: channels of each hyper-feature level (f_map has 4 * hyper_dim channels).
    reassemble: ViT mode. The inputs are four `[B, g, g, D]` token maps; each goes through a bias-free 1x1 conv
      (`dim_map_layers_{i}`) to `dims[i]` channels and a resize to `floor(g * patch_size / stride_i)`.
    patch_size: the ViT patch size (only used with `reassemble`).
  """

  dims: tuple[int, int, int, int]
  hyper_dim: int
  reassemble: bool = False
  patch_size: int = 16
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], train: bool) -> jax.Array:
    """Args: feats: four NHWC maps. Returns: f_map `[B, h1, w1, 4 * hyper_dim]` at the first level's size."""
    feats = list(feats)
    if self.reassemble:
      for i, (f, stride) in enumerate(zip(feats, (4, 8, 16, 32))):
        f = nn.Conv(self.dims[i], (1, 1), use_bias=False, dtype=self.dtype, kernel_init=torch_default_kernel_init,
                    conv_general_dilated=conv_lib.conv_fn(self.conv_impl, self.dtype), name=f"dim_map_layers_{i}")(f)
        g_h, g_w = f.shape[1:3]
        out_hw = (math.floor(g_h * self.patch_size / stride), math.floor(g_w * self.patch_size / stride))
        feats[i] = ops.resize_bilinear_ac(f, out_hw)
    e1, e2, e3, e4 = feats
    kw = dict(bn_axis_name=self.bn_axis_name, dtype=self.dtype, conv_impl=self.conv_impl)
    d3 = UnetBlock(self.dims[2], self.dims[2], name="decoder3", **kw)(e4, e3, train)
    d2 = UnetBlock(self.dims[1], self.dims[1], name="decoder2", **kw)(d3, e2, train)
    d1 = UnetBlock(self.dims[0], self.dims[0], name="decoder1", **kw)(d2, e1, train)
    return HyperFeats(self.hyper_dim, name="hyper_feats", **kw)([d1, d2, d3, e4], train)
