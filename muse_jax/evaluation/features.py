"""Nucleus feature extraction for the classification protocols (spec §5.2).

One D-dim vector per labelled nucleus: the backbone runs in eval mode (BatchNorm running statistics, no drop-path,
no test-time augmentation) on each evaluation tile, and `f_map` is sampled bilinearly at the ground-truth nucleus
coordinates with `muse_jax.ops.sample_nuclei` (the O_bi convention u = x (w-1) / S).

Tiles are batched with a static shape: every tile's nucleus list is padded to one `n_pad` (a multiple of 32 over the
whole dataset, so all splits share one compiled program) with a boolean mask, and the last batch is padded with
blank tiles whose nuclei are all masked. Only real, labelled nuclei come back, in tile order and, within a tile,
in the tile's own order. The batch is sharded over all local devices along a `data` mesh axis.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from muse_jax.evaluation import metrics

# (images uint8 [B, S, S, 3], coords float32 [B, N, 2], mask bool [B, N]) -> features [B, N, C]
FeatureFn = Callable[[np.ndarray, np.ndarray, np.ndarray], Any]


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over `devices` (default: all local devices) with axis name `data`."""
  devices = list(devices) if devices is not None else jax.local_devices()
  return Mesh(np.array(devices).reshape(len(devices)), ("data",))


def build_sampler(module: Any, image_size: int) -> Callable:
  """The jit-compiled eval-mode forward + O_bi sampling of one module.

  Returns:
    fn(variables, images uint8 [B, S, S, 3], coords float32 [B, N, 2], mask bool [B, N]) -> float32 [B, N, C]
    (zeros where mask is False). Variables are an argument, so one compilation serves every set of weights
    (fine-tuning evaluates each epoch with it).
  """
  from muse_jax import ops  # pylint: disable=import-outside-toplevel

  @jax.jit
  def fn(variables, images, coords, mask):
    out = module.apply(variables, ops.normalize_images(images), train=False)
    return ops.sample_nuclei(out["f_map"], coords, mask, image_size)

  return fn


class BoundFeatureFn:
  """A `FeatureFn` from a jitted sampler and fixed variables; inputs are sharded along the mesh's `data` axis."""

  def __init__(self, sampler: Callable, variables: dict, mesh: Mesh | None = None):
    self.mesh = mesh or data_mesh()
    self.num_devices = self.mesh.size
    self.sampler = sampler
    self.variables = jax.device_put(variables, NamedSharding(self.mesh, P()))

  def __call__(self, images, coords, mask):
    spec = P("data") if images.shape[0] % self.num_devices == 0 else P()
    args = jax.device_put((images, coords, mask), NamedSharding(self.mesh, spec))
    return self.sampler(self.variables, *args)


def check_image_size(model_cfg: ml_collections.ConfigDict, image_size: int) -> None:
  """Raises ValueError unless `image_size` is a multiple of the backbone's total stride (16 for ViTs, 32 for R50)."""
  stride = 32 if model_cfg.arch == "resnet50" else int(model_cfg.patch_size)
  if image_size % stride:
    raise ValueError(f"image size {image_size} is not a multiple of {stride} (required by {model_cfg.arch})")


def eval_variables(model_cfg: ml_collections.ConfigDict, variables: dict, *, source: str) -> dict:
  """`{'params', 'batch_stats'}` of `variables`, checked against `model_cfg` (ValueError listing mismatches)."""
  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

  variables = {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats")}
  backbone_io.check_variables(model_cfg, variables, source=source)
  return variables


_SAMPLERS: dict[tuple[str, int], Callable] = {}


def cached_sampler(model_cfg: ml_collections.ConfigDict, image_size: int) -> Callable:
  """`build_sampler` for `model_cfg`, memoised per (config, image size) so that backbones of one architecture
  (e.g. a pretrained teacher and its random-init baseline) share one compiled program."""
  from muse_jax.models import build_backbone  # pylint: disable=import-outside-toplevel

  key = (json.dumps(model_cfg.to_dict(), sort_keys=True, default=str), int(image_size))
  if key not in _SAMPLERS:
    _SAMPLERS[key] = build_sampler(build_backbone(model_cfg), image_size)
  return _SAMPLERS[key]


def make_feature_fn(model_cfg: ml_collections.ConfigDict, variables: dict, *, image_size: int,
                    mesh: Mesh | None = None) -> FeatureFn:
  """A jit-compiled feature function for one backbone.

  Args:
    model_cfg: the model config (`configs/models.py`).
    variables: `{'params', 'batch_stats'}` matching `model_cfg` (checked first; a mismatch raises ValueError
      listing the missing, unexpected and mis-shaped variables).
    image_size: S, the square side of the evaluation tiles (a multiple of 16; of 32 for R50).
    mesh: device mesh with a `data` axis (default: all local devices); the batch is split along it.

  Returns:
    fn(images uint8 [B, S, S, 3], coords float32 [B, N, 2], mask bool [B, N]) -> float32 [B, N, map_dim], with
    zeros where mask is False.
  """
  check_image_size(model_cfg, image_size)
  variables = eval_variables(model_cfg, variables, source="backbone variables")
  return BoundFeatureFn(cached_sampler(model_cfg, image_size), variables, mesh)


RAW_PREFIX = "raw:"


def parse_raw_source(source: str) -> int | None:
  """`'raw:16'` -> 16 (the raw-pixel baseline's patch side in px); None for any other source string."""
  if not isinstance(source, str) or not source.startswith(RAW_PREFIX):
    return None
  spec = source[len(RAW_PREFIX):] or "16"
  try:
    patch = int(spec)
  except ValueError:
    raise ValueError(f"backbone {source!r}: expected raw:<patch side in px>, e.g. raw:16") from None
  if patch < 1 or patch > 128:
    raise ValueError(f"backbone {source!r}: the patch side must be in [1, 128] px (got {patch})")
  return patch


def raw_model_config(patch: int) -> ml_collections.ConfigDict:
  """A pseudo model config for the raw-pixel baseline (arch 'raw'; `map_dim` is the feature size)."""
  return ml_collections.ConfigDict({"arch": "raw", "name": f"raw{patch}", "patch_size": int(patch),
                                    "map_dim": int(patch) * int(patch) * 3})


class RawPatchFeatureFn:
  """The raw-pixel baseline: each nucleus's feature is the `patch` x `patch` window of ImageNet-normalised pixels
  centred on it (`[round(y) - patch // 2, + patch)` x the same in x, edge-replicated at the tile border), flattened.

  Same signature as `make_feature_fn`'s result: (images uint8 [B, S, S, 3], coords f32 [B, N, 2] (x, y),
  mask bool [B, N]) -> float32 [B, N, patch * patch * 3] (zeros where mask is False). Numpy only.
  """

  num_devices = 1

  def __init__(self, patch: int):
    self.patch = int(patch)

  def __call__(self, images, coords, mask):
    images = np.asarray(images)
    coords = np.asarray(coords, np.float32)
    mask = np.asarray(mask, bool)
    p = self.patch
    b, s = images.shape[0], images.shape[1]
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    img = (images.astype(np.float32) / 255.0 - mean) / std
    img = np.pad(img, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    n = coords.shape[1]
    out = np.zeros((b, n, p * p * 3), np.float32)
    offs = np.arange(p) - p // 2
    for i in range(b):
      sel = np.flatnonzero(mask[i])
      if sel.size == 0:
        continue
      cx = np.clip(np.rint(coords[i, sel, 0]).astype(np.int64), 0, s - 1) + p
      cy = np.clip(np.rint(coords[i, sel, 1]).astype(np.int64), 0, s - 1) + p
      ys = cy[:, None, None] + offs[None, :, None]
      xs = cx[:, None, None] + offs[None, None, :]
      out[i, sel] = img[i][ys, xs].reshape(sel.size, -1)
    return out


def labelled_mask(tile: dict, num_classes: int) -> np.ndarray:
  """Bool [N]: nuclei with a known class (id >= 0). Raises ValueError for ids < -1 or >= num_classes."""
  classes = np.asarray(tile["classes"])
  bad = (classes < -1) | (classes >= num_classes)
  if bad.any():
    raise ValueError(f"tile {tile.get('name', '?')!r}: class ids {sorted(set(classes[bad].tolist()))} are outside "
                     f"the class map [0, {num_classes}) (-1 = unknown is allowed)")
  return classes >= 0


def pad_size(tiles: Sequence[dict], multiple: int = 32) -> int:
  """The padded nucleus count N: the largest tile's count rounded up to `multiple` (at least `multiple`)."""
  n = max((len(t["coords"]) for t in tiles), default=0)
  return max(multiple, -(-n // multiple) * multiple)


def extract_features(tiles: Sequence[dict], feature_fn: FeatureFn, *, num_classes: int, batch_size: int = 10,
                     n_pad: int | None = None, split: str = "?",
                     progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
  """Features of every labelled nucleus of `tiles`, in order.

  Args:
    tiles: evaluation tiles (`eval_tiles.make_eval_tiles`): `image` uint8 [S, S, 3], `coords` float32 [N, 2] (x, y)
      in that image's pixels, `classes` int32 [N] (-1 = unknown, skipped), `name`.
    feature_fn: see `make_feature_fn` (or any function with that signature, e.g. in tests).
    num_classes: size of the class map; ids outside [-1, num_classes) raise ValueError.
    batch_size: tiles per call (§5.2 uses 10); rounded up to a multiple of `feature_fn.num_devices`.
    n_pad: padded nucleus count per tile (default `pad_size(tiles)`); must be >= every tile's count.
    split: name used in error messages.
    progress: called with the number of tiles done after each batch.

  Returns:
    `features` float32 [M, C], `labels` int32 [M], `tile_index` int32 [M] (index into `tiles`) and
    `nucleus_index` int32 [M] (index into that tile's lists), for the M labelled nuclei.
  """
  if not tiles:
    raise ValueError(f"extract_features: split {split!r} has no tiles (empty split)")
  masks = [labelled_mask(t, num_classes) for t in tiles]
  if not any(m.any() for m in masks):
    raise ValueError(f"extract_features: split {split!r} has no labelled nuclei (empty split)")
  n_pad = n_pad or pad_size(tiles)
  ndev = int(getattr(feature_fn, "num_devices", 1))
  batch_size = -(-int(batch_size) // ndev) * ndev
  size = tiles[0]["image"].shape[0]
  feats, labels, tile_idx, nuc_idx = [], [], [], []
  for start in range(0, len(tiles), batch_size):
    chunk = tiles[start:start + batch_size]
    images = np.zeros((batch_size, size, size, 3), np.uint8)
    coords = np.zeros((batch_size, n_pad, 2), np.float32)
    mask = np.zeros((batch_size, n_pad), bool)
    for b, t in enumerate(chunk):
      if t["image"].shape != (size, size, 3):
        raise ValueError(f"tile {t.get('name', '?')!r}: image shape {t['image'].shape}, expected {(size, size, 3)}")
      n = len(t["coords"])
      if n > n_pad:
        raise ValueError(f"tile {t.get('name', '?')!r} has {n} nuclei but n_pad is {n_pad}")
      images[b] = t["image"]
      coords[b, :n] = t["coords"]
      mask[b, :n] = masks[start + b]
    out = np.asarray(feature_fn(images, coords, mask))
    for b, t in enumerate(chunk):
      sel = np.flatnonzero(masks[start + b])
      feats.append(out[b, sel])
      labels.append(np.asarray(t["classes"])[sel])
      tile_idx.append(np.full(sel.size, start + b, np.int32))
      nuc_idx.append(sel.astype(np.int32))
    if progress is not None:
      progress(len(chunk))
  features = np.concatenate(feats).astype(np.float32)
  if not np.all(np.isfinite(features)):
    raise FloatingPointError(f"extract_features: non-finite features in split {split!r}")
  return {"features": features,
          "labels": metrics.check_labels(np.concatenate(labels), num_classes, what=f"{split} labels"),
          "tile_index": np.concatenate(tile_idx), "nucleus_index": np.concatenate(nuc_idx)}
