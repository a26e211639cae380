"""Point-proposal head on `f_map` and the full NDC model (backbone + head).

P2PNet-style proposals (MUSE_SPEC §4, inferred design): one anchor per cell of a grid of stride 4 (the f_map
resolution) or 8 (f_map average-pooled 2x2; 4x fewer proposals). Each proposal predicts an offset and C+1 logits
(C nucleus classes, then background at index C).

Anchor of cell (i, j) at stride s: the centre of the pixels it covers, `(j*s + (s-1)/2, i*s + (s-1)/2)` in input
pixels; predicted point = anchor + s * offset. Points are (x, y) = (column, row) in input-image pixels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

STRIDES = (4, 8)


def anchor_grid(image_size: int, stride: int) -> np.ndarray:
  """Anchors `[P, 2]` (x, y) of a square input of side `image_size`, row-major (P = (image_size/stride)^2)."""
  if stride not in STRIDES:
    raise ValueError(f"stride: got {stride}, expected one of {STRIDES}")
  if image_size % stride:
    raise ValueError(f"image_size: got {image_size}, expected a multiple of the stride {stride}")
  n = image_size // stride
  c = np.arange(n, dtype=np.float32) * stride + (stride - 1) / 2.0
  xx, yy = np.meshgrid(c, c)
  return np.stack([xx.ravel(), yy.ravel()], -1)


class PointHead(nn.Module):
  """Offset and class branches on f_map.

  Attributes:
    num_classes: C (background is the extra last logit).
    stride: 4 or 8 (proposal grid spacing in input px).
    hidden_dim: channels of the 3x3 convs of each branch.
    num_layers: 3x3 conv + ReLU layers per branch before the output conv.
    bg_prior: initial background probability (sets the class bias so training starts from "mostly background").
  """
  num_classes: int
  stride: int = 4
  hidden_dim: int = 128
  num_layers: int = 2
  bg_prior: float = 0.9

  @nn.compact
  def __call__(self, f_map: jax.Array, image_size: int) -> dict[str, jax.Array]:
    """Args: f_map `[B, S/4, S/4, D]`; image_size S. Returns {'points': [B,P,2], 'logits': [B,P,C+1]}."""
    if self.stride not in STRIDES:
      raise ValueError(f"stride: got {self.stride}, expected one of {STRIDES}")
    B, h, w, _ = f_map.shape
    if h * 4 != image_size or w * 4 != image_size:
      raise ValueError(f"f_map: got {h}x{w} for an input of {image_size} px, expected stride 4")
    x = f_map.astype(jnp.float32)
    if self.stride == 8:
      x = nn.avg_pool(x, (2, 2), (2, 2))
    def branch(name: str, out: int, bias_init) -> jax.Array:
      y = x
      for i in range(self.num_layers):
        y = nn.relu(nn.Conv(self.hidden_dim, (3, 3), name=f"{name}_conv{i}")(y))
      return nn.Conv(out, (3, 3), name=f"{name}_out", kernel_init=nn.initializers.normal(0.01),
                     bias_init=bias_init)(y)

    c1 = self.num_classes + 1
    fg = (1.0 - self.bg_prior) / self.num_classes
    bias = np.full((c1,), np.log(fg), np.float32)
    bias[-1] = np.log(self.bg_prior)
    offsets = branch("reg", 2, nn.initializers.zeros)
    logits = branch("cls", c1, lambda *_: jnp.asarray(bias))
    anchors = jnp.asarray(anchor_grid(image_size, self.stride))
    points = anchors[None] + self.stride * offsets.reshape(B, -1, 2)
    return {"points": points, "logits": logits.reshape(B, -1, c1)}


class NDCModel(nn.Module):
  """Backbone (`muse_jax.models.build_backbone`) + `PointHead`.

  Variables: `{'params': {'backbone': ..., 'head': ...}, 'batch_stats': {'backbone': ...}}`.
  Call with ImageNet-normalised float images `[B, S, S, 3]` (`muse_jax.ops.normalize_images`).
  """
  backbone: nn.Module
  head: PointHead

  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    out = self.backbone(images, train=train)
    res = self.head(out["f_map"], images.shape[1])
    return res


def build_model(model_cfg: Any, head_cfg: Any, num_classes: int) -> NDCModel:
  """NDCModel from a backbone config (`configs/models.py`) and a head config (stride, hidden_dim, num_layers)."""
  from muse_jax.models import build_backbone  # pylint: disable=import-outside-toplevel

  head = PointHead(num_classes=num_classes, stride=int(head_cfg.stride), hidden_dim=int(head_cfg.hidden_dim),
                   num_layers=int(head_cfg.num_layers), bg_prior=float(head_cfg.get("bg_prior", 0.9)))
  return NDCModel(backbone=build_backbone(model_cfg), head=head)


def input_multiple(model_cfg: Any) -> int:
  """Input sides must be multiples of this (16 for ViTs, 32 for ResNets; and of the head stride)."""
  return 32 if model_cfg.arch == "resnet50" else max(int(model_cfg.patch_size), 8)
