"""Official MUSE PyTorch state dicts <-> muse_jax backbone variables (ViT-S/16, ViT-B/16, R50 and the tiny variants).

The table of official names and shapes is generated from our own module tree: `official_key_table(model_cfg)` walks the
abstract variables of `build_backbone(model_cfg)` (shapes only, nothing allocated), renames each Flax path with a fixed
set of rules and converts its shape to the PyTorch layout, and adds one `num_batches_tracked` per BatchNorm:

| Flax (ours)                                  | PyTorch (official)                                 | layout        |
| ---                                          | ---                                                | ---           |
| `encoder/...` (ViT or ResNet)                | `encoder.encoder....`                              |               |
| `blocks_3`, `layer2_1`                       | `blocks.3`, `layer2.1`                             |               |
| `conv_list_0`, `dim_map_layers_1`            | `conv_list.0`, `dim_map_layers.1`                  |               |
| ConvLayer `conv` / `bn`                      | `layer.0` / `layer.1`                              |               |
| BasicResBlock `shortcut`                     | `shortcut_conv`                                    |               |
| ResNet `downsample_conv` / `downsample_bn`   | `downsample.0` / `downsample.1`                    |               |
| ViT `cls_token_layers_{i}_mlp` (proj mode)   | `encoder.cls_token_layers.{i}.mlp`                 |               |
| conv `kernel` `[kh, kw, in, out]`            | `weight` `[out, in, kh, kw]`                       | HWIO -> OIHW  |
| dense `kernel` `[in, out]`                   | `weight` `[out, in]`                               | transpose     |
| LayerNorm/BatchNorm `scale`, `bias`          | `weight`, `bias`                                   |               |
| batch_stats `mean`, `var`                    | `running_mean`, `running_var`                      |               |
| (none)                                       | `num_batches_tracked` (int64 scalar)               | dropped/made  |

The attention `qkv` kernel keeps PyTorch's fused output order `(3, heads, head_dim)`, so it only needs the transpose.
The position embedding is resized to the target config's grid (`img_size / 16`) with the official bicubic
arithmetic. With `pos_embed_resize='official'` (default for imports) it is resized even when the grid is unchanged,
as the official evaluation loader does (its `(img_size**2) // patch_size` bug makes it always interpolate with
`scale_factor = (g + 0.1) / g`); `'exact'` keeps it unchanged in that case.

Conversion is strict: every source tensor must be used and every target variable filled; otherwise
`ConversionError` lists the missing, unexpected and mis-shaped keys with their shapes.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import re
from typing import Any, Iterable, Mapping

import ml_collections
import numpy as np

__all__ = [
  "ConversionError",
  "TableEntry",
  "official_key_table",
  "extract_state_dict",
  "infer_variant",
  "torch_to_variables",
  "variables_to_torch",
  "resize_pos_embed_official",
]

Variables = dict[str, Any]
StateDict = Mapping[str, np.ndarray]

POS_EMBED_KEY = "encoder.encoder.pos_embed"
CHECKPOINT_PREFIX = "module.backbone."
POS_EMBED_MODES = ("official", "exact")


class ConversionError(ValueError):
  """A state dict does not match the target architecture (lists missing, unexpected and mis-shaped keys)."""


@dataclasses.dataclass(frozen=True)
class TableEntry:
  """One official tensor and where it lives in our variables.

  Attributes:
    key: official state-dict key (without the `module.backbone.` prefix).
    shape: PyTorch shape.
    dtype: 'float32' or 'int64' (num_batches_tracked).
    collection: 'params' or 'batch_stats' ('' for num_batches_tracked, which has no Flax counterpart).
    path: Flax path inside the collection (empty for num_batches_tracked).
    kind: 'conv' (HWIO <-> OIHW), 'dense' (transpose), 'plain' or 'count'.
  """

  key: str
  shape: tuple[int, ...]
  dtype: str
  collection: str
  path: tuple[str, ...]
  kind: str


# --- name map ------------------------------------------------------------------------------------------------------

_SEGMENT_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
  (re.compile(p), r) for p, r in (
    (r"^blocks_(\d+)$", r"blocks.\1"),
    (r"^layer(\d+)_(\d+)$", r"layer\1.\2"),
    (r"^dim_map_layers_(\d+)$", r"dim_map_layers.\1"),
    (r"^conv_list_(\d+)$", r"conv_list.\1"),
    (r"^downsample_conv$", "downsample.0"),
    (r"^downsample_bn$", "downsample.1"),
    (r"^conv$", "layer.0"),
    (r"^bn$", "layer.1"),
    (r"^shortcut$", "shortcut_conv"),
  )
)
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var",
               "cls_token": "cls_token", "pos_embed": "pos_embed"}
_CLS_LAYER = re.compile(r"^cls_token_layers_(\d+)_mlp$")


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
  """Official key of our variable `collection/path` (raises ConversionError if a segment has no rule)."""
  parts = list(path)
  leaf = parts.pop()
  if leaf not in _LEAF_NAMES or (collection == "batch_stats") != (leaf in ("mean", "var")):
    raise ConversionError(f"no official name for our variable {collection}/{'/'.join(path)}")
  out: list[str] = []
  for i, seg in enumerate(parts):
    if i == 0 and seg == "encoder":
      out.append("encoder.encoder")
      continue
    m = _CLS_LAYER.match(seg)
    if m and i == 1 and parts[0] == "encoder":
      out[-1] = "encoder"
      out.append(f"cls_token_layers.{m.group(1)}.mlp")
      continue
    for pattern, repl in _SEGMENT_RULES:
      if pattern.match(seg):
        seg = pattern.sub(repl, seg)
        break
    out.append(seg)
  out.append(_LEAF_NAMES[leaf])
  return ".".join(out)


# The order PyTorch registers modules in (official definitions); used to sort the table like `state_dict()`.
_ORDER = (
  "encoder", "cls_token_layers", "decoder", "cls_token", "pos_embed", "patch_embed", "blocks", "norm1", "attn", "qkv",
  "proj", "norm2", "mlp", "fc1", "fc2", "norm", "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample", "layer1",
  "layer2", "layer3", "layer4", "dim_map_layers", "decoder3", "decoder2", "decoder1", "hyper_feats", "conv_list",
  "first_block", "last_block", "shortcut_conv", "layer", "weight", "bias", "running_mean", "running_var",
  "num_batches_tracked",
)
_RANK = {name: i for i, name in enumerate(_ORDER)}


def _order_key(key: str) -> tuple[tuple[int, int], ...]:
  return tuple((0, int(p)) if p.isdigit() else (1, _RANK.get(p, len(_RANK))) for p in key.split("."))


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (str(k),)))
    else:
      out[prefix + (str(k),)] = v
  return out


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if kind == "conv":
    kh, kw, cin, cout = shape
    return (cout, cin, kh, kw)
  if kind == "dense":
    return (shape[1], shape[0])
  return tuple(shape)


def _table_from_abstract(abstract: Mapping[str, Any]) -> list[TableEntry]:
  entries = []
  bn_keys = []
  for collection in ("params", "batch_stats"):
    for path, leaf in _flatten(abstract.get(collection, {})).items():
      shape = tuple(int(s) for s in leaf.shape)
      kind = "plain"
      if path[-1] == "kernel":
        kind = "conv" if len(shape) == 4 else "dense"
      key = _torch_name(collection, path)
      entries.append(TableEntry(key, _torch_shape(kind, shape), "float32", collection, path, kind))
      if collection == "batch_stats" and path[-1] == "mean":
        bn_keys.append(key[: -len("running_mean")] + "num_batches_tracked")
  entries += [TableEntry(k, (), "int64", "", (), "count") for k in bn_keys]
  keys = [e.key for e in entries]
  if len(set(keys)) != len(keys):
    dup = sorted(k for k, n in collections.Counter(keys).items() if n > 1)
    raise ConversionError(f"name map is not one-to-one; duplicated official keys: {dup[:10]}")
  return sorted(entries, key=lambda e: _order_key(e.key))


def _abstract_variables(model_cfg: ml_collections.ConfigDict) -> Variables:
  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

  return backbone_io.abstract_variables(model_cfg)


@functools.lru_cache(maxsize=16)
def _cached_table(config_json: str) -> tuple[TableEntry, ...]:
  model_cfg = ml_collections.ConfigDict(json.loads(config_json))
  return tuple(_table_from_abstract(_abstract_variables(model_cfg)))


def conversion_table(model_cfg: ml_collections.ConfigDict) -> list[TableEntry]:
  """Every official tensor of `model_cfg`'s architecture with its place in our variables, in `state_dict()` order."""
  cfg = model_cfg.to_dict() if isinstance(model_cfg, ml_collections.ConfigDict) else dict(model_cfg)
  return list(_cached_table(json.dumps(cfg, sort_keys=True, default=list)))


def official_key_table(model_cfg: ml_collections.ConfigDict) -> list[tuple[str, tuple[int, ...], str]]:
  """`(key, shape, dtype)` of every tensor of the official state dict for `model_cfg`, in PyTorch's order.

  Keys have no `module.backbone.` prefix; shapes are PyTorch layouts; the position embedding is sized for
  `model_cfg.img_size`.
  """
  return [(e.key, e.shape, e.dtype) for e in conversion_table(model_cfg)]


# --- checkpoint objects --------------------------------------------------------------------------------------------

def _is_array(x: Any) -> bool:
  return isinstance(x, np.ndarray)


def extract_state_dict(obj: Any, *, key: str | None = None, prefix: str | None = None,
                       source: str = "checkpoint") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Finds the backbone state dict inside a loaded checkpoint.

  Args:
    obj: what `torch_format.load` returned: an official checkpoint (`{'teacher': {'module.backbone.<key>': ...}, ...}`,
      the DINO save format) or a plain state dict.
    key: the entry holding the state dict (default: 'teacher', else 'state_dict', else 'model', else `obj` itself).
    prefix: key prefix of the backbone tensors (default: 'module.backbone.' if present, else 'backbone.', else
      'module.', else none). Tensors without the prefix (e.g. the DINO heads `module.head.*`) are left out and counted.
    source: name used in error messages.

  Returns:
    `(state_dict, info)`: keys without the prefix mapped to numpy arrays; `info` has `key`, `prefix` and
    `skipped` (the number of tensors outside the prefix).
  """
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{source}: expected a dict (a state dict or {{'teacher': state_dict}}), "
                          f"got {type(obj).__name__}")
  if key is None:
    for k in ("teacher", "state_dict", "model"):
      if isinstance(obj.get(k), Mapping):
        key = k
        break
  if key is not None:
    if not isinstance(obj.get(key), Mapping):
      raise ConversionError(f"{source}: no dict entry {key!r}; top-level keys: {sorted(map(str, obj))[:20]}")
    sd = obj[key]
  else:
    sd = obj
  tensors = {str(k): v for k, v in sd.items() if _is_array(v)}
  if not tensors:
    raise ConversionError(f"{source}: no tensors found in {('entry ' + repr(key)) if key else 'the checkpoint'}")
  if prefix is None:
    prefix = next((p for p in (CHECKPOINT_PREFIX, "backbone.", "module.") if any(k.startswith(p) for k in tensors)),
                  "")
  out = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  if not out:
    raise ConversionError(f"{source}: no tensor key starts with {prefix!r}")
  return out, {"key": key, "prefix": prefix, "skipped": len(tensors) - len(out)}


def infer_variant(state_dict: StateDict) -> str:
  """Names the model variant of an official state dict ('vit_s16', 'vit_b16', 'r50', 'tiny' or 'tiny_r50')."""
  from configs import models as model_configs  # pylint: disable=import-outside-toplevel

  if POS_EMBED_KEY in state_dict:
    dim = int(state_dict[POS_EMBED_KEY].shape[-1])
    depth = len({k.split(".")[3] for k in state_dict if k.startswith("encoder.encoder.blocks.")})
    for name in ("vit_s16", "vit_b16", "tiny"):
      cfg = model_configs.get_config(name)
      if cfg.embed_dim == dim and cfg.depth == depth:
        return name
    raise ConversionError(f"state dict holds a ViT with embed dim {dim} and depth {depth}; known variants: "
                          "vit_s16 (384, 12), vit_b16 (768, 12), tiny (64, 4)")
  stem = state_dict.get("encoder.encoder.conv1.weight")
  if stem is not None:
    for name in ("r50", "tiny_r50"):
      if model_configs.get_config(name).stem_width == stem.shape[0]:
        return name
    raise ConversionError(f"state dict holds a ResNet with stem width {stem.shape[0]}; known: r50 (64), tiny_r50 (8)")
  raise ConversionError("cannot tell the architecture: neither 'encoder.encoder.pos_embed' (ViT) nor "
                        "'encoder.encoder.conv1.weight' (ResNet) is in the state dict")


# --- conversion ----------------------------------------------------------------------------------------------------

def resize_pos_embed_official(pos: np.ndarray, grid: int, *, force: bool = True) -> np.ndarray:
  """Resizes `[1, 1 + n*n, D]` to `[1, 1 + grid*grid, D]` with the official bicubic arithmetic (numpy, float32).

  `scale_factor = (grid + 0.1) / n`, PyTorch bicubic (a = -0.75, align_corners=False); the CLS entry is kept. With
  `force=False` a same-size input is returned unchanged (run-time DINO behaviour); with `force=True` it is
  interpolated anyway (the official evaluation loader's behaviour).
  """
  from muse_jax import ops  # pylint: disable=import-outside-toplevel

  pos = np.asarray(pos, np.float32)
  n = math.isqrt(pos.shape[1] - 1)
  if pos.ndim != 3 or pos.shape[0] != 1 or n * n != pos.shape[1] - 1:
    raise ConversionError(f"position embedding must be [1, 1 + n*n, D]; got {list(pos.shape)}")
  if n == grid and not force:
    return pos
  scale = (grid + 0.1) / n
  if math.floor(n * scale) != grid:
    raise ConversionError(f"position embedding: scale {scale} maps {n} to {math.floor(n * scale)}, not {grid}")
  m = ops._bicubic_matrix(n, grid, scale)  # pylint: disable=protected-access
  patch = pos[0, 1:].reshape(n, n, -1).astype(np.float64)
  out = np.einsum("ih,jw,hwd->ijd", m, m, patch).reshape(1, grid * grid, -1)
  return np.concatenate([pos[:, :1], out.astype(np.float32)], axis=1)


def _fmt(items: Iterable[str], limit: int = 40) -> str:
  items = list(items)
  shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
  return "\n    ".join(shown)


def _mismatch_error(title: str, missing: list[str], unexpected: list[str], wrong: list[str]) -> ConversionError:
  lines = [title]
  for name, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
    if items:
      lines.append(f"  {name} ({len(items)}):\n    {_fmt(items)}")
  return ConversionError("\n".join(lines))


def _to_ours(kind: str, array: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(array, (2, 3, 1, 0))
  if kind == "dense":
    return np.transpose(array)
  return array


def _to_torch(kind: str, array: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(array, (3, 2, 0, 1))
  if kind == "dense":
    return np.transpose(array)
  return array


def torch_to_variables(
  state_dict: StateDict,
  model_cfg: ml_collections.ConfigDict,
  *,
  pos_embed_resize: str = "official",
  source: str = "state dict",
) -> tuple[Variables, dict[str, Any]]:
  """Converts an official backbone state dict (keys without `module.backbone.`) to our variables.

  Args:
    state_dict: official key -> numpy array (PyTorch layouts).
    model_cfg: target config (`configs/models.py`); `img_size` sets the position-embedding grid.
    pos_embed_resize: 'official' (always interpolate, as the official evaluation loader) or 'exact' (interpolate only
      when the grid changes).
    source: name used in error messages.

  Returns:
    `(variables, info)`: `{'params', 'batch_stats'}` of float32 numpy arrays, and `info` with
    `num_batches_tracked` (the largest value found, an int) and `pos_embed` (`'<n>x<n> -> <g>x<g>'` or None).

  Raises:
    ConversionError: listing missing, unexpected and mis-shaped keys with shapes.
  """
  if pos_embed_resize not in POS_EMBED_MODES:
    raise ValueError(f"pos_embed_resize must be one of {POS_EMBED_MODES}; got {pos_embed_resize!r}")
  table = conversion_table(model_cfg)
  want = {e.key: e for e in table}
  missing = [f"{e.key} {list(e.shape)}" for e in table if e.key not in state_dict]
  unexpected = [f"{k} {list(np.shape(v))}" for k, v in state_dict.items() if k not in want]
  wrong = []
  for k, e in want.items():
    if k not in state_dict:
      continue
    shape = tuple(np.shape(state_dict[k]))
    if k == POS_EMBED_KEY:
      ok = (len(shape) == 3 and shape[0] == 1 and shape[2] == e.shape[2]
            and math.isqrt(shape[1] - 1) ** 2 == shape[1] - 1)
    else:
      ok = shape == e.shape
    if not ok:
      wrong.append(f"{k}: got {list(shape)}, expected {list(e.shape)}")
  if missing or unexpected or wrong:
    raise _mismatch_error(
      f"{source} does not match architecture {model_cfg.name!r} (img_size {model_cfg.get('img_size')}):",
      missing, unexpected, wrong)
  flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
  counts = [0]
  pos_info = None
  for e in table:
    value = np.asarray(state_dict[e.key])
    if e.kind == "count":
      counts.append(int(value))
      continue
    if e.key == POS_EMBED_KEY:
      n = math.isqrt(value.shape[1] - 1)
      g = math.isqrt(e.shape[1] - 1)
      value = resize_pos_embed_official(value, g, force=pos_embed_resize == "official")
      pos_info = f"{n}x{n} -> {g}x{g} ({pos_embed_resize})"
    flat[e.collection][e.path] = _to_ours(e.kind, value.astype(np.float32, copy=False))
  variables = {c: _unflatten(f) for c, f in flat.items()}
  return variables, {"num_batches_tracked": max(counts), "pos_embed": pos_info}


def variables_to_torch(
  variables: Variables,
  model_cfg: ml_collections.ConfigDict,
  *,
  num_batches_tracked: int = 0,
  source: str = "variables",
) -> collections.OrderedDict[str, np.ndarray]:
  """Converts our backbone variables to an official state dict (keys without `module.backbone.`, PyTorch order).

  Args:
    variables: `{'params', 'batch_stats'}` for `model_cfg` (any array type; copied to numpy float32).
    model_cfg: their config.
    num_batches_tracked: the value written to every BatchNorm's `num_batches_tracked` (we do not track it).
    source: name used in error messages.

  Raises:
    ConversionError: listing missing, unexpected and mis-shaped variables.
  """
  table = conversion_table(model_cfg)
  have = {c: _flatten(dict(variables.get(c, {}))) for c in ("params", "batch_stats")}
  want = {(e.collection, e.path): e for e in table if e.kind != "count"}
  missing = [f"{c}/{'/'.join(p)} (official {e.key} {list(e.shape)})" for (c, p), e in want.items() if p not in have[c]]
  unexpected = [f"{c}/{'/'.join(p)} {list(np.shape(v))}" for c in have for p, v in have[c].items()
                if (c, p) not in want]
  unexpected += [f"{c}/..." for c in variables if c not in ("params", "batch_stats")]
  wrong = []
  for (c, p), e in want.items():
    if p in have[c] and _torch_shape(e.kind, tuple(np.shape(have[c][p]))) != e.shape:
      wrong.append(f"{c}/{'/'.join(p)}: got {list(np.shape(have[c][p]))} (official {e.key} {list(e.shape)})")
  if missing or unexpected or wrong:
    raise _mismatch_error(f"{source} do not match architecture {model_cfg.name!r}:", missing, unexpected, wrong)
  out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
  for e in table:
    if e.kind == "count":
      out[e.key] = np.array(num_batches_tracked, np.int64)
    else:
      value = np.asarray(have[e.collection][e.path]).astype(np.float32, copy=False)
      out[e.key] = _to_torch(e.kind, value)
  return out
