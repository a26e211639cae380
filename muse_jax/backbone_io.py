"""Backbone directories: the hand-off format between pretraining, weight import, evaluation and fine-tuning.

A *backbone directory* holds

  model_config.json   the model ConfigDict (`configs/models.py`) as JSON
  variables/          an Orbax checkpoint of `{'params': ..., 'batch_stats': ...}`
  info.json           optional provenance (what wrote it, from which run or file, at which step)

`save_backbone` writes one atomically (into a temporary sibling, then a rename), `load_backbone` reads one back and
checks every array against the architecture its config names, so a checkpoint of another architecture fails with
a list of the mismatching variables instead of a shape error deep inside `apply`.

`load_backbone("random:<variant>")` gives a random initialisation of a named variant (the evaluation baseline).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

Variables = dict[str, Any]

MODEL_CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"
INFO_FILE = "info.json"
RANDOM_PREFIX = "random:"


def _to_jsonable(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_jsonable(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def config_from_json(d: dict[str, Any]) -> ml_collections.ConfigDict:
  """Rebuilds a ConfigDict written as JSON; JSON lists become tuples again (configs use tuples)."""

  def fix(v):
    if isinstance(v, dict):
      return {k: fix(x) for k, x in v.items()}
    if isinstance(v, list):
      return tuple(fix(x) for x in v)
    return v

  return ml_collections.ConfigDict(fix(d))


def init_size(model_cfg: ml_collections.ConfigDict) -> int:
  """A small valid input side for `init` (parameter shapes do not depend on it)."""
  stride = 32 if model_cfg.arch == "resnet50" else int(model_cfg.patch_size)
  return max(64, 2 * stride)


def abstract_variables(model_cfg: ml_collections.ConfigDict) -> Variables:
  """Shapes and dtypes of the variables of `model_cfg`, without allocating them."""
  from muse_jax.models import build_backbone  # pylint: disable=import-outside-toplevel

  module = build_backbone(model_cfg)
  s = init_size(model_cfg)
  dummy = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), dummy)


def random_backbone(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> Variables:
  """A random initialisation of `model_cfg` (jit-compiled init; plain dict of arrays)."""
  from muse_jax.models import build_backbone  # pylint: disable=import-outside-toplevel

  module = build_backbone(model_cfg)
  s = init_size(model_cfg)
  init = jax.jit(lambda key: module.init(key, jnp.zeros((1, s, s, 3), jnp.float32), train=False))
  return jax.tree.map(np.asarray, dict(init(jax.random.key(seed))))


def _abs(p: epath.Path) -> epath.Path:
  """Orbax wants absolute paths; remote paths (gs://...) already are."""
  return p if "://" in str(p) else p.resolve()


def _flat(tree: Any) -> dict[str, Any]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(str(getattr(p, "key", p)) for p in path)] = leaf
  return out


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", np.shape(x)))


def check_variables(model_cfg: ml_collections.ConfigDict, variables: Variables, *, source: str = "variables") -> None:
  """Raises ValueError listing every missing, unexpected or mis-shaped variable for `model_cfg`."""
  want = _flat(abstract_variables(model_cfg))
  got = _flat(variables)
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  shapes = sorted(
    f"{k}: got {_shape(got[k])}, expected {tuple(want[k].shape)}"
    for k in set(want) & set(got)
    if _shape(got[k]) != tuple(want[k].shape)
  )
  if missing or unexpected or shapes:
    lines = [f"{source} do not fit architecture {model_cfg.get('name', model_cfg.arch)!r}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
      if items:
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
    raise ValueError("\n".join(lines))


def save_backbone(
  path: str | os.PathLike,
  model_cfg: ml_collections.ConfigDict,
  variables: Variables,
  extra: dict[str, Any] | None = None,
) -> epath.Path:
  """Writes a backbone directory at `path` (replacing an existing one) and returns its path.

  Args:
    path: target directory (local or any etils path such as `gs://...`).
    model_cfg: the model config (`configs/models.py`).
    variables: `{'params': ..., 'batch_stats': ...}` (any array type; fetched to host).
    extra: provenance written to `info.json`.
  """
  path = epath.Path(path)
  variables = {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats")}
  check_variables(model_cfg, variables, source=f"variables for {path}")
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), variables)
  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True, exist_ok=False)
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  ckptr = ocp.StandardCheckpointer()
  ckptr.save(_abs(tmp / VARIABLES_DIR), host)
  ckptr.wait_until_finished()
  (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(_to_jsonable(model_cfg), indent=2, sort_keys=True))
  if extra:
    (tmp / INFO_FILE).write_text(json.dumps(_to_jsonable(extra), indent=2, sort_keys=True))
  if path.exists():
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    path.rename(old)
    tmp.rename(path)
    old.rmtree()
  else:
    tmp.rename(path)
  return path


def is_backbone_dir(path: str | os.PathLike) -> bool:
  p = epath.Path(path)
  return (p / MODEL_CONFIG_FILE).exists() and (p / VARIABLES_DIR).exists()


def load_model_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """Reads `model_config.json` of a backbone directory."""
  p = epath.Path(path) / MODEL_CONFIG_FILE
  if not p.exists():
    raise FileNotFoundError(f"{p}: not a backbone directory (no {MODEL_CONFIG_FILE}); expected the output of "
                            "`python -m muse_jax.export` or `python -m muse_jax.tools.import_torch`")
  try:
    return config_from_json(json.loads(p.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{p}: corrupt model config ({e})") from e


def load_backbone(source: str | os.PathLike, *, seed: int = 0) -> tuple[ml_collections.ConfigDict, Variables]:
  """Loads a backbone: `random:<variant>` (random init) or a backbone directory.

  Returns:
    `(model_cfg, variables)` with `variables = {'params': ..., 'batch_stats': ...}` as host numpy arrays.
  """
  source_str = os.fspath(source)
  if source_str.startswith(RANDOM_PREFIX):
    from configs import models as model_configs  # pylint: disable=import-outside-toplevel

    variant = source_str[len(RANDOM_PREFIX):]
    model_cfg = model_configs.get_config(variant)
    return model_cfg, random_backbone(model_cfg, seed)
  path = epath.Path(source_str)
  if not path.exists():
    raise FileNotFoundError(f"backbone source {source_str!r}: no such directory (expected a backbone directory "
                            f"or '{RANDOM_PREFIX}<variant>')")
  model_cfg = load_model_config(path)
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  var_path = path / VARIABLES_DIR
  if not var_path.exists():
    raise FileNotFoundError(f"{path}: not a backbone directory (no {VARIABLES_DIR}/)")
  try:
    variables = ocp.StandardCheckpointer().restore(_abs(var_path))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{var_path}: unreadable variables checkpoint ({type(e).__name__}: {e})") from e
  variables = jax.tree.map(np.asarray, dict(variables))
  check_variables(model_cfg, variables, source=f"checkpoint {var_path}")
  return model_cfg, variables
