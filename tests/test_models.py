"""Tests of the MUSE backbones, the DINO head and the model configs.

Parameter counts and big input sizes use `jax.eval_shape` (trace only: no compile, no allocation); real compute
runs only on the tiny variants at small sizes.
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.models import VARIANTS, get_config
from muse_jax.models import DINOHead, build_backbone


def _shapes_of_init(module, side):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, side, side, 3)), train=False))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _init_and_eval(module):
  """One compiled function: init from `key` on `images`, then the eval-mode forward of the same images."""

  @jax.jit
  def fn(key, images):
    variables = module.init(key, images, train=False)
    return variables, module.apply(variables, images, train=False)

  return fn


@pytest.fixture(scope="module")
def tiny():
  module = build_backbone(get_config("tiny"), drop_path_rate=0.2)
  images = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
  fn = _init_and_eval(module)
  variables, out = fn(jax.random.key(0), images)
  return module, fn, variables, images, out


# The counts in the official key tables (alibaba-damo-academy/MUSE@d4e3c0a, 224 px) are the trainable tensors:
# BN running statistics and num_batches_tracked are not included, so they compare to our 'params' collection.
@pytest.mark.parametrize("variant,expected", [("vit_s16", 31_070_784), ("vit_b16", 123_409_536),
                                              ("r50", 86_435_392)])
def test_param_counts_match_official(variant, expected):
  shapes = _shapes_of_init(build_backbone(get_config(variant)), 224)
  assert _count(shapes["params"]) == expected


def test_vit_s16_variable_names_and_shapes_follow_official_layout():
  shapes = _shapes_of_init(build_backbone(get_config("vit_s16")), 224)
  flat = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(shapes).items()}
  want = {
      "params/encoder/cls_token": (1, 1, 384),
      "params/encoder/pos_embed": (1, 197, 384),
      "params/encoder/patch_embed/proj/kernel": (16, 16, 3, 384),
      "params/encoder/blocks_11/attn/qkv/kernel": (384, 1152),
      "params/encoder/blocks_11/attn/qkv/bias": (1152,),
      "params/encoder/blocks_0/mlp/fc1/kernel": (384, 1536),
      "params/encoder/norm/scale": (384,),
      "params/decoder/dim_map_layers_3/kernel": (1, 1, 384, 768),
      "params/decoder/decoder3/first_block/conv/kernel": (3, 3, 1152, 384),
      "params/decoder/decoder1/last_block/conv2/bn/scale": (96,),
      "batch_stats/decoder/decoder1/last_block/conv2/bn/var": (96,),
      "params/decoder/hyper_feats/conv_list_3/conv/kernel": (1, 1, 768, 96),
  }
  for k, v in want.items():
    assert flat.get(k) == v, k
  # 232 official entries = 150 encoder + 4 dim-map + 13 ConvLayers x 6 (conv weight; BN weight, bias, running mean,
  # running var, num_batches_tracked); ours has no num_batches_tracked: 232 - 13 = 219 arrays.
  assert len(flat) == 219
  assert not any("shortcut" in k for k in flat)


def test_r50_variable_names():
  shapes = _shapes_of_init(build_backbone(get_config("r50")), 64)
  flat = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(shapes["params"]).items()}
  assert flat["encoder/conv1/kernel"] == (7, 7, 3, 64)
  assert flat["encoder/layer1_0/downsample_conv/kernel"] == (1, 1, 64, 256)
  assert flat["encoder/layer4_2/conv3/kernel"] == (1, 1, 512, 2048)
  assert flat["decoder/decoder3/first_block/conv/kernel"] == (3, 3, 3072, 1024)
  assert flat["decoder/hyper_feats/conv_list_3/conv/kernel"] == (1, 1, 2048, 256)


@pytest.mark.parametrize("side", [96, 208, 224, 512, 1024])
def test_output_shapes_tiny_vit_every_size(side):
  module = build_backbone(get_config("tiny"))
  variables = _shapes_of_init(module, 224)  # pos_embed stored for 224, resized at run time
  out = jax.eval_shape(functools.partial(module.apply, train=False), variables, jnp.zeros((2, side, side, 3)))
  assert out["f_map"].shape == (2, side // 4, side // 4, 64) and out["f_map"].dtype == jnp.float32
  assert out["f_cls"].shape == (2, 64)


@pytest.mark.parametrize("variant,side", [("vit_s16", 208), ("vit_b16", 512), ("r50", 96), ("tiny_r50", 1024)])
def test_output_shapes_big_variants(variant, side):
  cfg = get_config(variant)
  module = build_backbone(cfg)
  variables = _shapes_of_init(module, 64 if cfg.arch == "resnet50" else 224)
  out = jax.eval_shape(functools.partial(module.apply, train=False), variables, jnp.zeros((1, side, side, 3)))
  assert out["f_map"].shape == (1, side // 4, side // 4, cfg.map_dim)
  assert out["f_cls"].shape == (1, cfg.cls_dim)


@pytest.mark.parametrize("mode,extra", [("add", 0), ("proj", 4 * (2 * 64 * 64 + 64))])
def test_cls_modes(mode, extra):
  module = build_backbone(get_config("tiny"), cls_mode=mode)
  shapes = _shapes_of_init(module, 96)
  base = _count(_shapes_of_init(build_backbone(get_config("tiny")), 96)["params"])
  assert _count(shapes["params"]) == base + extra
  out = jax.eval_shape(functools.partial(module.apply, train=False), shapes, jnp.zeros((1, 96, 96, 3)))
  assert out["f_map"].shape == (1, 24, 24, 64)


@pytest.mark.parametrize("shape,match", [
    ((1, 100, 100, 3), r"multiple of 16.*\(1, 100, 100, 3\)"),
    ((1, 96, 112, 3), r"square.*\(1, 96, 112, 3\)"),
    ((1, 96, 96, 1), r"\[B, S, S, 3\].*\(1, 96, 96, 1\)"),
    ((96, 96, 3), r"\[B, S, S, 3\]"),
])
def test_vit_rejects_bad_images(shape, match):
  module = build_backbone(get_config("tiny"))
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), jnp.zeros(shape))


def test_r50_rejects_side_not_multiple_of_32():
  with pytest.raises(ValueError, match=r"multiple of 32.*S=208"):
    _shapes_of_init(build_backbone(get_config("tiny_r50")), 208)


def test_config_errors():
  with pytest.raises(ValueError, match="unknown model variant 'vit_x'"):
    get_config("vit_x")
  with pytest.raises(ValueError, match="unknown override 'depthh'"):
    build_backbone(get_config("tiny"), depthh=3)
  for v in VARIANTS:
    cfg = get_config(v)
    assert cfg.arch in ("vit", "resnet50") and cfg.map_dim > 0 and cfg.cls_dim > 0 and cfg.patch_size in (8, 16, 32)
  assert get_config("tiny_p8").patch_size == 8  # the CPU-scale recipe's backbone (configs/pretrain.py:small)


def test_tiny_eval_deterministic_batch_independent_and_no_drop_path(tiny):
  _, fn, variables, images, out = tiny
  assert out["f_map"].shape == (3, 16, 16, 64) and out["f_cls"].shape == (3, 64)
  assert np.isfinite(out["f_map"]).all() and np.isfinite(out["f_cls"]).all()
  # Same key and images: bit-identical variables and outputs. Eval needs no 'dropout' rng although
  # drop_path_rate=0.2: drop-path is inactive in eval.
  variables2, out2 = fn(jax.random.key(0), images)
  np.testing.assert_array_equal(out2["f_map"], out["f_map"])
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2)))
  # Eval BN uses running statistics: changing image 1 leaves image 0's features unchanged.
  other = images.at[1].set(jax.random.normal(jax.random.key(9), images.shape[1:]) * 3.0)
  _, out3 = fn(jax.random.key(0), other)
  np.testing.assert_allclose(out3["f_map"][0], out["f_map"][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out3["f_cls"][0], out["f_cls"][0], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(out3["f_map"][1] - out["f_map"][1]).max()) > 1e-3


def test_tiny_train_batch_stats_drop_path_and_finite_grads(tiny):
  module, _, variables, images, _ = tiny
  params, stats = variables["params"], variables["batch_stats"]

  @jax.jit
  def step(params, images, key):
    def loss_fn(p):
      out, upd = module.apply({"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"],
                              rngs={"dropout": key})
      return jnp.mean(out["f_map"] ** 2) + jnp.mean(out["f_cls"] ** 2), (out, upd)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss1, (out1, upd1)), grads = step(params, images, jax.random.key(7))
  (_, (out2, _)), _ = step(params, images, jax.random.key(7))
  (_, (out3, _)), _ = step(params, images, jax.random.key(8))
  np.testing.assert_array_equal(out1["f_map"], out2["f_map"])  # same key, same numbers
  assert float(jnp.abs(out1["f_cls"] - out3["f_cls"]).max()) > 1e-4  # drop-path draws differ
  assert np.isfinite(float(loss1))
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(g).all() for g in leaves)
  nonzero = sum(float(jnp.abs(g).max()) > 0 for g in leaves)
  assert nonzero >= 0.9 * len(leaves)
  # Running statistics moved (momentum 0.9 toward the batch statistics); structure unchanged.
  assert jax.tree.structure(upd1["batch_stats"]) == jax.tree.structure(stats)
  m_old = stats["decoder"]["hyper_feats"]["conv_list_0"]["bn"]["mean"]
  m_new = upd1["batch_stats"]["decoder"]["hyper_feats"]["conv_list_0"]["bn"]["mean"]
  assert float(jnp.abs(m_new - m_old).max()) > 0
  # Train mode normalises with batch statistics: changing image 1 changes image 0's features.
  other = images.at[1].set(jax.random.normal(jax.random.key(9), images.shape[1:]) * 3.0)
  (_, (out4, _)), _ = step(params, other, jax.random.key(7))
  assert float(jnp.abs(out4["f_map"][0] - out1["f_map"][0]).max()) > 1e-4


def test_tiny_r50_forward_and_bfloat16_shapes():
  module = build_backbone(get_config("tiny_r50"))
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables, out = _init_and_eval(module)(jax.random.key(0), x)
  assert out["f_map"].shape == (2, 16, 16, 128) and out["f_cls"].shape == (2, 256)
  assert np.isfinite(out["f_map"]).all() and np.isfinite(out["f_cls"]).all()
  assert jax.tree.leaves(variables["batch_stats"])
  bf = build_backbone(get_config("tiny"), dtype="bfloat16")
  shapes = _shapes_of_init(bf, 64)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(shapes))  # parameters stay float32
  out_bf = jax.eval_shape(functools.partial(bf.apply, train=False), shapes, jnp.zeros((1, 64, 64, 3)))
  assert out_bf["f_map"].dtype == jnp.float32 and out_bf["f_map"].shape == (1, 16, 16, 64)


def test_dino_head():
  head = DINOHead(out_dim=50, hidden_dim=32, bottleneck_dim=8)
  x = jax.random.normal(jax.random.key(0), (3, 5, 16))
  variables = jax.jit(head.init)(jax.random.key(1), x)
  apply = jax.jit(head.apply)
  p = variables["params"]
  assert set(p) == {"mlp_0", "mlp_1", "mlp_2", "last_layer"} and set(p["last_layer"]) == {"weight_v"}
  assert p["last_layer"]["weight_v"].shape == (8, 50)
  logits = apply(variables, x)
  assert logits.shape == (3, 5, 50)
  # Unit-norm bottleneck times unit-norm prototypes: cosine similarities.
  assert float(jnp.abs(logits).max()) <= 1.0 + 1e-5
  # Weight norm: rescaling a prototype's direction v does not change the output.
  scaled = jax.tree.map(lambda a: a, p)
  scaled["last_layer"]["weight_v"] = p["last_layer"]["weight_v"] * jnp.arange(1.0, 51.0)
  np.testing.assert_allclose(apply({"params": scaled}, x), logits, rtol=1e-5, atol=1e-6)
  free = DINOHead(out_dim=50, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
  pf = jax.eval_shape(free.init, jax.random.key(1), x)["params"]
  assert pf["last_layer"]["weight_g"].shape == (50,)
  one = jax.eval_shape(DINOHead(out_dim=10, bottleneck_dim=8, num_layers=1).init, jax.random.key(0), x)["params"]
  assert set(one) == {"mlp_0", "last_layer"}


def test_weight_norm_dense_is_x_times_the_normalised_kernel_with_gain_and_gradient():
  """(x @ v) * g / ||v|| (the fast form, issue #23) equals PyTorch's weight_norm x @ (g * v / ||v||), value and grad."""
  from muse_jax.models.heads import WeightNormDense

  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  v = rng.normal(size=(6, 9)).astype(np.float32)
  g = rng.uniform(0.5, 2.0, size=9).astype(np.float32)
  layer = WeightNormDense(9, learn_gain=True)

  def ours(v, g):
    return layer.apply({"params": {"weight_v": v, "weight_g": g}}, x)

  def formed(v, g):  # the kernel formed explicitly, as torch.nn.utils.weight_norm does
    return x @ (g * v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True)))

  want = x.astype(np.float64) @ (g * v / np.linalg.norm(v.astype(np.float64), axis=0, keepdims=True))
  np.testing.assert_allclose(ours(v, g), want, rtol=1e-5, atol=1e-6)
  w = rng.normal(size=(4, 9)).astype(np.float32)
  grads = jax.grad(lambda v, g: jnp.sum(ours(v, g) * w), argnums=(0, 1))(v, g)
  ref = jax.grad(lambda v, g: jnp.sum(formed(v, g) * w), argnums=(0, 1))(v, g)
  for a, b in zip(grads, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_l2_normalize_matches_torch_semantics_and_has_finite_gradient_at_zero():
  from muse_jax.models.heads import l2_normalize

  x = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
  grad = jax.grad(lambda v: l2_normalize(v).sum())(x)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_gelu_is_pytorchs_exact_gelu_with_its_gradient():
  """`layers.gelu` (the erf form, issue #23) against a float64 reference and against `jax.nn.gelu(exact)`."""
  import math  # pylint: disable=import-outside-toplevel
  from muse_jax.models.layers import gelu  # pylint: disable=import-outside-toplevel
  x = np.concatenate([np.linspace(-12, 12, 4001), [-1e-3, 0.0, 1e-3, 30.0, -30.0]]).astype(np.float32)
  xd = x.astype(np.float64)
  erf = np.vectorize(math.erf)(xd / math.sqrt(2))
  ref = 0.5 * xd * (1 + erf)
  dref = 0.5 * (1 + erf) + xd * np.exp(-0.5 * xd * xd) / math.sqrt(2 * math.pi)
  y = np.asarray(jax.jit(gelu)(jnp.asarray(x)))
  dy = np.asarray(jax.jit(jax.vmap(jax.grad(gelu)))(jnp.asarray(x)))
  tol = 2e-6 * np.maximum(1.0, np.abs(xd))
  assert np.all(np.abs(y - ref) <= tol), float(np.max(np.abs(y - ref) / tol))
  assert np.all(np.abs(dy - dref) <= 4e-6), float(np.max(np.abs(dy - dref)))
  np.testing.assert_allclose(y, np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False)), rtol=0, atol=2e-6 * 12)
  assert y.dtype == np.float32 and gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("heads", [4, 2])  # head_dim 16 (q scaling exact) and 32 (not a power of 4)
def test_attention_equals_softmax_attention_in_float64(heads):
  """`vit.Attention` normalises after the value product (issue #23); values and input gradient match the textbook
  softmax(q k^T / sqrt(hd)) v computed in float64, including logits large enough to overflow a naive exp."""
  import math  # pylint: disable=import-outside-toplevel
  from muse_jax.models.vit import Attention  # pylint: disable=import-outside-toplevel
  dim, t = 64, 11
  module = Attention(dim, heads)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, t, dim)).astype(np.float32))
  params = module.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p * 60.0 if p.ndim == 2 else p, params)  # large logits (hundreds)

  def ref(xs, p):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    qkv = (xs @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(xs.shape[0], t, 3, heads, dim // heads)
    q, k, v = (np.transpose(qkv[:, :, i], (0, 2, 1, 3)) for i in range(3))
    s = q @ np.swapaxes(k, -1, -2) / math.sqrt(dim // heads)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    out = np.transpose(a @ v, (0, 2, 1, 3)).reshape(xs.shape[0], t, dim)
    return out @ p["proj"]["kernel"] + p["proj"]["bias"], float(np.abs(s).max())

  want, max_logit = ref(np.asarray(x, np.float64), params)
  assert max_logit > 100  # exp(100) overflows float32: needs the max subtraction
  got = np.asarray(jax.jit(module.apply)({"params": params}, x))
  scale = np.abs(want).max()
  assert np.abs(got - want).max() <= 1e-5 * scale, np.abs(got - want).max() / scale
  # Input gradient of a scalar, at the initial (moderate) weights: against central differences of the float64
  # reference along a random direction; at the large logits: finite.
  params0 = module.init(jax.random.key(0), x)["params"]
  w = rng.normal(size=want.shape)
  grad = lambda p: np.asarray(jax.jit(jax.grad(  # noqa: E731
      lambda xx: jnp.sum(module.apply({"params": p}, xx) * w)))(x), np.float64)
  assert np.all(np.isfinite(grad(params)))
  g, d, eps, x64 = grad(params0), rng.normal(size=x.shape), 1e-4, np.asarray(x, np.float64)
  num = (np.sum(ref(x64 + eps * d, params0)[0] * w) - np.sum(ref(x64 - eps * d, params0)[0] * w)) / (2 * eps)
  assert abs(float(np.sum(g * d)) - num) <= 1e-4 * max(1.0, abs(num)), (float(np.sum(g * d)), num)
