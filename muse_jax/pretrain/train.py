"""MUSE pretraining driver: `run(config, workdir)`.

Sets up the mesh, data, networks, optimizer (the EMA teacher inside) and the sharded state; restores the latest
checkpoint of `workdir` if there is one (automatic resume); runs the jitted step with a progress bar; writes metrics
as JSON lines to `workdir/metrics.jsonl`; saves state + data-iterator state every `checkpoint_every_steps` steps, at
the end and on SIGTERM; stops with the step number on a non-finite loss, keeping the last good checkpoint.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from muse_jax.pretrain import checkpoint as ckpt_lib
from muse_jax.pretrain import health as health_lib
from muse_jax.pretrain import mesh as mesh_lib
from muse_jax.pretrain import optim as optim_lib
from muse_jax.pretrain import state as state_lib
from muse_jax.pretrain import step as step_lib
from muse_jax.pretrain import synthetic

METRICS_FILE = "metrics.jsonl"
HEALTH_FILE = "health.json"
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(FloatingPointError):
  """Raised when a step produced a NaN/inf loss; carries the step and the last good checkpoint step."""

  def __init__(self, step: int, value: float, last_good: int | None):
    self.step, self.value, self.last_good = step, value, last_good
    super().__init__(f"non-finite loss ({value}) at step {step}; training stopped. Last good checkpoint: "
                     f"{'none' if last_good is None else f'step {last_good}'} (the bad state was not saved).")


# Expected types of the fields that drive the run (checked at start; ConfigDict already rejects most mistakes on
# assignment, this catches configs built by hand or loaded from JSON).
_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "seed": int, "batch_size": int, "num_epochs": int, "steps_per_epoch": int, "total_steps": int,
    "drop_path_rate": (int, float), "data_source": str, "checkpoint_every_steps": int, "keep_checkpoints": int,
    "log_every_steps": int, "loss.w_image": (int, float), "loss.w_nu": (int, float),
    "heads.cls_out_dim": int, "heads.nu_out_dim": int, "heads.hidden_dim": int, "heads.bottleneck_dim": int,
    "heads.num_layers": int, "mesh.data": int, "mesh.fsdp": int, "mesh.fsdp_min_size": int,
    "data.n_global": int, "data.global_size": int, "data.n_local": int, "data.local_size": int,
    "data.max_nuclei_global": int, "data.max_nuclei_local": int,
    **{f"optim.{k}": (int, float) for k in (
        "base_lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "b1", "b2", "eps", "clip_grad",
        "freeze_last_layer_epochs", "momentum_teacher", "momentum_teacher_end", "warmup_teacher_temp",
        "teacher_temp", "warmup_teacher_temp_epochs", "student_temp", "center_momentum")},
}
# Fields added by issue #21; configs written before it (e.g. a resumed run's config.json) may lack them.
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    **{f"optim.{k}": (int, float) for k in ("warmup_frac", "warmup_teacher_temp_frac", "freeze_last_layer_frac",
                                            "teacher_half_life_frac")},
    **{f"health.{k}": (int, float) for k in ("uniform_entropy_ratio", "min_prototypes", "grace_frac")},
    "health.grace_steps": int, "health.patience": int, "data.color_aug": str,
}


def _lookup(config, name: str):
  node = config
  for part in name.split("."):
    if part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field when a field is missing, has the wrong type or an impossible value."""
  for name, typ in _SCHEMA.items():
    node = config
    for part in name.split("."):
      if part not in node:
        raise ValueError(f"config.{name} is missing (expected {typ})")
      node = node[part]
    if isinstance(node, bool) or not isinstance(node, typ):
      want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
      raise ValueError(f"config.{name} has type {type(node).__name__} ({node!r}); expected {want}")
  for name, typ in _OPTIONAL.items():
    node = _lookup(config, name)
    if node is _MISSING:
      continue
    if isinstance(node, bool) or not isinstance(node, typ):
      want = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
      raise ValueError(f"config.{name} has type {type(node).__name__} ({node!r}); expected {want}")
  for name in ("optim.warmup_frac", "optim.warmup_teacher_temp_frac", "optim.freeze_last_layer_frac"):
    v = _lookup(config, name)
    if v is not _MISSING and v > 1:
      raise ValueError(f"config.{name}={v}: a fraction of the run must be <= 1 (-1 = use the *_epochs field)")
  hl = _lookup(config, "optim.teacher_half_life_frac")
  if hl is not _MISSING and not 0 <= hl <= 1:
    raise ValueError(f"config.optim.teacher_half_life_frac={hl}: expected 0 (use momentum_teacher) or a fraction "
                     "in (0, 1]")
  from muse_jax.data import views  # pylint: disable=import-outside-toplevel
  aug = _lookup(config, "data.color_aug")
  if aug is not _MISSING and aug not in views.COLOR_AUGS:
    raise ValueError(f"config.data.color_aug={aug!r}: expected one of {views.COLOR_AUGS}")
  if aug == "hed" and not config.data.stain_jitter > 0:
    raise ValueError("config.data.color_aug='hed' needs config.data.stain_jitter > 0 (e.g. 0.1)")
  um = _lookup(config, "data.blur_sigma_um")
  if um not in (_MISSING, None) and (len(um) != 2 or not 0 < float(um[0]) <= float(um[1])):
    raise ValueError(f"config.data.blur_sigma_um={um}: expected (lo, hi) µm with 0 < lo <= hi")
  if config.loss.w_image < 0 or config.loss.w_nu < 0 or (config.loss.w_image == 0 and config.loss.w_nu == 0):
    raise ValueError(f"config.loss: weights must be >= 0 and not both 0 (got w_image={config.loss.w_image}, "
                     f"w_nu={config.loss.w_nu})")
  if config.data_source not in ("pipeline", "synthetic"):
    raise ValueError(f"config.data_source={config.data_source!r}; expected 'pipeline' or 'synthetic'")
  if config.data.n_global < 1:
    raise ValueError(f"config.data.n_global={config.data.n_global}; the teacher needs at least one global view")
  mult = config.model.patch_size
  for f in ("global_size", "local_size"):
    if (f == "global_size" or config.data.n_local > 0) and config.data[f] % mult:
      raise ValueError(f"config.data.{f}={config.data[f]} must be a multiple of {mult} for model "
                       f"{config.model.name!r}")


def make_data_iterator(config: ml_collections.ConfigDict) -> tuple[Iterator, int | None]:
  """Host-local batch iterator (checkpointable) and the dataset length in regions (None if unknown)."""
  pi, pc = jax.process_index(), jax.process_count()
  if config.data_source == "synthetic":
    d = config.data
    it = synthetic.SyntheticIterator(batch_size=config.batch_size, n_global=d.n_global, n_local=d.n_local,
                                     global_size=d.global_size, local_size=d.local_size,
                                     max_nuclei_global=d.max_nuclei_global, max_nuclei_local=d.max_nuclei_local,
                                     n_region=config.synthetic_region_nuclei, seed=config.seed, process_index=pi,
                                     process_count=pc)
    return it, None
  from muse_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  source = pipeline.open_pretrain_source(config.data)
  ds = pipeline.make_pretrain_dataset(source, config.data, seed=config.seed, batch_size=config.batch_size // pc,
                                      process_index=pi, process_count=pc)
  try:
    n = len(source)
  except TypeError:
    n = None
  return iter(ds), n


def _global_batch(local: dict, sharding) -> dict:
  """Host-local numpy batch -> global jax.Arrays sharded over the batch axis."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def _to_float(tree: dict) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(tree).items()}


class _MetricsWriter:
  """Appends JSON lines to `workdir/metrics.jsonl` (process 0 only).

  Object stores (gs://) cannot append: there the file is rewritten whole (previous lines kept) at each write.
  """

  def __init__(self, workdir: epath.Path, enabled: bool):
    self.path = workdir / METRICS_FILE
    self.enabled = enabled
    self.rewrite = str(workdir).startswith("gs://")
    self.lines: list[str] | None = None

  def restore(self, step: int) -> list[dict[str, Any]]:
    """Drops logged rows after `step` (a resumed run logs them again) and returns the rows kept."""
    if not self.path.exists():
      return []
    rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if int(r.get("step", 0)) <= step]
    if self.enabled and len(kept) != len(rows):
      tmp = self.path.parent / (self.path.name + ".tmp")
      tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
      tmp.replace(self.path)
      self.lines = None
    return kept

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps(record) + "\n"
    if self.rewrite:
      if self.lines is None:
        self.lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
      self.lines.append(line)
      self.path.write_text("".join(self.lines))
    else:
      with self.path.open("a") as f:
        f.write(line)


_SETUP_CACHE: dict[tuple, dict] = {}
_SETUP_CACHE_SIZE = 4


def build_step(config: ml_collections.ConfigDict, mesh, steps_per_epoch: int) -> dict[str, Any]:
  """The train step of `config` on `mesh`, without touching devices or data (shared with `muse_jax.tools.aot`).

  Returns a dict with `mesh`, `nets`, `tx`, `schedules`, `steps_per_epoch`, `total_steps`, `init_rng`, `step_rng`
  (host keys), `abstract_state` (from `jax.eval_shape`), `shardings`, `batch_sharding`, `replicated`, `step_fn` and
  `jit_step` (the jitted, sharded, state-donating step).
  """
  nets = state_lib.build_networks(config)
  total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
  schedules = optim_lib.make_schedules(config.optim, steps_per_epoch, total, config.batch_size)
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  abstract_params = jax.eval_shape(lambda r: state_lib.init_variables(nets, r, config.data.global_size)[0], init_rng)
  tx = optim_lib.build_optimizer(config.optim, abstract_params, schedules, steps_per_epoch,
                                 last_layer_name=config.heads.last_layer_name, total_steps=total)
  abstract_state = jax.eval_shape(lambda r: state_lib.create_state(config, nets, tx, r), init_rng)
  shardings = mesh_lib.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  repl = mesh_lib.replicated(mesh)
  bsh = mesh_lib.batch_sharding(mesh)
  step_fn = step_lib.make_step_fn(config, nets, tx, schedules)
  return dict(mesh=mesh, nets=nets, tx=tx, schedules=schedules, steps_per_epoch=steps_per_epoch,
              total_steps=total, init_rng=init_rng, step_rng=step_rng, abstract_state=abstract_state,
              shardings=shardings, batch_sharding=bsh, replicated=repl, step_fn=step_fn,
              jit_step=step_lib.jit_step(step_fn, shardings, bsh, repl))


def setup(config: ml_collections.ConfigDict, devices=None):
  """Everything but the loop: returns a namespace-like dict (used by `run`, the benchmark and the tests).

  The jitted functions are cached per (config, devices), so calling `run` again in the same process (a restart,
  a sweep of identical shapes) does not recompile.
  """
  validate_config(config)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  mesh_lib.check_batch(config.batch_size, mesh)
  data_iter, n_regions = make_data_iterator(config)
  key = (config.to_json_best_effort(sort_keys=True), tuple(d.id for d in mesh.devices.flat), n_regions)
  if key in _SETUP_CACHE:
    return dict(_SETUP_CACHE[key], data_iter=data_iter)
  config = ml_collections.ConfigDict(config.to_dict())  # private copy: later edits by the caller must not leak in
  spe = config.steps_per_epoch
  if spe == -1:
    if not n_regions:
      raise ValueError("config.steps_per_epoch=-1 needs a dataset with a known length; set it explicitly")
    spe = max(n_regions // config.batch_size, 1)
  out = build_step(config, mesh, spe)
  nets, tx, shardings = out["nets"], out["tx"], out["shardings"]
  out.update(step_rng=jax.device_put(out["step_rng"], out["replicated"]),
             create_state=jax.jit(lambda r: state_lib.create_state(config, nets, tx, r), out_shardings=shardings))
  if len(_SETUP_CACHE) >= _SETUP_CACHE_SIZE:
    _SETUP_CACHE.pop(next(iter(_SETUP_CACHE)))
  _SETUP_CACHE[key] = out
  return dict(out, data_iter=data_iter)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, devices=None,
        stop_at_step: int | None = None, time_budget_s: float | None = None) -> dict[str, Any]:
  """Pretrains (or resumes) in `workdir`.

  Args:
    config: a `configs/pretrain.py` config.
    workdir: run directory (local or `gs://`): `checkpoints/`, `metrics.jsonl`, `config.json`.
    devices: devices of the mesh (default: all).
    stop_at_step: stop (and checkpoint) once this step is reached, without changing the schedules (used to
      test resumption and to split long runs).
    time_budget_s: stop (and checkpoint) after this many seconds of training, counted from the end of the first
      step (compilation excluded; the demo's budget); the schedules are unchanged, so a later call continues.

  Returns:
    dict with `step` (steps done), `total_steps`, `last_metrics` (last logged record), `checkpoint_dir`,
    `last_checkpoint_step`, `preempted` (bool), `workdir`.

  Raises:
    NonFiniteLossError: a step produced a NaN/inf loss (the state of that step is not saved).
  """
  workdir = ckpt_lib._abs(workdir)  # pylint: disable=protected-access
  is_main = jax.process_index() == 0
  s = setup(config, devices)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  ckpt = ckpt_lib.Checkpointer(workdir / CHECKPOINT_DIR, keep=config.keep_checkpoints,
                               async_save=config.async_checkpointing)
  data_iter = s["data_iter"]
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = ckpt_lib.abstract_like(s["abstract_state"], s["shardings"])
    state, _ = ckpt.restore(abstract, data_iter, step=latest)
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
  else:
    state = s["create_state"](s["init_rng"])
  step = int(jax.device_get(state["step"]))
  total = s["total_steps"]
  end = total if stop_at_step is None else min(total, stop_at_step)
  writer = _MetricsWriter(workdir, is_main)
  monitor = health_lib.HealthMonitor(health_lib.num_prototypes(config), total, _health_cfg(config))
  for rec in writer.restore(step):  # rows up to the restored step (later ones were never checkpointed)
    monitor.update(rec)
  last_saved = latest
  n_views = config.data.n_global + config.data.n_local

  def save(step_now: int, st) -> None:
    nonlocal last_saved
    if last_saved == step_now:
      return
    ckpt.save(step_now, st, data_iter)
    last_saved = step_now

  pbar = None
  if config.progress_bar and is_main:
    from tqdm import auto as tqdm  # pylint: disable=import-outside-toplevel
    pbar = tqdm.tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, desc="pretrain")
  acc: dict[str, list[float]] = {}
  last_record: dict[str, Any] = {}
  t_log, steps_since = time.perf_counter(), 0
  preempted = False
  t_start, steps_done = time.perf_counter(), 0
  try:
    with ckpt_lib.PreemptionFlag() as pre:
      while step < end:
        batch = _global_batch(next(data_iter), s["batch_sharding"])
        state, metrics = s["jit_step"](state, batch, s["step_rng"])
        step += 1
        m = _to_float(metrics)
        if not np.isfinite(m["loss"]):
          raise NonFiniteLossError(step, m["loss"], last_saved)
        for k, v in m.items():
          acc.setdefault(k, []).append(v)
        steps_since += 1
        if pbar is not None:
          pbar.update(1)
          pbar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        stop_now = _any_process(pre.requested, step)
        if steps_done == 0:
          t_start = time.perf_counter()  # the budget counts training, not the first step's compilation
        steps_done += 1
        out_of_time = time_budget_s is not None and time.perf_counter() - t_start > time_budget_s
        if out_of_time and step < end:
          end = step  # all processes read the same clock budget only approximately: single-host use
        if step % config.log_every_steps == 0 or step == end or stop_now:
          dt = time.perf_counter() - t_log
          rec = {"step": step, **{k: float(np.mean(v)) for k, v in acc.items()},
                 "steps_per_s": steps_since / dt, "images_per_s": steps_since * config.batch_size / dt,
                 "views_per_s": steps_since * config.batch_size * n_views / dt, "epoch": step / s["steps_per_epoch"]}
          writer.write(rec)
          last_record = rec
          for msg in monitor.update(rec):
            logging.warning("%s", msg)
            if is_main:
              (pbar.write if pbar is not None else functools.partial(print, file=sys.stderr, flush=True))(msg)
          acc, t_log, steps_since = {}, time.perf_counter(), 0
        if step % config.checkpoint_every_steps == 0 or step == end or stop_now:
          save(step, state)
        if stop_now:
          preempted = True
          logging.warning("termination signal received: saved step %d and stopping", step)
          break
  finally:
    if pbar is not None:
      pbar.close()
    ckpt.close()
  health = monitor.status()
  if is_main:
    (workdir / HEALTH_FILE).write_text(json.dumps(health, indent=2, default=float))
  return {"step": step, "total_steps": total, "last_metrics": last_record, "workdir": str(workdir),
          "checkpoint_dir": str(ckpt.directory), "last_checkpoint_step": last_saved, "preempted": preempted,
          "health": health}


def _health_cfg(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.health` when the config has it (configs/pretrain.py always does), else the default thresholds."""
  return config.health if "health" in config else health_lib.default_config()


def _any_process(flag: bool, step: int) -> bool:
  """The preemption decision; on multi-process runs all processes agree on it every 10 steps (an all-gather)."""
  if jax.process_count() == 1:
    return flag
  if step % 10:
    return False
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def load_state(workdir: str | os.PathLike, config: ml_collections.ConfigDict, step: int | None = None,
               devices=None) -> tuple[dict, int]:
  """Restores the train state of `workdir` (latest or `step`) without the data iterator."""
  s = setup(config, devices)
  ckpt = ckpt_lib.Checkpointer(ckpt_lib._abs(workdir) / CHECKPOINT_DIR, async_save=False)  # pylint: disable=protected-access
  try:
    return ckpt.restore(ckpt_lib.abstract_like(s["abstract_state"], s["shardings"]), None, step)
  finally:
    ckpt.close()
