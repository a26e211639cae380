"""Winograd F(2x2, 3x3) and 1x1-as-matmul convolutions (`muse_jax/models/conv.py`) against XLA's convolution."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import flax.linen as nn

from configs.models import get_config
from muse_jax.models import build_backbone
from muse_jax.models import conv as conv_lib
from muse_jax.models.decoder import UnetBlock
from muse_jax.models.resnet import Bottleneck

_DN = ("NHWC", "HWIO", "NHWC")


def _direct(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN,
                                  precision=lax.Precision.HIGHEST)


def _np_conv(x, w):
  """float64 numpy reference: 'same' 3x3 cross-correlation, zero padding 1."""
  b, h, wd, _ = x.shape
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, wd, w.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += np.einsum("bhwc,co->bhwo", xp[:, i:i + h, j:j + wd], w[i, j].astype(np.float64))
  return out


@pytest.mark.parametrize("shape", [(2, 8, 8, 5, 7), (1, 7, 5, 3, 4), (3, 1, 1, 2, 2), (1, 2, 3, 1, 1),
                                   (2, 13, 9, 16, 8)])
def test_winograd_equals_the_direct_convolution_any_side(shape):
  b, h, w, ci, co = shape
  rng = np.random.RandomState(sum(shape))
  x = rng.randn(b, h, w, ci).astype(np.float32)
  k = rng.randn(3, 3, ci, co).astype(np.float32)
  ref = _np_conv(x, k)
  out = np.asarray(jax.jit(conv_lib.winograd_conv3x3)(x, k))
  assert out.shape == (b, h, w, co) and out.dtype == np.float32
  scale = np.abs(ref).max()
  np.testing.assert_allclose(out / scale, ref / scale, atol=2e-6)
  # and the direct float32 convolution is as far from float64 as Winograd is (same rounding class)
  np.testing.assert_allclose(np.asarray(_direct(x, k)) / scale, ref / scale, atol=2e-6)


def test_winograd_gradients_equal_the_direct_ones():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 10, 6, 12).astype(np.float32))
  k = jnp.asarray((rng.randn(3, 3, 12, 9) / 6).astype(np.float32))
  dy = jnp.asarray(rng.randn(2, 10, 6, 9).astype(np.float32))
  vjp = lambda f: jax.jit(lambda x, k, dy: jax.vjp(f, x, k)[1](dy))  # noqa: E731
  (dx_w, dk_w), (dx_d, dk_d) = vjp(conv_lib.winograd_conv3x3)(x, k, dy), vjp(_direct)(x, k, dy)
  for a, b in ((dx_w, dx_d), (dk_w, dk_d)):
    s = float(jnp.abs(b).max())
    np.testing.assert_allclose(np.asarray(a) / s, np.asarray(b) / s, atol=2e-6)
  # the gradient is Winograd too: no convolution in the backward program
  jaxpr = str(jax.make_jaxpr(vjp(conv_lib.winograd_conv3x3))(x, k, dy))
  assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


def _uses_winograd(fn, *args) -> bool:
  jaxpr = str(jax.make_jaxpr(fn)(*args))
  return "conv_general_dilated" not in jaxpr


@pytest.mark.parametrize("kwargs,eligible", [
    (dict(), True),
    (dict(window_strides=(2, 2)), False),
    (dict(padding="SAME"), False),  # string padding: left to XLA
    (dict(padding=((0, 0), (0, 0))), False),
    (dict(rhs_dilation=(2, 2)), False),
    (dict(lhs_dilation=(2, 2)), False),
    (dict(feature_group_count=2), False),
    (dict(kernel=1), False),
    (dict(precision=lax.Precision.HIGHEST), False),
])
def test_only_same_3x3_stride_1_convolutions_take_the_winograd_route(kwargs, eligible):
  kwargs = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)), **kwargs}
  ksz = kwargs.pop("kernel", 3)
  groups = kwargs.get("feature_group_count", 1)
  x = jnp.ones((1, 8, 8, 4))
  k = jnp.ones((ksz, ksz, 4 // groups, 4))
  dn = lax.conv_dimension_numbers(x.shape, k.shape, _DN)
  fn = lambda x, k: conv_lib.conv_general_dilated(x, k, dimension_numbers=dn, impl="winograd", **kwargs)  # noqa
  assert _uses_winograd(fn, x, k) == eligible
  ref = lax.conv_general_dilated(x, k, dimension_numbers=dn, **kwargs)
  np.testing.assert_allclose(fn(x, k), ref, rtol=1e-6)


def test_auto_rule_takes_winograd_for_large_channel_counts_only():
  dn = lax.conv_dimension_numbers((1, 8, 8, 1), (3, 3, 1, 1), _DN)
  conv = lambda x, k: conv_lib.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn,  # noqa
                                                    impl="rule")
  big = jax.ShapeDtypeStruct((1, 8, 8, 192), jnp.float32), jax.ShapeDtypeStruct((3, 3, 192, 192), jnp.float32)
  small = jax.ShapeDtypeStruct((1, 8, 8, 96), jnp.float32), jax.ShapeDtypeStruct((3, 3, 96, 96), jnp.float32)
  tiny_map = jax.ShapeDtypeStruct((1, 7, 7, 512), jnp.float32), jax.ShapeDtypeStruct((3, 3, 512, 512), jnp.float32)
  assert _uses_winograd(conv, *big)          # harmonic mean 96
  assert not _uses_winograd(conv, *small)    # 48
  assert not _uses_winograd(conv, *tiny_map)  # sides < 8
  assert conv_lib.winograd_pays((8, 56, 56, 768), (3, 3, 768, 256))
  assert not conv_lib.winograd_pays((8, 56, 56, 288), (3, 3, 288, 96))


def test_resolve_auto_by_platform_and_dtype():
  assert jax.default_backend() == "cpu"
  assert conv_lib.resolve("auto", jnp.float32) == "rule"
  assert conv_lib.resolve("auto", jnp.bfloat16) == "xla"
  assert conv_lib.resolve("xla", jnp.float32) == "xla"
  assert conv_lib.resolve("winograd", jnp.bfloat16) == "winograd"
  for platform in ("tpu", "gpu"):
    with conv_lib.target_platform(platform):
      assert conv_lib.resolve("auto", jnp.float32) == "xla"
  assert conv_lib.resolve("auto", jnp.float32) == "rule"
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    conv_lib.resolve("fast", jnp.float32)


class _Net(nn.Module):
  """A ResNet bottleneck (3x3 stride-1 conv) feeding a decoder U-Net block (3x3 convs after resize + concat)."""
  conv_impl: str

  @nn.compact
  def __call__(self, x, skip, train):
    y = Bottleneck(8, 1, conv_impl=self.conv_impl, name="bottleneck")(x, train)
    return UnetBlock(16, 16, conv_impl=self.conv_impl, name="unet")(y, skip, train)


def test_modules_with_winograd_convs_match_xla_convs_in_value_and_gradient():
  """Same parameters, same outputs and gradients (train mode, batch statistics) up to float rounding (the full tiny
  backbones' forward with Winograd is checked against PyTorch in tests/test_torch_parity.py)."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 32))
  skip = jax.random.normal(jax.random.key(2), (2, 16, 16, 8))
  mods = {impl: _Net(impl) for impl in ("xla", "winograd")}
  variables = jax.jit(functools.partial(mods["xla"].init, train=False))(jax.random.key(0), x, skip)

  def run(module):
    def loss(params):
      out, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, skip, True,
                            mutable=["batch_stats"])
      return jnp.mean(out ** 2) + jnp.mean(out), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  (lx, ox), gx = run(mods["xla"])
  (lw, ow), gw = run(mods["winograd"])
  np.testing.assert_allclose(ow, ox, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(lw, lx, rtol=1e-5)
  # gradients to 1e-5 of the largest one (kernels feeding a train-mode BN have near-zero gradients whose digits are
  # rounding noise for either route)
  scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(gx))
  for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale)
  # every 3x3 stride-1 convolution (4) took the Winograd route and the bottleneck's two 1x1 convolutions the matmul
  n_conv = lambda m: str(jax.make_jaxpr(lambda v: m.apply(v, x, skip, False))(variables)).count(  # noqa: E731
      "conv_general_dilated")
  assert n_conv(mods["xla"]) == 6 and n_conv(mods["winograd"]) == 0


@pytest.mark.parametrize("shape,strides,padding", [
    ((2, 8, 8, 5, 7), (1, 1), ((0, 0), (0, 0))),
    ((2, 8, 8, 5, 7), (2, 2), ((0, 0), (0, 0))),
    ((1, 7, 5, 3, 4), (2, 2), "VALID"),
    ((1, 7, 5, 3, 4), (2, 2), "SAME"),
    ((3, 9, 6, 4, 2), (2, 1), ((0, 0), (0, 0))),
    ((1, 1, 1, 2, 3), (1, 1), "SAME"),
])
def test_pointwise_matmul_equals_the_1x1_convolution_in_value_and_gradient(shape, strides, padding):
  b, h, w, ci, co = shape
  x = jax.random.normal(jax.random.key(0), (b, h, w, ci))
  k = jax.random.normal(jax.random.key(1), (1, 1, ci, co))
  dn = lax.conv_dimension_numbers(x.shape, k.shape, _DN)
  ref_fn = lambda x, k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn,  # noqa: E731
                                                 precision=lax.Precision.HIGHEST)
  fn = lambda x, k: conv_lib.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn,  # noqa: E731
                                                  impl="rule")
  assert "conv_general_dilated" not in str(jax.make_jaxpr(fn)(x, k))
  out, ref = fn(x, k), ref_fn(x, k)
  assert out.shape == ref.shape == (b, -(-h // strides[0]), -(-w // strides[1]), co)
  expect = np.einsum("bhwc,co->bhwo", np.asarray(x, np.float64)[:, ::strides[0], ::strides[1]],
                     np.asarray(k, np.float64)[0, 0])
  np.testing.assert_allclose(out, expect, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  cot = jax.random.normal(jax.random.key(2), out.shape)
  for a, r in zip(jax.vjp(fn, x, k)[1](cot), jax.vjp(ref_fn, x, k)[1](cot)):
    np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,matmul", [
    (dict(), True),
    (dict(window_strides=(2, 2)), True),
    (dict(padding=((1, 1), (1, 1))), False),  # a padded 1x1 convolution (zero border): left to XLA
    (dict(rhs_dilation=(2, 2)), False),  # no effect on a 1x1 window, but only (1, 1) / None pass the check
    (dict(lhs_dilation=(2, 2)), False),
    (dict(feature_group_count=2), False),
    (dict(kernel=3, padding=((0, 0), (0, 0))), False),
    (dict(precision=lax.Precision.HIGHEST), False),
    (dict(impl="xla"), False),
])
def test_only_unpadded_1x1_convolutions_take_the_matmul_route(kwargs, matmul):
  kwargs = {"window_strides": (1, 1), "padding": ((0, 0), (0, 0)), "impl": "rule", **kwargs}
  ksz = kwargs.pop("kernel", 1)
  groups = kwargs.get("feature_group_count", 1)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  k = jax.random.normal(jax.random.key(1), (ksz, ksz, 4 // groups, 4))
  dn = lax.conv_dimension_numbers(x.shape, k.shape, _DN)
  impl = kwargs.pop("impl")
  fn = lambda x, k: conv_lib.conv_general_dilated(x, k, dimension_numbers=dn, impl=impl, **kwargs)  # noqa: E731
  assert ("conv_general_dilated" not in str(jax.make_jaxpr(fn)(x, k))) == matmul
  ref = lax.conv_general_dilated(x, k, dimension_numbers=dn, **kwargs)
  np.testing.assert_allclose(fn(x, k), ref, rtol=1e-5, atol=1e-5)


def test_aot_compiles_auto_as_xla_convolutions_for_the_target_platform():
  """`target_platform` (used by muse_jax.tools.aot) decides 'auto' at trace time, not the host's backend."""
  module = build_backbone(get_config("tiny_r50"), conv_impl="winograd")
  forced = str(jax.make_jaxpr(module.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  auto = build_backbone(get_config("tiny_r50"))
  with conv_lib.target_platform("tpu"):
    tpu = str(jax.make_jaxpr(auto.init)(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  xla = str(jax.make_jaxpr(build_backbone(get_config("tiny_r50"), conv_impl="xla").init)(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  assert tpu.count("conv_general_dilated") == xla.count("conv_general_dilated") > forced.count("conv_general_dilated")
