"""Config checks shared by the training drivers (issue #19): every field's type and value before any work, and
whether a workdir may be resumed with a config.

* `check(config, RULES)`: each rule names a field (`"data.mpp_range"`) and what it must be (`integer(lo=1)`,
  `number(lo=0, lo_open=True)`, `pair()`, `choice(...)`, ...); the first bad field raises `cli.UserError` naming
  `config.<field>`. `uncovered(config, RULES)` lists the fields no rule checks (tests keep it empty).
* `check_workdir(workdir, kind, config, resumable)`: refuses a workdir written by another command (a fine-tuning
  workdir given to pretraining, an export folder, ...) and a resume whose config differs from the stored
  `config.json` in any field outside `resumable` (each changed field is named).
* `write_json_atomic(path, text)`: `config.json` is written whole or not at all.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from muse_jax import cli

MISSING = object()
Rule = Callable[[Any, str], None]
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def lookup(config: Any, name: str) -> Any:
  """`config.a.b` for `name='a.b'`, or `MISSING`."""
  node = config
  for part in name.split("."):
    try:
      if part not in node:
        return MISSING
    except TypeError:
      return MISSING
    node = node[part]
  return node


def _type_error(value: Any, where: str, want: str) -> cli.UserError:
  return cli.UserError(f"has type {type(value).__name__} ({value!r}); expected {want}", where)


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None, also: Sequence[int] = ()) -> Rule:
  """An int in [lo, hi]; the values in `also` (e.g. -1 = automatic) are accepted too."""
  def rule(v, where):
    if not _is_int(v):
      raise _type_error(v, where, "int")
    if v in also:
      return
    if (lo is not None and v < lo) or (hi is not None and v > hi):
      rng = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
      extra = "".join(f" or {a}" for a in also)
      raise cli.UserError(f"must be {rng}{extra}", where, f"got {v}")
  return rule


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
           also: Sequence[float] = (), unit: str = "") -> Rule:
  """A finite int or float in the interval (ends open as flagged); `also` values are accepted too."""
  def rule(v, where):
    if not _is_num(v):
      raise _type_error(v, where, "a number")
    if v in also:
      return
    ok = math.isfinite(v)
    ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok and math.isfinite(v) and hi is None and lo is not None and not also:
      raise cli.UserError(f"must be {'>' if lo_open else '>='} {lo:g}", where,
                          f"got {v!r}{' ' + unit if unit else ''}")
    if not ok:
      a = "-inf" if lo is None else f"{lo:g}"
      b = "inf" if hi is None else f"{hi:g}"
      rng = f"{'(' if lo_open or lo is None else '['}{a}, {b}{')' if hi_open or hi is None else ']'}"
      extra = "".join(f" or {x:g}" for x in also)
      raise cli.UserError(f"must be a finite number in {rng}{extra}", where, f"got {v!r}{' ' + unit if unit else ''}")
  return rule


def positive(unit: str = "") -> Rule:
  return number(0, lo_open=True, unit=unit)


def nonneg(unit: str = "") -> Rule:
  return number(0, unit=unit)


def prob() -> Rule:
  return number(0, 1)


def boolean() -> Rule:
  def rule(v, where):
    if not isinstance(v, bool):
      raise _type_error(v, where, "True or False")
  return rule


def string(nonempty: bool = False, empty_hint: str | None = None) -> Rule:
  """A string; with `nonempty`, not blank (`empty_hint` says what to set instead)."""
  def rule(v, where):
    if not isinstance(v, str):
      raise _type_error(v, where, "a string")
    if nonempty and not v.strip():
      raise cli.UserError("not set" if empty_hint else "is empty", where, empty_hint)
  return rule


def choice(*values: Any) -> Rule:
  def rule(v, where):
    if isinstance(v, bool) or v not in values:
      raise cli.UserError(f"must be one of {', '.join(repr(x) for x in values)}", where, f"got {v!r}")
  return rule


def optional(inner: Rule) -> Rule:
  """None, or what `inner` accepts."""
  def rule(v, where):
    if v is not None:
      inner(v, where)
  return rule


def sequence(inner: Rule, n: int | None = None, min_len: int = 1) -> Rule:
  """A tuple or list of `n` (or at least `min_len`) items, each accepted by `inner`."""
  def rule(v, where):
    if isinstance(v, (str, bytes)) or not isinstance(v, (tuple, list)):
      raise _type_error(v, where, f"a tuple of {n if n is not None else 'some'} values")
    if (n is not None and len(v) != n) or len(v) < min_len:
      raise cli.UserError(f"must have {n if n is not None else f'at least {min_len}'} values", where,
                          f"got {tuple(v)!r}")
    for i, x in enumerate(v):
      inner(x, f"{where}[{i}]")
  return rule


def pair(lo: float = 0.0, *, lo_open: bool = True, unit: str = "") -> Rule:
  """A (lo, hi) range of finite numbers with `lo_bound < lo <= hi`."""
  item = number(lo, lo_open=lo_open, unit=unit)

  def rule(v, where):
    sequence(item, n=2)(v, where)
    if v[0] > v[1]:
      raise cli.UserError("must be (lo, hi) with lo <= hi", where, f"got {tuple(v)!r}")
  return rule


def check(config: Any, rules: Mapping[str, Rule], *, optional_fields: Iterable[str] = (),
          prefix: str = "config") -> None:
  """Applies every rule; raises `cli.UserError` naming the first bad or missing field (`config.<field>`).

  Fields in `optional_fields` may be absent (configs written before they existed, e.g. a resumed run's
  `config.json`).
  """
  opt = set(optional_fields)
  for name, rule in rules.items():
    v = lookup(config, name)
    if v is MISSING:
      if name in opt:
        continue
      raise cli.UserError("is missing", f"{prefix}.{name}")
    rule(v, f"{prefix}.{name}")


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """`{'a': {'b': 1}}` -> `{'a.b': 1}`; sequences become lists (JSON's view)."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, name + "."))
    else:
      out[name] = json.loads(json.dumps(v, default=str))
  return out


def uncovered(config: Any, rules: Mapping[str, Rule], skip_prefixes: Sequence[str] = ()) -> list[str]:
  """Leaf fields of `config` that no rule checks (a rule on a node covers its subtree)."""
  leaves = flatten(config.to_dict() if hasattr(config, "to_dict") else config)
  return [f for f in leaves if not any(f == r or f.startswith(r + ".") for r in rules)
          and not any(f.startswith(p) for p in skip_prefixes)]


# ---------------------------------------------------------------------------------------------------------------
# Workdirs.

KINDS = {"pretrain": "a pretraining workdir", "finetune": "an NDC fine-tuning workdir"}
WRITERS = {"pretrain": "python -m muse_jax.main", "finetune": "python -m muse_jax.finetune"}


def config_kind(d: Mapping[str, Any]) -> str | None:
  """Which driver wrote a stored config: 'pretrain', 'finetune' or None."""
  if "data_source" in d and "heads" in d:
    return "pretrain"
  if "lfov" in d and "semi" in d and "init" in d:
    return "finetune"
  return None


def describe(kind: str | None) -> str:
  """'an NDC fine-tuning workdir (written by python -m muse_jax.finetune)' for a `config_kind`."""
  if kind is None:
    return f"a folder with an unrecognised {CONFIG_FILE}"
  return f"{KINDS[kind]} (written by {WRITERS[kind]})"


def _has_checkpoints(workdir) -> bool:
  d = workdir / CHECKPOINT_DIR
  return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def read_config(workdir) -> dict[str, Any] | None:
  """The stored `config.json` of `workdir` as a dict (None if absent); unreadable JSON is a user error."""
  path = workdir / CONFIG_FILE
  if not path.exists():
    return None
  try:
    d = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise cli.UserError("is not a readable config (broken JSON)", str(path), str(e)) from None
  if not isinstance(d, dict):
    raise cli.UserError("is not a config (not a JSON object)", str(path))
  return d


def check_workdir(workdir, kind: str, config: Any, resumable: Sequence[str], *,
                  foreign_files: Mapping[str, str] = (), legacy: Mapping[str, Any] = ()) -> dict[str, Any] | None:
  """Refuses a `workdir` this command must not write into or resume; returns the stored config (or None).

  Args:
    workdir: an `epath.Path` (local or gs://).
    kind: 'pretrain' or 'finetune' (the calling driver).
    config: the requested config (a ConfigDict).
    resumable: fields (or prefixes ending in '.') that may differ from the stored config on a resume.
    foreign_files: `{file name: what it marks}`: a workdir holding one of them belongs to something else.
    legacy: `{field: value}`: a field absent from the stored config (written before the field existed) matches
      the requested config when the requested value is this one (the behaviour of the older code).

  Raises:
    cli.UserError: another command's workdir, an export folder, checkpoints without `config.json`, or a resume
      that changes a field outside `resumable` (all changed fields are named, old -> new).
  """
  if not workdir.exists():
    return None
  if not workdir.is_dir():
    raise cli.UserError("is not a directory", f"--workdir {workdir}")
  for name, what in dict(foreign_files).items():
    if (workdir / name).exists():
      raise cli.UserError(f"not {KINDS[kind]}", f"--workdir {workdir}",
                          f"it is {what} (holds {name}); choose a new --workdir")
  stored = read_config(workdir)
  has_ckpt = _has_checkpoints(workdir)
  if stored is None:
    if has_ckpt:
      raise cli.UserError(f"{CHECKPOINT_DIR}/ without {CONFIG_FILE}", f"--workdir {workdir}",
                          "cannot check that resuming it with this config is valid; restore its config.json or "
                          "choose a new --workdir")
    return None
  other = config_kind(stored)
  if other != kind:
    raise cli.UserError(f"not {KINDS[kind]}", f"--workdir {workdir}",
                        f"it is {describe(other)}; choose a new --workdir")
  if not has_ckpt:
    return stored  # nothing to resume: the new config replaces the old one
  changes = diff(stored, config.to_dict() if hasattr(config, "to_dict") else dict(config), resumable, legacy)
  if changes:
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    allowed = ", ".join(r.rstrip(".") + ("*" if r.endswith(".") else "") for r in resumable)
    raise cli.UserError(f"resuming would change {len(changes)} config field(s) the checkpoints were made with",
                        str(workdir / CONFIG_FILE),
                        f"{shown}. A resume may change only: {allowed}. Rerun with the stored values or choose a "
                        "new --workdir")
  return stored


def diff(stored: Mapping[str, Any], requested: Mapping[str, Any], resumable: Sequence[str],
         legacy: Mapping[str, Any] = ()) -> list[str]:
  """`'field old -> new'` for every field that differs and is not resumable (sorted); see `check_workdir`."""
  a, b = flatten(stored), flatten(requested)
  for f, v in dict(legacy).items():
    if f not in a and f in b:
      a[f] = json.loads(json.dumps(v))
  out = []
  for f in sorted(set(a) | set(b)):
    if any(f == r or (r.endswith(".") and f.startswith(r)) for r in resumable):
      continue
    va, vb = a.get(f, MISSING), b.get(f, MISSING)
    if va == vb:
      continue
    show = lambda v: "(absent)" if v is MISSING else json.dumps(v)  # noqa: E731
    out.append(f"{f} {show(va)} -> {show(vb)}")
  return out


def write_json_atomic(path, text: str) -> None:
  """Writes `text` to `path` (an `epath.Path`) through a temporary file and a rename (whole or not at all)."""
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  tmp.write_text(text)
  tmp.replace(path)
