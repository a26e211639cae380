"""Our ops and modules against PyTorch, with weights moved by muse_jax.tools.convert (needs requirements-torch.txt).

The PyTorch side is `experiments/torch_muse.py`, a re-implementation of the official MUSE modules written from the
spec (same module names, so its `state_dict()` has the official keys), here at tiny sizes; the same code is the
same-run PyTorch baseline of experiments/bench_backbone.py.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import get_config
from muse_jax import ops
from muse_jax.models import build_backbone
from muse_jax.models.decoder import BasicResBlock, ConvLayer
from muse_jax.models.resnet import Bottleneck
from muse_jax.models.vit import Block
from muse_jax.tools import convert, export_torch, import_torch, torch_format

torch = pytest.importorskip("torch")
F = torch.nn.functional
from experiments.torch_muse import TMuseResNet, TMuseViT, torch_pos_resize  # noqa: E402
from experiments.torch_muse import nchw as _nchw, nhwc as _nhwc, randomise as _randomise  # noqa: E402
from experiments.torch_muse import state_dict_np as _state_dict_np  # noqa: E402

pytestmark = pytest.mark.torch

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_vit():
  cfg = get_config("tiny")
  model = _randomise(TMuseViT(cfg), 0)
  sd = _state_dict_np(model)
  variables, _ = convert.torch_to_variables(sd, cfg, pos_embed_resize="exact")
  return cfg, model, sd, variables


@pytest.fixture(scope="module")
def tiny_r50():
  cfg = get_config("tiny_r50")
  model = _randomise(TMuseResNet(cfg), 1)
  sd = _state_dict_np(model)
  variables, _ = convert.torch_to_variables(sd, cfg)
  return cfg, model, sd, variables


def _apply(module, variables, x, train=False, **kw):
  """One jitted apply (eager mode would compile every op separately)."""
  return jax.jit(lambda v, x: module.apply(v, x, train, **kw))(variables, jnp.asarray(x))


def _sub(variables, *path):
  out = {}
  for col in ("params", "batch_stats"):
    node = variables.get(col, {})
    for p in path:
      node = node.get(p, {})
    if node:
      out[col] = node
  return out


# --- ops against PyTorch -------------------------------------------------------------------------------------------


def test_sampler_matches_grid_sample():
  rng = np.random.default_rng(0)
  b, h, w, c, n, s = 2, 14, 14, 5, 40, 56
  f_map = rng.standard_normal((b, h, w, c), dtype=np.float32)
  coords = rng.uniform(-0.2 * s, 1.2 * s, (b, n, 2)).astype(np.float32)  # includes points outside the image
  coords[:, :4] = [[0, 0], [s, s], [s - 1, 0.5], [13.7, s]]
  mask = rng.random((b, n)) > 0.2
  ours = np.asarray(ops.sample_nuclei(jnp.asarray(f_map), jnp.asarray(coords), jnp.asarray(mask), s))
  grid = torch.from_numpy(2.0 * coords / s - 1.0)[:, None]  # [B, 1, N, 2], official normalisation
  ref = F.grid_sample(_nchw(f_map), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
  ref = ref[:, :, 0].permute(0, 2, 1).numpy() * mask[..., None]
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("hw,out_hw", [((7, 7), (13, 13)), ((8, 8), (4, 4)), ((7, 7), (3, 3)), ((6, 10), (11, 3)),
                                       ((4, 4), (32, 32)), ((5, 5), (1, 1))])
def test_resize_matches_interpolate_align_corners(hw, out_hw):
  x = np.random.default_rng(1).standard_normal((2,) + hw + (3,), dtype=np.float32)
  ours = np.asarray(ops.resize_bilinear_ac(jnp.asarray(x), out_hw))
  ref = _nhwc(F.interpolate(_nchw(x), size=out_hw, mode="bilinear", align_corners=True))
  np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("n,grid", [(14, 4), (14, 32), (14, 13), (32, 14), (14, 14)])
def test_pos_embed_resize_matches_bicubic_interpolate(n, grid):
  pos = np.random.default_rng(2).standard_normal((1, 1 + n * n, 8), dtype=np.float32)
  ref = torch_pos_resize(torch.from_numpy(pos), grid, force=True).numpy()
  if n != grid:
    ours = np.asarray(ops.resize_pos_embed(jnp.asarray(pos), (grid, grid)))
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=ATOL)
  offline = convert.resize_pos_embed_official(pos, grid, force=True)  # the import-time (official loader) path
  np.testing.assert_allclose(offline, ref, atol=ATOL, rtol=ATOL)


# --- modules with converted weights --------------------------------------------------------------------------------


def test_torch_reimplementation_has_the_official_keys(tiny_vit, tiny_r50):
  for cfg, _, sd, _ in (tiny_vit, tiny_r50):
    assert [(k, v.shape, str(v.dtype)) for k, v in sd.items()] == convert.official_key_table(cfg)


def test_vit_block(tiny_vit):
  cfg, model, _, variables = tiny_vit
  x = np.random.default_rng(3).standard_normal((2, 17, cfg.embed_dim), dtype=np.float32)
  ours = _apply(Block(cfg.embed_dim, cfg.num_heads), _sub(variables, "encoder", "blocks_1"), x)
  with torch.no_grad():
    ref = model.encoder.encoder.blocks[1](torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=ATOL)


def test_conv_bn_relu(tiny_vit):
  cfg, model, _, variables = tiny_vit
  tl = model.decoder.decoder2.first_block
  cin = tl.layer[0].in_channels
  x = np.random.default_rng(4).standard_normal((2, 6, 6, cin), dtype=np.float32)
  layer = ConvLayer(tl.layer[0].out_channels, 3, True)
  ours = _apply(layer, _sub(variables, "decoder", "decoder2", "first_block"), x)
  with torch.no_grad():
    ref = _nhwc(tl(_nchw(x)))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=ATOL)
  # Train mode (batch statistics): same outputs.
  ours_train, _ = _apply(layer, _sub(variables, "decoder", "decoder2", "first_block"), x, True,
                           mutable=["batch_stats"])
  tl_train = copy.deepcopy(tl).train()  # a copy: train mode updates the running statistics
  with torch.no_grad():
    ref_train = _nhwc(tl_train(_nchw(x)))
  np.testing.assert_allclose(np.asarray(ours_train), ref_train, atol=ATOL, rtol=ATOL)


def test_residual_blocks(tiny_vit, tiny_r50):
  cfg, model, _, variables = tiny_vit
  tb = model.decoder.decoder1.last_block
  c = tb.conv1.layer[0].in_channels
  x = np.random.default_rng(5).standard_normal((2, 8, 8, c), dtype=np.float32)
  ours = _apply(BasicResBlock(c, c), _sub(variables, "decoder", "decoder1", "last_block"), x)
  with torch.no_grad():
    ref = _nhwc(tb(_nchw(x)))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=ATOL)
  cfg, model, _, variables = tiny_r50
  tb = model.encoder.encoder.layer2[0]  # stride 2 with a downsample branch
  x = np.random.default_rng(6).standard_normal((2, 8, 8, tb.conv1.in_channels), dtype=np.float32)
  ours = _apply(Bottleneck(tb.conv1.out_channels, 2), _sub(variables, "encoder", "layer2_0"), x)
  with torch.no_grad():
    ref = _nhwc(tb(_nchw(x)))
  np.testing.assert_allclose(np.asarray(ours), ref, atol=ATOL, rtol=ATOL)


# tiny channels: under 'auto' the 3x3 convolutions are XLA's and the 1x1 ones matmuls; 'winograd' (tiny_r50:
# bottleneck and decoder 3x3 convolutions, the decoder being the ViTs' too) checks the Winograd route against PyTorch.
@pytest.mark.parametrize("which,conv_impl", [("tiny_vit", "auto"), ("tiny_r50", "auto"), ("tiny_r50", "winograd")])
def test_full_tiny_backbone_forward(which, conv_impl, request):
  cfg, model, _, variables = request.getfixturevalue(which)
  x = np.random.default_rng(7).standard_normal((2, 64, 64, 3), dtype=np.float32)
  out = _apply(build_backbone(cfg, conv_impl=conv_impl), variables, x)
  with torch.no_grad():
    f_map, f_cls = model(_nchw(x))
  np.testing.assert_allclose(np.asarray(out["f_map"]), _nhwc(f_map), atol=5e-5, rtol=5e-5)
  np.testing.assert_allclose(np.asarray(out["f_cls"]), f_cls.numpy(), atol=5e-5, rtol=5e-5)


def test_exported_file_loads_strictly_into_pytorch(tiny_vit, tmp_path):
  cfg, model, sd, _ = tiny_vit
  ckpt = tmp_path / "official.pth"
  torch.save({"teacher": {"module.backbone." + k: v for k, v in model.state_dict().items()}, "epoch": 1}, ckpt)
  backbone, _, info = import_torch.import_checkpoint(ckpt, tmp_path / "backbone", pos_embed_resize="exact")
  assert info["num_batches_tracked"] == 11
  out = export_torch.export_backbone(backbone, tmp_path / "exported.pth")
  loaded = torch.load(out, weights_only=True)["teacher"]
  fresh = TMuseViT(cfg).eval()
  fresh.load_state_dict({k[len("module.backbone."):]: v for k, v in loaded.items()}, strict=True)
  for k, v in fresh.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)
  assert torch_format.load(out)["teacher"].keys() == loaded.keys()
  jax.clear_caches()
