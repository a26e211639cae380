"""Backbone (encoder + decoder) variants of MUSE as ml_collections configs.

Usage: ``configs.models.get_config("vit_s16")`` or, with absl config flags,
``--model_config=configs/models.py:vit_s16 --model_config.drop_path_rate=0.1``.

Variants:
  * ``tiny``: 4-block ViT, embed_dim 64, 4 heads, patch 16, every block extracted (tests).
  * ``tiny_p8``: ``tiny`` with 8 px patches: a token is 4 µm at 0.5 µm/px, so one nucleus spans several tokens
    (the CPU-scale pretraining recipe ``configs/pretrain.py:small`` and ``make demo``).
  * ``vit_s16``: ViT-S/16 (D 384, 6 heads, depth 12), blocks (2, 5, 8, 11); f_map 384 ch, f_cls 384.
  * ``vit_b16``: ViT-B/16 (D 768, 12 heads, depth 12); f_map 768 ch, f_cls 768.
  * ``r50``: timm ResNet-50 (v1.5) + CattedDecoder; f_map 1024 ch, f_cls 2048 (global average pool of stage 4).
  * ``tiny_r50``: ResNet with one bottleneck per stage and stem width 8 (tests); f_map 128 ch, f_cls 256.

Fields shared by all variants: ``arch`` ('vit' | 'resnet50'), ``name``, ``img_size`` (the side the position
embedding is stored for), ``patch_size`` (16 for ViTs, 32 = total stride for ResNets: input sides must be multiples
of it), ``map_dim`` (f_map channels), ``cls_dim`` (f_cls size), ``drop_path_rate`` (stochastic depth, ViT only;
0 as in the released eval construction, DINO pretraining uses 0.1), ``dtype`` ('float32' or 'bfloat16' compute;
parameters stay float32), ``conv_impl`` (how the decoder's and ResNet's 3x3 and 1x1 convolutions are computed:
'auto' (default: on the CPU backend in float32, Winograd F(2x2, 3x3) for the large 3x3 ones and one matmul per 1x1
one; XLA's convolution elsewhere), 'xla', 'winograd' (both routes wherever they apply); same parameters, same values
up to float rounding: ``muse_jax/models/conv.py``), ``bn_axis_name``
(None: batch statistics over whatever batch the jitted function sees, i.e. the global batch under jit with a sharded
batch).
"""
from __future__ import annotations

import ml_collections

VARIANTS = ("tiny", "tiny_p8", "vit_s16", "vit_b16", "r50", "tiny_r50")

_VIT = {
    # name: (embed_dim, depth, num_heads, extract_layers)
    "tiny": (64, 4, 4, (0, 1, 2, 3)),
    "tiny_p8": (64, 4, 4, (0, 1, 2, 3)),
    "vit_s16": (384, 12, 6, (2, 5, 8, 11)),
    "vit_b16": (768, 12, 12, (2, 5, 8, 11)),
}
_RESNET = {
    # name: (stem_width, stage_depths)
    "r50": (64, (3, 4, 6, 3)),
    "tiny_r50": (8, (1, 1, 1, 1)),
}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the model config of a backbone variant (one of `VARIANTS`)."""
  cfg = ml_collections.ConfigDict()
  cfg.name = variant
  cfg.img_size = 224
  cfg.drop_path_rate = 0.0
  cfg.dtype = "float32"
  cfg.conv_impl = "auto"
  cfg.bn_axis_name = ml_collections.config_dict.placeholder(str)
  if variant in _VIT:
    d, depth, heads, layers = _VIT[variant]
    cfg.arch = "vit"
    cfg.patch_size = 8 if variant.endswith("_p8") else 16
    cfg.embed_dim = d
    cfg.depth = depth
    cfg.num_heads = heads
    cfg.mlp_ratio = 4.0
    cfg.qkv_bias = True
    cfg.extract_layers = layers
    cfg.cls_mode = "ignore"  # 'ignore' (released weights) | 'add' | 'proj'
    cfg.dim_ratios = (0.25, 0.5, 1.0, 2.0)
    cfg.map_dim = d
    cfg.cls_dim = d
  elif variant in _RESNET:
    width, depths = _RESNET[variant]
    cfg.arch = "resnet50"
    cfg.patch_size = 32
    cfg.stem_width = width
    cfg.stage_depths = depths
    top = width * 8 * 4  # stage-4 channels (2048 for R50)
    cfg.map_dim = top // 2  # 4 hyper-feature levels of top // 8 channels each
    cfg.cls_dim = top
  else:
    raise ValueError(f"get_config: unknown model variant {variant!r}; expected one of {VARIANTS}.")
  return cfg
