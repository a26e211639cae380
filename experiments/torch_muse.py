"""PyTorch re-implementation of the official MUSE backbones (same module names, so `state_dict()` has the official keys).

Written from the spec (docs only, no official code copied): DINO ViT blocks (explicit softmax attention, exact GELU,
LayerNorm eps 1e-6), ConvLayer, BasicResBlock, UnetBlock, HyperFeats, the ViT decoder and a timm-style ResNet.
Used by the parity tests (tests/test_torch_parity.py, tiny sizes, weights moved by muse_jax.tools.convert) and by
the same-run PyTorch baseline of experiments/bench_backbone.py (full sizes). Needs requirements-torch.txt; the
muse_jax package itself never imports torch.

  model = TMuseViT(get_config("vit_s16"))          # forward(x NCHW) -> (f_map NCHW, f_cls)
  model = TMuseResNet(get_config("r50"))
"""
from __future__ import annotations

import collections
import math

import numpy as np
import torch

nn = torch.nn
F = torch.nn.functional

class TAttention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TMlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class TBlock(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = TAttention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = TMlp(dim, 4 * dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TPatchEmbed(nn.Module):

  def __init__(self, dim, patch):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):
    return self.proj(x)


def torch_pos_resize(pos, grid, force=False):
  """Official bicubic position-embedding interpolation (scale_factor = (g + 0.1) / n)."""
  n = int(math.sqrt(pos.shape[1] - 1))
  if n == grid and not force:
    return pos
  d = pos.shape[-1]
  patch = pos[:, 1:].reshape(1, n, n, d).permute(0, 3, 1, 2)
  s = (grid + 0.1) / math.sqrt(n * n)
  patch = F.interpolate(patch, scale_factor=(s, s), mode="bicubic")
  assert patch.shape[-1] == grid
  return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, d)], dim=1)


class TViT(nn.Module):

  def __init__(self, dim, depth, heads, img_size, patch=16):
    super().__init__()
    self.patch = patch
    self.patch_embed = TPatchEmbed(dim, patch)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch) ** 2, dim))
    self.blocks = nn.ModuleList([TBlock(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def forward(self, x, layers):
    b, _, h, _ = x.shape
    x = self.patch_embed(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
    x = x + torch_pos_resize(self.pos_embed, h // self.patch)
    outs = []
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if i in layers:
        outs.append(self.norm(x))
    return outs


class TEncoder(nn.Module):

  def __init__(self, vit):
    super().__init__()
    self.encoder = vit


class TConvLayer(nn.Module):

  def __init__(self, cin, cout, k=3, act=True):
    super().__init__()
    self.layer = nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout),
                               nn.ReLU() if act else nn.Identity())

  def forward(self, x):
    return self.layer(x)


class TBasicResBlock(nn.Module):

  def __init__(self, cin, c, cout):
    super().__init__()
    self.conv1 = TConvLayer(cin, c, 3)
    self.conv2 = TConvLayer(c, cout, 3, act=False)
    self.shortcut_conv = nn.Identity() if cin == cout else TConvLayer(cin, cout, 1, act=False)

  def forward(self, x):
    return F.relu(self.conv2(self.conv1(x)) + self.shortcut_conv(x))


class TUnetBlock(nn.Module):

  def __init__(self, cin, c, cout):
    super().__init__()
    self.first_block = TConvLayer(cin, c, 3)
    self.last_block = TBasicResBlock(c, cout, cout)

  def forward(self, x_de, x_en):
    x_de = F.interpolate(x_de, size=x_en.shape[-1], mode="bilinear", align_corners=True)
    return self.last_block(self.first_block(torch.cat([x_de, x_en], 1)))


class THyperFeats(nn.Module):

  def __init__(self, cins, cout, by_scale):
    super().__init__()
    self.by_scale = by_scale
    self.conv_list = nn.ModuleList([TConvLayer(c, cout, 1, act=False) for c in cins])

  def forward(self, feats):
    outs = []
    for i, f in enumerate(feats):
      y = self.conv_list[i](f)
      if self.by_scale:  # ViT decoder: scale_factor 2**i
        y = F.interpolate(y, scale_factor=2**i, mode="bilinear", align_corners=True)
      else:  # R50 decoder: explicit size
        y = F.interpolate(y, size=feats[0].shape[-1], mode="bilinear", align_corners=True)
      outs.append(y)
    return torch.cat(outs, 1)


class TDecoder(nn.Module):

  def __init__(self, dims, hyper, embed_dim=None):
    super().__init__()
    if embed_dim is not None:
      self.dim_map_layers = nn.ModuleList([nn.Conv2d(embed_dim, d, 1, bias=False) for d in dims])
    self.decoder3 = TUnetBlock(dims[3] + dims[2], dims[2], dims[2])
    self.decoder2 = TUnetBlock(dims[2] + dims[1], dims[1], dims[1])
    self.decoder1 = TUnetBlock(dims[1] + dims[0], dims[0], dims[0])
    self.hyper_feats = THyperFeats(dims, hyper, by_scale=embed_dim is not None)

  def forward(self, feats):
    feats = list(feats)
    if hasattr(self, "dim_map_layers"):
      for i, ratio in enumerate((4, 2, 1, 0.5)):  # official: scale_factor = patch / stride
        feats[i] = self.dim_map_layers[i](feats[i])
        if ratio != 1:
          feats[i] = F.interpolate(feats[i], scale_factor=ratio, mode="bilinear", align_corners=True)
    e1, e2, e3, e4 = feats
    d3 = self.decoder3(e4, e3)
    d2 = self.decoder2(d3, e2)
    d1 = self.decoder1(d2, e1)
    return self.hyper_feats([d1, d2, d3, e4])


class TMuseViT(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    d = cfg.embed_dim
    self.layers = tuple(cfg.extract_layers)
    self.encoder = TEncoder(TViT(d, cfg.depth, cfg.num_heads, cfg.img_size))
    self.decoder = TDecoder([int(d * r) for r in cfg.dim_ratios], d // 4, embed_dim=d)

  def forward(self, x):
    toks = self.encoder.encoder(x, self.layers)
    b, _, h, w = x.shape
    maps = [t[:, 1:].reshape(b, h // 16, w // 16, -1).permute(0, 3, 1, 2) for t in toks]
    return self.decoder(maps), toks[-1][:, 0]


class TBottleneck(nn.Module):

  def __init__(self, cin, width, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(width * 4)
    if stride != 1 or cin != width * 4:
      self.downsample = nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (self.downsample(x) if hasattr(self, "downsample") else x))


class TResNet(nn.Module):

  def __init__(self, width, depths):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    cin = width
    for s, n in enumerate(depths):
      blocks = []
      for j in range(n):
        blocks.append(TBottleneck(cin, width * 2**s, 2 if (s > 0 and j == 0) else 1))
        cin = width * 2**s * 4
      setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
    self.n = len(depths)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    outs = []
    for s in range(self.n):
      x = getattr(self, f"layer{s + 1}")(x)
      outs.append(x)
    return outs


class TMuseResNet(nn.Module):

  def __init__(self, cfg):
    super().__init__()
    w = cfg.stem_width
    self.encoder = TEncoder(TResNet(w, tuple(cfg.stage_depths)))
    dims = [w * 4, w * 8, w * 16, w * 32]
    self.decoder = TDecoder(dims, dims[-1] // 8)

  def forward(self, x):
    feats = self.encoder.encoder(x)
    return self.decoder(feats), feats[-1].mean(dim=(2, 3))


def randomise(module, seed):
  """Non-trivial weights and BatchNorm statistics (defaults would hide scale/bias or mean/var mix-ups)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("weight") and p.ndim == 1:  # norm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        fan_in = p[0].numel() if p.ndim > 1 else p.shape[-1]
        p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    for m in module.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        m.num_batches_tracked.fill_(11)
  return module.eval()


def state_dict_np(module):
  return collections.OrderedDict((k, v.detach().numpy().copy()) for k, v in module.state_dict().items())


def nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))
