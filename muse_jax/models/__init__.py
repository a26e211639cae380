"""MUSE backbones (encoder + decoder) and projection heads in flax.linen.

Entry point: `build_backbone(model_cfg, **overrides) -> nn.Module` (configs in `configs/models.py`).

  module = build_backbone(get_config("vit_s16"))
  variables = module.init(rng, jnp.zeros((1, 224, 224, 3)), train=False)   # {'params', 'batch_stats'}
  out = module.apply(variables, images, train=False)                       # images: normalised [B, S, S, 3]
  out, updates = module.apply(variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': key})
  out['f_map']: [B, S/4, S/4, map_dim] float32; out['f_cls']: [B, cls_dim] float32.

Names: official PyTorch state-dict keys (alibaba-damo-academy/MUSE@d4e3c0a, without the `module.backbone.` prefix of
released checkpoints) -> our variables. `{i}`, `{j}` are indices; `/` separates Flax scopes. PyTorch conv weights
`[O, I, kh, kw]` become Flax kernels `[kh, kw, I, O]` (transpose 2, 3, 1, 0); Linear weights `[O, I]` become Dense
kernels `[I, O]` (transpose). BN `weight`/`bias` -> `params/.../scale`/`bias`; `running_mean`/`running_var` ->
`batch_stats/.../mean`/`var`; `num_batches_tracked` has no counterpart (dropped).

ViT (`MUSEViT`):

=====================================================  =========================================================
official key                                           ours (under `params/` unless noted)
=====================================================  =========================================================
encoder.encoder.cls_token            [1, 1, D]         encoder/cls_token            [1, 1, D]
encoder.encoder.pos_embed            [1, 1+N, D]       encoder/pos_embed            [1, 1+N, D]
encoder.encoder.patch_embed.proj.weight/.bias          encoder/patch_embed/proj/kernel [16, 16, 3, D] / bias
encoder.encoder.blocks.{i}.norm1.weight/.bias          encoder/blocks_{i}/norm1/scale / bias
encoder.encoder.blocks.{i}.attn.qkv.weight [3D, D]     encoder/blocks_{i}/attn/qkv/kernel [D, 3D] (+ bias [3D])
encoder.encoder.blocks.{i}.attn.proj.weight/.bias      encoder/blocks_{i}/attn/proj/kernel / bias
encoder.encoder.blocks.{i}.norm2.weight/.bias          encoder/blocks_{i}/norm2/scale / bias
encoder.encoder.blocks.{i}.mlp.fc1.weight/.bias        encoder/blocks_{i}/mlp/fc1/kernel / bias
encoder.encoder.blocks.{i}.mlp.fc2.weight/.bias        encoder/blocks_{i}/mlp/fc2/kernel / bias
encoder.encoder.norm.weight/.bias                      encoder/norm/scale / bias
encoder.cls_token_layers.{i}.mlp.weight/.bias ('proj') encoder/cls_token_layers_{i}_mlp/kernel / bias
decoder.dim_map_layers.{i}.weight    [O, D, 1, 1]      decoder/dim_map_layers_{i}/kernel [1, 1, D, O] (no bias)
=====================================================  =========================================================

Decoder (both `MUSEViT` and `MUSEResNet`; k in {1, 2, 3}, m in {0, 1, 2, 3}):

=====================================================  =========================================================
decoder.decoder{k}.first_block.layer.0.weight          decoder/decoder{k}/first_block/conv/kernel
decoder.decoder{k}.first_block.layer.1.*               decoder/decoder{k}/first_block/bn/*
decoder.decoder{k}.last_block.conv1.layer.0.weight     decoder/decoder{k}/last_block/conv1/conv/kernel
decoder.decoder{k}.last_block.conv1.layer.1.*          decoder/decoder{k}/last_block/conv1/bn/*
decoder.decoder{k}.last_block.conv2.layer.{0,1}.*      decoder/decoder{k}/last_block/conv2/{conv,bn}/*
decoder.decoder{k}.last_block.shortcut_conv.layer.*    decoder/decoder{k}/last_block/shortcut/{conv,bn}/* (unused:
                                                       in MUSE in == out channels, so no such keys exist)
decoder.hyper_feats.conv_list.{m}.layer.0.weight       decoder/hyper_feats/conv_list_{m}/conv/kernel
decoder.hyper_feats.conv_list.{m}.layer.1.*            decoder/hyper_feats/conv_list_{m}/bn/*
=====================================================  =========================================================

where `bn/*` is: `.weight` -> `params/.../bn/scale`, `.bias` -> `params/.../bn/bias`, `.running_mean` ->
`batch_stats/.../bn/mean`, `.running_var` -> `batch_stats/.../bn/var`.

ResNet-50 encoder (`MUSEResNet`; s in 1..4):

=====================================================  =========================================================
encoder.encoder.conv1.weight                           encoder/conv1/kernel
encoder.encoder.bn1.*                                  encoder/bn1/*
encoder.encoder.layer{s}.{j}.conv{1,2,3}.weight        encoder/layer{s}_{j}/conv{1,2,3}/kernel
encoder.encoder.layer{s}.{j}.bn{1,2,3}.*               encoder/layer{s}_{j}/bn{1,2,3}/*
encoder.encoder.layer{s}.0.downsample.0.weight         encoder/layer{s}_0/downsample_conv/kernel
encoder.encoder.layer{s}.0.downsample.1.*              encoder/layer{s}_0/downsample_bn/*
=====================================================  =========================================================

Parameter counts (the `params` collection; BN running statistics and `num_batches_tracked` excluded, which is also
how the counts in `official_keys/` are made): ViT-S/16 31,070,784; ViT-B/16 123,409,536; R50 86,435,392.

Heads: `heads.DINOHead` (its docstring gives its own name table).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections

from muse_jax.models.heads import DINOHead
from muse_jax.models.resnet import MUSEResNet, resnet_kwargs
from muse_jax.models.vit import MUSEViT, vit_kwargs

__all__ = ["build_backbone", "DINOHead", "MUSEViT", "MUSEResNet"]


# Fields newer than some saved model configs (exports, resumed runs): an override may add them.
_ADDED_FIELDS = ("conv_impl",)


def build_backbone(model_cfg: ml_collections.ConfigDict, **overrides: Any) -> nn.Module:
  """Builds the backbone module of a model config (`configs/models.py`).

  Args:
    model_cfg: a model ConfigDict (`arch` 'vit' or 'resnet50').
    **overrides: config fields to replace, e.g. `drop_path_rate=0.1`, `dtype='bfloat16'`, `bn_axis_name='data'`,
      `cls_mode='add'`, `conv_impl='xla'` (a config without the field means 'auto').

  Returns:
    A `MUSEViT` or `MUSEResNet` (unbound linen module).
  """
  cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  for k, v in overrides.items():
    if k not in cfg and k not in _ADDED_FIELDS:
      raise ValueError(f"build_backbone: unknown override {k!r}; config fields are {sorted(cfg.keys())}.")
    cfg[k] = v
  if cfg.arch == "vit":
    return MUSEViT(**vit_kwargs(cfg))
  if cfg.arch == "resnet50":
    return MUSEResNet(**resnet_kwargs(cfg))
  raise ValueError(f"build_backbone: model_cfg.arch must be 'vit' or 'resnet50'; got {cfg.arch!r}.")
