"""DINO-style ViT encoder and the MUSE ViT backbone (encoder + decoder), spec §2.1-2.5.

Pre-norm blocks (LayerNorm eps 1e-6, exact GELU, qkv with bias), a learned position embedding stored for the
config's `img_size` grid and resized at run time with PyTorch bicubic semantics (`ops.resize_pos_embed`), a CLS
token, stochastic depth (train only). Extracted block outputs all pass through the shared final LayerNorm `norm`.

Init (as DINO): Dense kernels, `cls_token` and `pos_embed` trunc_normal(0.02), Dense biases 0, LayerNorm 1/0;
the patch-embedding conv keeps PyTorch's default (kaiming_uniform a = sqrt(5), uniform bias).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import ops
from muse_jax.models.decoder import Decoder
from muse_jax.models.layers import DropPath, gelu, torch_default_bias_init, torch_default_kernel_init, trunc_normal_02

CLS_MODES = ("ignore", "add", "proj")


def _dense(features: int, name: str, dtype: Any, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=trunc_normal_02,
                  bias_init=nn.initializers.zeros, name=name)


def _layer_norm(name: str, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, name=name)


class PatchEmbed(nn.Module):
  """Non-overlapping `patch_size` conv (`proj`) -> `[B, H/p, W/p, D]`."""

  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    fan_in = p * p * x.shape[-1]
    return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                   kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(fan_in), name="proj")(x)


class Attention(nn.Module):
  """Multi-head self-attention; `qkv` kernel `[D, 3D]` with output order (3, heads, head_dim) as in PyTorch.

  softmax(q k^T / sqrt(hd)) v, computed as (e v) / sum(e) with e = exp(s - max s): the normalisation divides the
  `[B, H, T, hd]` output instead of the `[B, H, T, T]` weights (issue #23: XLA:CPU otherwise materialises the
  broadcast sums as a `[B, H, T, T]` array), and q is scaled before the product (exact for hd a power of 4, as
  64 in ViT-S/B). Same values as PyTorch's order of operations up to float32 rounding (~1e-6 relative).
  Exponentials and sums in float32 whatever `dtype`.
  """

  dim: int
  num_heads: int
  qkv_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    hd = d // self.num_heads
    qkv = _dense(3 * d, "qkv", self.dtype, self.qkv_bias)(x).reshape(b, t, 3, self.num_heads, hd)
    q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))  # each [B, H, T, hd]
    logits = jnp.matmul(q * jnp.asarray(hd ** -0.5, q.dtype), jnp.swapaxes(k, -1, -2)).astype(jnp.float32)
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.matmul(e.astype(v.dtype), v) / jnp.sum(e, axis=-1, keepdims=True)
    out = jnp.transpose(out.astype(self.dtype), (0, 2, 1, 3)).reshape(b, t, d)
    return _dense(d, "proj", self.dtype)(out)


class Mlp(nn.Module):
  """fc1 -> exact GELU (`gelu`) -> fc2."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = gelu(_dense(self.hidden, "fc1", self.dtype)(x))
    return _dense(d, "fc2", self.dtype)(x)


class Block(nn.Module):
  """Pre-norm transformer block with stochastic depth."""

  dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dp = DropPath(self.drop_path, name="drop_path")
    y = Attention(self.dim, self.num_heads, self.qkv_bias, self.dtype, name="attn")(_layer_norm("norm1", self.dtype)(x))
    x = x + dp(y, train)
    y = Mlp(int(self.dim * self.mlp_ratio), self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))
    return x + dp(y, train)


class VisionTransformer(nn.Module):
  """DINO ViT returning normalised token maps of the extracted blocks and the final CLS feature.

  Attributes:
    img_size: side the position embedding is stored for (224 -> 14 x 14 grid + CLS).
    extract_layers: 0-based block indices whose outputs (after the shared final `norm`) are returned.
    cls_mode: 'ignore' (drop CLS), 'add' (add CLS to each token) or 'proj' (Dense(2D -> D) on [CLS, token],
      one `cls_token_layers_{i}/mlp` per extracted level).
  """

  embed_dim: int
  depth: int
  num_heads: int
  patch_size: int = 16
  img_size: int = 224
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  extract_layers: tuple[int, ...] = (2, 5, 8, 11)
  cls_mode: str = "ignore"
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[list[jax.Array], jax.Array]:
    """Args: x: `[B, S, S, 3]` normalised images. Returns: (list of `[B, S/p, S/p, D]`, f_cls `[B, D]`)."""
    if self.cls_mode not in CLS_MODES:
      raise ValueError(f"VisionTransformer: cls_mode must be one of {CLS_MODES}; got {self.cls_mode!r}.")
    d = self.embed_dim
    x = PatchEmbed(d, self.patch_size, self.dtype, name="patch_embed")(x)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, d)
    n_stored = (self.img_size // self.patch_size) ** 2
    cls_token = self.param("cls_token", trunc_normal_02, (1, 1, d))
    pos_embed = self.param("pos_embed", trunc_normal_02, (1, 1 + n_stored, d))
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)).astype(x.dtype), x], axis=1)
    x = x + ops.resize_pos_embed(pos_embed, (gh, gw)).astype(x.dtype)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    norm = _layer_norm("norm", self.dtype)
    extracted = []
    for i in range(self.depth):
      x = Block(d, self.num_heads, self.mlp_ratio, self.qkv_bias, float(rates[i]), self.dtype, name=f"blocks_{i}")(
          x, train)
      if i in self.extract_layers:
        extracted.append(norm(x))
    f_cls = extracted[-1][:, 0] if self.extract_layers[-1] == self.depth - 1 else norm(x)[:, 0]
    maps = []
    for i, t in enumerate(extracted):
      if self.cls_mode == "ignore":
        t = t[:, 1:]
      elif self.cls_mode == "add":
        t = t[:, 1:] + t[:, :1]
      else:
        cls = jnp.broadcast_to(t[:, :1], t[:, 1:].shape)
        t = nn.Dense(d, dtype=self.dtype, kernel_init=trunc_normal_02, name=f"cls_token_layers_{i}_mlp")(
            jnp.concatenate([cls, t[:, 1:]], axis=-1))
      maps.append(t.reshape(b, gh, gw, d))
    return maps, f_cls


def check_images(x: jax.Array, multiple: int, name: str = "images") -> None:
  """Raises ValueError unless `x` is `[B, S, S, 3]` with S a multiple of `multiple` (static shapes, jit-safe)."""
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"`{name}` must be [B, S, S, 3] (NHWC, normalised); got shape {tuple(x.shape)}.")
  if x.shape[1] != x.shape[2]:
    raise ValueError(f"`{name}` must be square [B, S, S, 3]; got shape {tuple(x.shape)} "
                     f"(H={x.shape[1]} != W={x.shape[2]}).")
  if x.shape[1] % multiple or x.shape[1] == 0:
    s = x.shape[1]
    raise ValueError(f"`{name}` side S must be a positive multiple of {multiple}; got shape {tuple(x.shape)} "
                     f"(S={s}; nearest valid sides {max(multiple, s // multiple * multiple)} or "
                     f"{(s // multiple + 1) * multiple}).")


class MUSEViT(nn.Module):
  """MUSE ViT backbone: `encoder` (VisionTransformer) -> `decoder` (reassembly, U-Net, hyper-features).

  `__call__(images [B, S, S, 3], train) -> {'f_map': [B, S/4, S/4, D], 'f_cls': [B, D]}` (float32).
  """

  embed_dim: int
  depth: int
  num_heads: int
  patch_size: int = 16
  img_size: int = 224
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  extract_layers: tuple[int, ...] = (2, 5, 8, 11)
  cls_mode: str = "ignore"
  dim_ratios: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
  drop_path_rate: float = 0.0
  bn_axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    check_images(images, self.patch_size)
    if len(self.extract_layers) != 4:
      raise ValueError(f"MUSEViT: extract_layers must name 4 blocks; got {self.extract_layers}.")
    maps, f_cls = VisionTransformer(
        self.embed_dim, self.depth, self.num_heads, self.patch_size, self.img_size, self.mlp_ratio, self.qkv_bias,
        tuple(self.extract_layers), self.cls_mode, self.drop_path_rate, self.dtype, name="encoder")(images, train)
    d = self.embed_dim
    dims = tuple(int(d * r) for r in self.dim_ratios)
    f_map = Decoder(dims, d // 4, reassemble=True, patch_size=self.patch_size, bn_axis_name=self.bn_axis_name,
                    dtype=self.dtype, conv_impl=self.conv_impl, name="decoder")(maps, train)
    return {"f_map": f_map.astype(jnp.float32), "f_cls": f_cls.astype(jnp.float32)}


def vit_kwargs(cfg: Any) -> dict[str, Any]:
  """MUSEViT constructor arguments from a model config (see `configs/models.py`)."""
  return dict(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=cfg.patch_size,
              img_size=cfg.img_size, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
              extract_layers=tuple(cfg.extract_layers), cls_mode=cfg.cls_mode, dim_ratios=tuple(cfg.dim_ratios),
              drop_path_rate=float(cfg.drop_path_rate), bn_axis_name=cfg.bn_axis_name, dtype=jnp.dtype(cfg.dtype),
              conv_impl=cfg.get("conv_impl", "auto"))

