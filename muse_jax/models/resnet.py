"""ResNet-50 (timm v1.5: stride in the 3x3 conv) encoder and the MUSE R50 backbone, spec §2.8.

The encoder returns the four stage outputs (strides 4, 8, 16, 32; 256, 512, 1024, 2048 channels for R50); the
decoder is the shared U-Net + hyper-feature decoder without reassembly, giving a 1024-channel `f_map` at stride 4;
`f_cls` is the global average pool of the stage-4 map (2048-d; pooling inferred, not in the official code).

Init (as timm): convs kaiming_normal(fan_out, relu), BN gamma 1 / beta 0 except the last BN of each bottleneck
(gamma 0, timm's `zero_init_last`). Decoder convs: PyTorch default.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from muse_jax.models import conv as conv_lib
from muse_jax.models.decoder import Decoder
from muse_jax.models.layers import batch_norm, kaiming_fan_out_init
from muse_jax.models.vit import check_images


def _conv(features: int, k: int, stride: int, name: str, dtype: Any, conv_impl: str = "auto") -> nn.Conv:
  return nn.Conv(features, (k, k), strides=(stride, stride), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                 dtype=dtype, kernel_init=kaiming_fan_out_init,
                 conv_general_dilated=conv_lib.conv_fn(conv_impl, dtype), name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (x4 channels) with BN, plus a 1x1-conv + BN shortcut when the shape changes."""

  width: int
  stride: int = 1
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out_ch = self.width * 4
    bn = lambda name, zero=False: batch_norm(train, self.bn_axis_name, self.dtype, name, zero)  # noqa: E731
    y = nn.relu(bn("bn1")(_conv(self.width, 1, 1, "conv1", self.dtype, self.conv_impl)(x)))
    y = nn.relu(bn("bn2")(_conv(self.width, 3, self.stride, "conv2", self.dtype, self.conv_impl)(y)))
    y = bn("bn3", True)(_conv(out_ch, 1, 1, "conv3", self.dtype, self.conv_impl)(y))
    if self.stride != 1 or x.shape[-1] != out_ch:
      x = bn("downsample_bn")(_conv(out_ch, 1, self.stride, "downsample_conv", self.dtype, self.conv_impl)(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet stem + 4 stages of bottlenecks; returns the 4 stage outputs `[B, S/4..S/32, S/4..S/32, 4w..32w]`."""

  stem_width: int = 64
  stage_depths: tuple[int, ...] = (3, 4, 6, 3)
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    x = _conv(self.stem_width, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(batch_norm(train, self.bn_axis_name, self.dtype, "bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    outs = []
    for s, n in enumerate(self.stage_depths):
      for j in range(n):
        stride = 2 if (s > 0 and j == 0) else 1
        x = Bottleneck(self.stem_width * 2 ** s, stride, self.bn_axis_name, self.dtype, self.conv_impl,
                       name=f"layer{s + 1}_{j}")(x, train)
      outs.append(x)
    return outs


class MUSEResNet(nn.Module):
  """MUSE R50 backbone: `encoder` (ResNet) -> `decoder` (U-Net + hyper-features over [d1, d2, d3, e5]).

  `__call__(images [B, S, S, 3], train) -> {'f_map': [B, S/4, S/4, 16 w], 'f_cls': [B, 32 w]}` with w the stem
  width (R50: 1024 and 2048). S must be a multiple of 32.
  """

  stem_width: int = 64
  stage_depths: tuple[int, ...] = (3, 4, 6, 3)
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    check_images(images, 32)
    feats = ResNet(self.stem_width, tuple(self.stage_depths), self.bn_axis_name, self.dtype, self.conv_impl,
                   name="encoder")(images, train)
    dims = tuple(f.shape[-1] for f in feats)
    f_map = Decoder(dims, dims[-1] // 8, reassemble=False, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                    conv_impl=self.conv_impl, name="decoder")(feats, train)
    f_cls = jnp.mean(feats[-1].astype(jnp.float32), axis=(1, 2))
    return {"f_map": f_map.astype(jnp.float32), "f_cls": f_cls}


def resnet_kwargs(cfg: Any) -> dict[str, Any]:
  """MUSEResNet constructor arguments from a model config (see `configs/models.py`)."""
  return dict(stem_width=cfg.stem_width, stage_depths=tuple(cfg.stage_depths), bn_axis_name=cfg.bn_axis_name,
              dtype=jnp.dtype(cfg.dtype), conv_impl=cfg.get("conv_impl", "auto"))
