"""Scanned ViT blocks (`model.scan_blocks`): same maths as the per-block model, layouts convert both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import models as model_configs
from muse_jax import backbone_io
from muse_jax.models import build_backbone, vit
from muse_jax.tools import convert


def _cfgs(**kw):
  a = model_configs.get_config("tiny")
  for k, v in kw.items():
    a[k] = v
  b = model_configs.get_config("tiny")
  for k, v in kw.items():
    b[k] = v
  b.scan_blocks = True
  return a, b


def _images(n=2, s=32, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, s, s, 3))


@pytest.fixture(scope="module")
def tiny():
  """(config, scanned config, images, per-block variables on the host)."""
  cfg, scfg = _cfgs()
  x = _images()
  v = jax.device_get(jax.jit(lambda k: build_backbone(cfg).init(k, x, train=False))(jax.random.PRNGKey(0)))
  return cfg, scfg, x, v


def test_scanned_model_matches_per_block_model(tiny):
  cfg, scfg, x, v = tiny
  plain = build_backbone(cfg)
  sv = vit.stack_blocks(v, cfg.depth)
  leaf = sv["params"]["encoder"]["blocks"]["block"]["attn"]["qkv"]["kernel"]
  assert leaf.shape[0] == cfg.depth and "blocks_0" not in sv["params"]["encoder"]
  scanned = build_backbone(scfg)
  # the scanned module's own init has exactly this structure and these shapes
  sinit = jax.eval_shape(lambda k: scanned.init(k, x, train=False), jax.random.PRNGKey(0))
  assert jax.tree_util.tree_structure(sinit) == jax.tree_util.tree_structure(sv)
  assert jax.tree_util.tree_map(jnp.shape, sinit) == jax.tree_util.tree_map(jnp.shape, sv)
  for train in (False, True):
    kw = {"mutable": ["batch_stats"]} if train else {}
    a = jax.jit(lambda v, m=plain: m.apply(v, x, train=train, **kw))(v)
    b = jax.jit(lambda v, m=scanned: m.apply(v, x, train=train, **kw))(sv)
    a, b = (a[0], b[0]) if train else (a, b)
    for k in ("f_map", "f_cls"):
      np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-5, atol=1e-5)

  def loss(model):
    return lambda p, bs: jnp.mean(model.apply({"params": p, "batch_stats": bs}, x, train=False)["f_map"] ** 2)

  g = jax.jit(jax.grad(loss(plain)))(v["params"], v["batch_stats"])
  sg = jax.jit(jax.grad(loss(scanned)))(sv["params"], sv["batch_stats"])
  back = vit.unstack_blocks({"params": sg}, cfg.depth)["params"]
  for (pa, a), (pb, b) in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree_util.tree_leaves_with_path(back)):
    assert pa == pb
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_drop_path_in_the_scan_is_stochastic_and_needs_an_rng(tiny):
  cfg, _, x, v = tiny
  _, scfg = _cfgs(drop_path_rate=0.5)
  m = build_backbone(scfg)
  v = vit.stack_blocks(v, cfg.depth)
  f = jax.jit(lambda k: m.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})[0]["f_cls"])
  outs = [f(jax.random.PRNGKey(s)) for s in (0, 1)]
  assert np.all(np.isfinite(np.asarray(outs[0])))
  assert not np.allclose(np.asarray(outs[0]), np.asarray(outs[1]))
  with pytest.raises(Exception, match="dropout"):
    m.apply(v, x, train=True, mutable=["batch_stats"])
  # eval mode ignores drop path
  e1, e2 = m.apply(v, x, train=False), m.apply(v, x, train=False)
  np.testing.assert_array_equal(np.asarray(e1["f_cls"]), np.asarray(e2["f_cls"]))


def test_stack_unstack_round_trip_and_errors(tiny):
  cfg, _, _, v = tiny
  back = vit.unstack_blocks(vit.stack_blocks(v, cfg.depth), cfg.depth)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(v)
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="blocks_"):
    vit.stack_blocks(v, cfg.depth + 1)


def test_torch_conversion_and_export_of_a_scanned_model(tiny, tmp_path):
  cfg, scfg, _, v = tiny
  sv = vit.stack_blocks(v, cfg.depth)
  sd = convert.variables_to_torch(v, cfg)
  ssd = convert.variables_to_torch(sv, scfg)
  assert list(sd) == list(ssd)
  for k in sd:
    np.testing.assert_array_equal(sd[k], ssd[k])
  sv2, _ = convert.torch_to_variables(sd, scfg, pos_embed_resize="exact")
  for a, b in zip(jax.tree_util.tree_leaves(sv), jax.tree_util.tree_leaves(sv2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
  # an export keeps its config's layout and loads back
  backbone_io.save_backbone(tmp_path / "exp", scfg, sv)
  lcfg, lv = backbone_io.load_backbone(str(tmp_path / "exp"))
  assert lcfg.scan_blocks and "blocks" in lv["params"]["encoder"]
  with pytest.raises(Exception):
    backbone_io.check_variables(cfg, sv, source="scanned variables for an unscanned config")
