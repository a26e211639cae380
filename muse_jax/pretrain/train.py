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

from muse_jax import cli
from muse_jax import config_check
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


C = config_check  # rule constructors: integer, number, positive, prob, pair, choice, ...

# Every field of a `configs/pretrain.py` config, with the type and range it must have (checked at start, before any
# data is read or anything is written; `tests/test_errors_training.py` checks that no field of the shipped configs
# lacks a rule). Physical quantities: µm/px (mpp), px (sizes), µm (blur, detector).
RULES: dict[str, config_check.Rule] = {
    "variant": C.string(), "seed": C.integer(0), "drop_path_rate": C.number(0, 1, hi_open=True),
    "data_source": C.choice("pipeline", "synthetic"), "synthetic_region_nuclei": C.integer(1),
    "batch_size": C.integer(1), "num_epochs": C.integer(1), "steps_per_epoch": C.integer(1, also=(-1,)),
    "total_steps": C.integer(1, also=(-1,)),
    # model (configs/models.py); the backbone builder checks the architecture-specific fields' consistency.
    "model.name": C.string(nonempty=True), "model.arch": C.choice("vit", "resnet50"),
    "model.img_size": C.integer(1), "model.patch_size": C.integer(1), "model.map_dim": C.integer(1),
    "model.cls_dim": C.integer(1), "model.drop_path_rate": C.number(0, 1, hi_open=True),
    "model.dtype": C.choice("float32", "bfloat16"), "model.conv_impl": C.choice("auto", "xla", "winograd"),
    "model.bn_axis_name": C.optional(C.string()),
    "model.embed_dim": C.integer(1), "model.depth": C.integer(1), "model.num_heads": C.integer(1),
    "model.mlp_ratio": C.positive(), "model.qkv_bias": C.boolean(),
    "model.extract_layers": C.sequence(C.integer(0)), "model.cls_mode": C.choice("ignore", "add", "proj"),
    "model.dim_ratios": C.sequence(C.positive()), "model.stem_width": C.integer(1),
    "model.stage_depths": C.sequence(C.integer(1)),
    # data (muse_jax/data/pipeline.py)
    "data.source": C.string(nonempty=True, empty_hint=(
        "pass --config.data.source=... ('brca:PATH', 'tfds:DATA_DIR', 'folder:PATH', a union a|b, or 'bundled' for "
        "the 11-tile sample inside the package, used only when named)")), "data.split": C.string(nonempty=True),
    "data.global_size": C.integer(1), "data.local_size": C.integer(1), "data.n_global": C.integer(1),
    "data.n_local": C.integer(0), "data.mpp_range": C.pair(unit="µm/px"),
    "data.mpp_dist": C.choice("uniform", "loguniform", "discrete"),
    "data.mpp_choices": C.sequence(C.positive("µm/px")), "data.region_mpp": C.optional(C.positive("µm/px")),
    "data.local_in_global": C.boolean(), "data.global_in_global": C.boolean(),
    "data.pad_mode": C.choice("reflect", "constant"), "data.max_nuclei_global": C.integer(1),
    "data.max_nuclei_local": C.integer(1), "data.flips": C.boolean(), "data.rot90": C.boolean(),
    "data.color_aug": C.choice("rgb", "hed", "none"), "data.color_jitter_p": C.prob(),
    "data.brightness": C.nonneg(), "data.contrast": C.nonneg(), "data.saturation": C.nonneg(),
    "data.hue": C.number(0, 0.5), "data.grayscale_p": C.prob(), "data.blur_p": C.sequence(C.prob(), n=3),
    "data.blur_sigma": C.pair(unit="px"), "data.blur_sigma_um": C.optional(C.pair(unit="µm")),
    "data.solarize_p": C.prob(), "data.stain_jitter": C.nonneg(), "data.augment_on": C.choice("host", "device"),
    "data.device_crop_factor": C.optional(C.positive()), "data.num_workers": C.integer(0),
    "data.prefetch_buffer": C.integer(1), "data.read_threads": C.integer(1), "data.read_buffer": C.integer(1),
    "data.detector.min_distance_um": C.positive("µm"), "data.detector.sigma_um": C.positive("µm"),
    "data.detector.threshold_scale": C.positive(),
    # heads, loss
    "heads.cls_out_dim": C.integer(1), "heads.nu_out_dim": C.integer(1), "heads.hidden_dim": C.integer(1),
    "heads.bottleneck_dim": C.integer(1), "heads.num_layers": C.integer(1), "heads.norm_last_layer": C.boolean(),
    "heads.last_layer_name": C.string(nonempty=True), "loss.w_image": C.nonneg(), "loss.w_nu": C.nonneg(),
    "loss.image_targets": C.choice("center", "sinkhorn"), "loss.nu_targets": C.choice("center", "sinkhorn"),
    "loss.sinkhorn_iters": C.integer(1), "loss.w_koleo_nu": C.nonneg(),
    # optimiser and teacher
    "optim.base_lr": C.positive(), "optim.scale_lr": C.boolean(), "optim.min_lr": C.nonneg(),
    "optim.warmup_epochs": C.nonneg(), "optim.weight_decay": C.nonneg(), "optim.weight_decay_end": C.nonneg(),
    "optim.b1": C.number(0, 1, hi_open=True), "optim.b2": C.number(0, 1, hi_open=True), "optim.eps": C.positive(),
    "optim.clip_grad": C.nonneg(), "optim.freeze_last_layer_epochs": C.nonneg(),
    "optim.momentum_teacher": C.prob(), "optim.momentum_teacher_end": C.prob(),
    "optim.warmup_frac": C.number(0, 1, also=(-1,)), "optim.warmup_teacher_temp_frac": C.number(0, 1, also=(-1,)),
    "optim.freeze_last_layer_frac": C.number(0, 1, also=(-1,)), "optim.teacher_half_life_frac": C.prob(),
    "optim.warmup_teacher_temp": C.positive(), "optim.teacher_temp": C.positive(),
    "optim.warmup_teacher_temp_epochs": C.nonneg(), "optim.student_temp": C.positive(),
    "optim.center_momentum": C.prob(),
    "mesh.data": C.integer(1, also=(-1,)), "mesh.fsdp": C.integer(1), "mesh.fsdp_min_size": C.integer(0),
    "health.uniform_entropy_ratio": C.number(0, 1, lo_open=True), "health.min_prototypes": C.nonneg(),
    "health.grace_frac": C.prob(), "health.grace_steps": C.integer(0), "health.patience": C.integer(1),
    "checkpoint_every_steps": C.integer(1), "keep_checkpoints": C.integer(1), "async_checkpointing": C.boolean(),
    "log_every_steps": C.integer(1), "progress_bar": C.boolean(),
}
# Fields a config may lack: added after runs were started (a resumed run's config.json, `muse_jax.export`), or
# present for one architecture only. The value that reproduces a run written before the field existed is given
# (a resume may add the field with that value).
LEGACY_DEFAULTS: dict[str, Any] = {
    "optim.warmup_frac": -1.0, "optim.warmup_teacher_temp_frac": -1.0, "optim.freeze_last_layer_frac": -1.0,
    "optim.teacher_half_life_frac": 0.0, "data.color_aug": "rgb", "data.global_in_global": False,
    "data.blur_sigma_um": None, "loss.image_targets": "center", "loss.nu_targets": "center",
    "loss.sinkhorn_iters": 3, "loss.w_koleo_nu": 0.0, "synthetic_region_nuclei": 32, "data.augment_on": "host",
    "data.device_crop_factor": None, "model.conv_impl": "xla",
}
_OPTIONAL_FIELDS = (set(LEGACY_DEFAULTS) | {f for f in RULES if f.startswith("health.")}
                    | {f"model.{k}" for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                                              "extract_layers", "cls_mode", "dim_ratios", "stem_width",
                                              "stage_depths", "bn_axis_name")})
# Fields a resume may change (documented in WORKSPACE.md, "Errors and recovery"): the run's length (the schedules
# follow it, as when a run is extended), logging, progress bar, checkpoint cadence and retention, the device mesh
# (Orbax restores into any sharding), the collapse detector's thresholds and the loading parallelism. Anything else
# would mix two runs in one workdir.
RESUMABLE: tuple[str, ...] = ("total_steps", "num_epochs", "log_every_steps", "progress_bar",
                              "checkpoint_every_steps", "keep_checkpoints", "async_checkpointing", "mesh.",
                              "health.", "data.read_threads", "data.read_buffer", "model.conv_impl")


def validate_config(config: ml_collections.ConfigDict, *, check_data: bool = False) -> None:
  """Raises `cli.UserError` naming `config.<field>` when a field is missing, has the wrong type or an impossible
  value (every field of `RULES`, then the relations between fields). With `check_data`, also the data source string
  and its paths (`pipeline.check_source`; nothing is read)."""
  for name in ("optim.warmup_frac", "optim.warmup_teacher_temp_frac", "optim.freeze_last_layer_frac"):
    v = config_check.lookup(config, name)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 1:
      raise cli.UserError("a fraction of the run must be <= 1 (-1 = use the *_epochs field)", f"config.{name}",
                          f"got {v}")
  rules = RULES
  if config_check.lookup(config, "data_source") == "synthetic":
    # Synthetic batches read no files: an unset `data.source` (the full-size recipes start with one) is fine,
    # e.g. for `tools.aot`, which compiles the step of any recipe.
    rules = {k: r for k, r in RULES.items() if k != "data.source"}
  config_check.check(config, rules, optional_fields=_OPTIONAL_FIELDS)
  d = config.data
  if config.loss.w_image == 0 and config.loss.w_nu == 0:
    raise cli.UserError("loss weights must be >= 0 and not both 0", "config.loss",
                        f"got w_image={config.loss.w_image}, w_nu={config.loss.w_nu}")
  if config_check.lookup(config, "data.color_aug") == "hed" and not d.stain_jitter > 0:
    raise cli.UserError("color_aug='hed' needs config.data.stain_jitter > 0 (e.g. 0.1)", "config.data.color_aug")
  mult = config.model.patch_size
  for f in ("global_size", "local_size"):
    if (f == "global_size" or d.n_local > 0) and d[f] % mult:
      raise cli.UserError(f"must be a multiple of {mult} for model {config.model.name!r}", f"config.data.{f}",
                          f"got {d[f]}")
  if d.mpp_dist == "discrete" and not d.mpp_choices:
    raise cli.UserError("mpp_dist='discrete' needs at least one value", "config.data.mpp_choices")
  if config.total_steps == -1 and config.steps_per_epoch == -1 and config.data_source == "synthetic":
    raise cli.UserError("steps_per_epoch=-1 needs a dataset with a known length", "config.steps_per_epoch",
                        "set it (or config.total_steps) explicitly with synthetic data")
  if check_data and config.data_source == "pipeline":
    from muse_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    pipeline.check_source(d)


# Files that mark a folder as something other than a pretraining workdir (exports of either kind).
FOREIGN_FILES = {"model_config.json": "a backbone export (muse_jax.export / tools.import_torch)",
                 "ndc_config.json": "an NDC model export (muse_jax.finetune's export/)"}


def check_workdir(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """Refuses a `workdir` that `run(config, workdir)` must not write into or resume (`config_check.check_workdir`
  with `RESUMABLE`); returns the stored config, or None for a new workdir. Reads only `config.json`."""
  return config_check.check_workdir(ckpt_lib._abs(workdir), "pretrain", config, RESUMABLE,  # pylint: disable=protected-access
                                    foreign_files=FOREIGN_FILES, legacy=LEGACY_DEFAULTS)


def _crop_buffers(d: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(global, local) crop buffer sides of the 'device' augmentation layout; None for 'host'."""
  from muse_jax.data import views  # pylint: disable=import-outside-toplevel
  if views.augment_on(d) != "device":
    return None
  return views.crop_buffer_size(d.global_size, d), views.crop_buffer_size(d.local_size, d)


def make_data_iterator(config: ml_collections.ConfigDict) -> tuple[Iterator, int | None]:
  """Host-local batch iterator (checkpointable) and the dataset length in regions (None if unknown)."""
  pi, pc = jax.process_index(), jax.process_count()
  if config.data_source == "synthetic":
    d = config.data
    it = synthetic.SyntheticIterator(batch_size=config.batch_size, n_global=d.n_global, n_local=d.n_local,
                                     global_size=d.global_size, local_size=d.local_size,
                                     max_nuclei_global=d.max_nuclei_global, max_nuclei_local=d.max_nuclei_local,
                                     n_region=config.synthetic_region_nuclei, seed=config.seed, process_index=pi,
                                     process_count=pc, crop_buffers=_crop_buffers(d))
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
  validate_config(config, check_data=False)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  try:
    mesh_lib.check_batch(config.batch_size, mesh)
  except ValueError as e:
    raise cli.UserError(str(e), "config.batch_size") from None
  data_iter, n_regions = make_data_iterator(config)
  key = (config.to_json_best_effort(sort_keys=True), tuple(d.id for d in mesh.devices.flat), n_regions)
  if key in _SETUP_CACHE:
    return dict(_SETUP_CACHE[key], data_iter=data_iter)
  config = ml_collections.ConfigDict(config.to_dict())  # private copy: later edits by the caller must not leak in
  spe = config.steps_per_epoch
  if spe == -1:
    if not n_regions:
      raise cli.UserError("-1 needs a dataset with a known length", "config.steps_per_epoch", "set it explicitly")
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
    cli.UserError: a bad config field, data source or workdir (another command's, or a resume that would change a
      field outside `RESUMABLE`), checked before anything is written; `workdir/config.json` is written (atomically)
      only once the run is known to be valid (config checked, data opened, checkpoint restored).
    ckpt_lib.CheckpointSaveError: a checkpoint could not be written; training stopped at once, the earlier
      checkpoints are intact.
    NonFiniteLossError: a step produced a NaN/inf loss (the state of that step is not saved).
  """
  workdir = ckpt_lib._abs(workdir)  # pylint: disable=protected-access
  is_main = jax.process_index() == 0
  validate_config(config, check_data=True)
  check_workdir(workdir, config)
  s = setup(config, devices)
  ckpt = ckpt_lib.Checkpointer(workdir / CHECKPOINT_DIR, keep=config.keep_checkpoints,
                               async_save=config.async_checkpointing)
  data_iter = s["data_iter"]
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = ckpt_lib.abstract_like(s["abstract_state"], s["shardings"])
    try:
      state, _ = ckpt.restore(abstract, data_iter, step=latest)
    except (ValueError, KeyError, OSError) as e:
      ckpt.close(raise_errors=False)
      raise cli.UserError("cannot restore the latest checkpoint", f"{ckpt.directory}/{latest}",
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    logging.info("resumed from %s at step %d", ckpt.directory, latest)
    if is_main:
      print(f"resuming {workdir} from step {latest}", file=sys.stderr, flush=True)
  else:
    state = s["create_state"](s["init_rng"])
  if is_main:
    config_check.write_json_atomic(workdir / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))
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
  poll_saves = jax.process_count() == 1  # multi-process runs learn of a failed save at the next save (collective)
  finished = False
  try:
    with ckpt_lib.PreemptionFlag() as pre:
      while step < end:
        if poll_saves:
          ckpt.check()  # a background save that failed stops training now, not at the next save
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
    finished = True
  finally:
    if pbar is not None:
      pbar.close()
    ckpt.close(raise_errors=finished)
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
