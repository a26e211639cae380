"""3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3), for the CPU (issue #23).

A 'same' 3x3 convolution with stride 1 costs 9 multiply-adds per output pixel and channel pair. Winograd's F(2x2, 3x3)
(Lavin & Gray 2016) computes each 2x2 output tile from a 4x4 input tile with 16: the input tiles and the kernel are
mapped by fixed linear transforms (coefficients 0, +-1, +-1/2), the 16 transformed positions are 16 independent
channel matmuls `[B * T, C_in] @ [C_in, C_out]` (T tiles per image), and a third transform gives the outputs. Written
in jnp, its gradient is Winograd too (autodiff transposes the transforms and the matmuls), so the input gradient and
the weight gradient also cost 16 / 36 of the direct ones.

Why: on XLA:CPU the MUSE decoder's 3x3 convolutions (768 -> 256 channels at 56 x 56, 1536 -> 512 at 28 x 28, 3072 ->
1024 at 14 x 14 for R50; 87% of the R50 backbone's FLOPs) run at 90-165 GFLOP/s direct, and their weight gradients
are the slowest part of a training step; with 2.25x fewer FLOPs they take 0.55-0.7x the time (measured in
`experiments/bench_backbone.py`, WORKSPACE.md "CPU speed against PyTorch"). The result differs from the direct
convolution by rounding only (the same sums in another order: max abs difference ~1e-6 of the output's scale in
float32; `tests/test_models.py`), so imported weights keep their outputs within the parity tests' tolerances.

`conv_impl` (model config field, `configs/models.py`):
  * 'auto' (default): Winograd for the 3x3 stride-1 float32 convolutions where it measured faster on this CPU class
    (`winograd_pays`: both sides >= 8 and harmonic channel mean c_in * c_out / (c_in + c_out) >= 96), XLA's
    convolution elsewhere; on GPU and TPU backends always XLA's (cuDNN / the MXU pick their own algorithms).
  * 'xla': always `lax.conv_general_dilated`.
  * 'winograd': every eligible 3x3 convolution (stride 1, no dilation, one group, padding 1) on any backend.

1x1 convolutions (the ResNet bottlenecks' conv1 / conv3 / strided downsample, the decoder's shortcuts, reassembly and
hyper-feature projections): where 'auto' resolves to the CPU rule, and with 'winograd', they run as one matmul
`x[:, ::s, ::s] @ w[0, 0]` (`pointwise_conv`): the same sums, and XLA:CPU lowers the matmul and its two gradients
to its GEMM, where its 1x1 convolution (mostly the backward) ran 1.5-3.7x slower fwd+bwd at the R50 shapes.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "winograd")
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("conv_target_platform", default=None)
_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))  # flax.linen.Conv's dimension numbers for 2-D NHWC inputs


def winograd_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
  """'Same' 3x3 convolution, stride 1, zero padding 1, by Winograd F(2x2, 3x3).

  Args:
    x: `[B, H, W, C_in]` (any H, W >= 1; odd sides are padded to even and cropped).
    w: `[3, 3, C_in, C_out]` kernel (HWIO, cross-correlation as `lax.conv_general_dilated`).

  Returns:
    `[B, H, W, C_out]` in the promoted dtype of x and w: `lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)))`
    up to float rounding.
  """
  if x.ndim != 4 or w.shape[:2] != (3, 3) or w.ndim != 4 or w.shape[2] != x.shape[-1]:
    raise ValueError(f"winograd_conv3x3: needs x [B, H, W, C] and w [3, 3, C, O]; got {tuple(x.shape)} and "
                     f"{tuple(w.shape)}.")
  dtype = jnp.promote_types(x.dtype, w.dtype)
  x, w = x.astype(dtype), w.astype(dtype)
  b, h, wd, ci = x.shape
  co = w.shape[-1]
  th, tw = -(-h // 2), -(-wd // 2)  # output tiles per column / row
  xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - wd), (0, 0)))  # [B, 2 th + 2, 2 tw + 2, C]

  def data_transform(r0, r1, r2, r3):  # B^T d over 4 taps, B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]
    return (r0 - r2, r1 + r2, r2 - r1, r1 - r3)

  rows = data_transform(*(xp[:, i:i + 2 * th:2] for i in range(4)))  # 4 x [B, th, 2 tw + 2, C]
  v = [c for r in rows for c in data_transform(*(r[:, :, j:j + 2 * tw:2] for j in range(4)))]  # 16 x [B, th, tw, C]
  v = jnp.stack(v).reshape(16, b * th * tw, ci)

  def filter_transform(g0, g1, g2):  # G g with G = [[1,0,0],[1/2,1/2,1/2],[1/2,-1/2,1/2],[0,0,1]]
    return (g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2)

  u = [c for r in filter_transform(w[0], w[1], w[2]) for c in filter_transform(r[0], r[1], r[2])]  # 16 x [C, O]
  u = jnp.stack(u)
  m = jnp.einsum("kpc,kco->kpo", v, u).reshape(4, 4, b, th, tw, co)

  def output_transform(m0, m1, m2, m3):  # A^T m with A^T = [[1,1,1,0],[0,1,-1,-1]]
    return (m0 + m1 + m2, m1 - m2 - m3)

  cols = output_transform(m[:, 0], m[:, 1], m[:, 2], m[:, 3])  # 2 (output column) x [4, B, th, tw, O]
  y = [output_transform(c[0], c[1], c[2], c[3]) for c in cols]  # y[col][row]: [B, th, tw, O]
  y = jnp.stack([jnp.stack([y[0][r], y[1][r]], axis=3) for r in range(2)], axis=2)  # [B, th, 2, tw, 2, O]
  return y.reshape(b, 2 * th, 2 * tw, co)[:, :h, :wd]


def _plain_2d(lhs_shape: Sequence[int], rhs_shape: Sequence[int], lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count: int, batch_group_count: int) -> bool:
  """A 2-D NHWC / HWIO convolution with no dilation, one group and no batch groups."""
  ones = (None, (1, 1), [1, 1])
  dn = dimension_numbers
  if isinstance(dn, lax.ConvDimensionNumbers):
    dn = (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec))
  return (len(lhs_shape) == 4 and len(rhs_shape) == 4
          and (lhs_dilation in ones or tuple(lhs_dilation) == (1, 1))
          and (rhs_dilation in ones or tuple(rhs_dilation) == (1, 1))
          and dn == _NHWC_HWIO and feature_group_count == 1 and batch_group_count == 1)


def eligible(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides, padding, lhs_dilation,
             rhs_dilation, dimension_numbers, feature_group_count: int, batch_group_count: int) -> bool:
  """Whether a `lax.conv_general_dilated` call is a 'same' 3x3 stride-1 NHWC / HWIO convolution Winograd computes."""
  return (_plain_2d(lhs_shape, rhs_shape, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                    batch_group_count)
          and tuple(rhs_shape[:2]) == (3, 3) and tuple(window_strides) == (1, 1)
          and not isinstance(padding, str) and [tuple(p) for p in padding] == [(1, 1), (1, 1)])


def pointwise_eligible(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides, padding, lhs_dilation,
                       rhs_dilation, dimension_numbers, feature_group_count: int, batch_group_count: int) -> bool:
  """Whether a `lax.conv_general_dilated` call is a 1x1 NHWC / HWIO convolution with no padding (any stride)."""
  del window_strides  # any stride: `pointwise_conv` subsamples
  no_pad = padding in ("VALID", "SAME") or (not isinstance(padding, str)
                                            and [tuple(p) for p in padding] == [(0, 0), (0, 0)])
  return (_plain_2d(lhs_shape, rhs_shape, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                    batch_group_count)
          and tuple(rhs_shape[:2]) == (1, 1) and no_pad)


def pointwise_conv(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1)) -> jax.Array:
  """1x1 convolution without padding as one matmul.

  Args:
    x: `[B, H, W, C_in]`.
    w: `[1, 1, C_in, C_out]` kernel (HWIO).
    strides: (s_h, s_w); a 1x1 window with stride s reads every s-th row / column from the first.

  Returns:
    `[B, ceil(H / s_h), ceil(W / s_w), C_out]` in the promoted dtype of x and w:
    `lax.conv_general_dilated(x, w, strides, 'VALID')` up to float rounding.
  """
  dtype = jnp.promote_types(x.dtype, w.dtype)
  sh, sw = strides
  x = x[:, ::sh, ::sw].astype(dtype)
  return lax.dot_general(x, w[0, 0].astype(dtype), (((3,), (0,)), ((), ())))


def winograd_pays(lhs_shape: Sequence[int], rhs_shape: Sequence[int]) -> bool:
  """The 'auto' rule: both sides >= 8 and c_in * c_out / (c_in + c_out) >= 96 (where it measured faster on CPU)."""
  _, h, w, _ = lhs_shape
  ci, co = rhs_shape[2], rhs_shape[3]
  return min(h, w) >= 8 and ci * co >= 96 * (ci + co)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
  """Traces inside the block resolve 'auto' for `platform` ('cpu', 'gpu', 'tpu') instead of the default backend.

  For programs compiled for devices that are not the default backend (`muse_jax.tools.aot` compiles TPU programs on
  a CPU host).
  """
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def direct_convolutions():
  """Traces inside the block resolve 'auto' to XLA's direct convolution (as on an accelerator): to count a model's
  nominal FLOPs on a CPU host (`experiments/bench_train.py`)."""
  return target_platform("nominal")


def resolve(impl: str, dtype: Any) -> str:
  """`conv_impl` -> what `conv_general_dilated` does: 'xla', 'winograd', or 'rule' (Winograd where `winograd_pays`).

  'auto' is 'rule' when tracing for the CPU (`target_platform`, else `jax.default_backend()`) with float32 compute,
  else 'xla'.
  """
  if impl not in CONV_IMPLS + ("rule",):
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}; got {impl!r}.")
  if impl != "auto":
    return impl
  platform = _TARGET_PLATFORM.get() or jax.default_backend()
  return "rule" if (platform == "cpu" and jnp.dtype(dtype) == jnp.float32) else "xla"


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, *, impl: str = "xla"):
  """`lax.conv_general_dilated`, by `winograd_conv3x3` for eligible 3x3 convolutions and by `pointwise_conv` for 1x1
  ones (`impl` from `resolve`; 'xla': always XLA's convolution)."""
  if impl != "xla" and precision is None and preferred_element_type is None:
    args = (lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count)
    if eligible(*args) and (impl == "winograd" or winograd_pays(lhs.shape, rhs.shape)):
      return winograd_conv3x3(lhs, rhs)
    if pointwise_eligible(*args):
      return pointwise_conv(lhs, rhs, tuple(window_strides))
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                                  precision=precision, preferred_element_type=preferred_element_type)


def conv_fn(impl: str, dtype: Any):
  """The `conv_general_dilated` argument of `flax.linen.Conv` for a `conv_impl` ('xla': None, Flax's default)."""
  impl = resolve(impl, dtype)
  if impl == "xla":
    return None
  return functools.partial(conv_general_dilated, impl=impl)
