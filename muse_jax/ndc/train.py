"""NDC fine-tuning driver: `run(config, workdir)` (config: `configs/finetune_ndc.py`).

One jitted step (data-parallel `Mesh` over the devices that divide the batch; params replicated):
1. the batch holds LFoV samples (`lfov.py`): uint8 fields with weak (dihedral) augmentation, padded GT lists and
   the labelled-region box;
2. the student sees the strong view (photometric jitter + noise on the weak view; the weak view itself when
   `semi.strong_aug` is off), the EMA teacher the weak view;
3. GT nuclei are matched to the student's proposals inside the labelled region (`matching.hungarian_assign`,
   a host callback) -> class CE + point MSE; other region proposals -> background;
4. outside the region, confident teacher proposals supervise the student (`losses.consistency_loss`) from
   `semi.start_step` on;
5. AdamW, then the EMA teacher update (`muse_jax.pretrain.teacher.ema_teacher`, last in the optax chain).

Workdir: `checkpoints/<step>/` (Orbax via `muse_jax.pretrain.checkpoint.Checkpointer`; resume is automatic),
`metrics.jsonl` (one JSON object per logged step and per evaluation), `config.json`, and `export/` (an NDC
checkpoint for `Predictor.from_checkpoint` / `python -m muse_jax.predict`). The data order is a pure function of
(seed, step), so resuming needs no iterator state.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from muse_jax import cli
from muse_jax import config_check
from muse_jax import ops
from muse_jax.ndc import head as head_lib
from muse_jax.ndc import infer as infer_lib
from muse_jax.ndc import lfov, losses, matching
from muse_jax.ndc import metrics as metrics_lib
from muse_jax.pretrain import teacher as teacher_lib


# ---------------------------------------------------------------------------------------------------- config
C = config_check

# Every field of a `configs/finetune_ndc.py` config with the type and range it must have, checked before any data
# is read or anything is written (`validate_config`). Units: µm/px (mpp), px (sizes), µm (radii, distances).
RULES: dict[str, config_check.Rule] = {
    "variant": C.string(nonempty=True), "ablations": C.string(), "init": C.string(nonempty=True),
    "seed": C.integer(0), "num_devices": C.integer(0),
    "data.dataset": C.string(nonempty=True), "data.dir": C.string(nonempty=True),
    "data.train_split": C.string(nonempty=True), "data.val_split": C.string(),
    "data.class_names": C.sequence(C.string(nonempty=True)), "data.max_samples": C.integer(0),
    "data.mpp": C.positive("µm/px"), "data.context": C.optional(C.string(nonempty=True)),
    "data.context_tolerance": C.nonneg(), "data.context_cache_mb": C.positive("MB"),
    "lfov.enabled": C.boolean(), "lfov.field": C.integer(1), "lfov.label_size": C.optional(C.integer(1)),
    "lfov.pad_mode": C.choice("reflect", "constant"), "lfov.flips": C.boolean(), "lfov.center": C.boolean(),
    "lfov.no_lfov_field": C.integer(1),
    "head.stride": C.choice(4, 8), "head.hidden_dim": C.integer(1), "head.num_layers": C.integer(1),
    "head.bg_prior": C.number(0, 1, lo_open=True, hi_open=True),
    "loss.cls": C.nonneg(), "loss.reg": C.nonneg(), "loss.cons": C.nonneg(), "loss.bg_weight": C.nonneg(),
    "loss.match_point_weight": C.nonneg(), "loss.match_class_weight": C.nonneg(),
    "loss.match_max_dist_um": C.positive("µm"),
    "semi.enabled": C.boolean(), "semi.strong_aug": C.boolean(), "semi.threshold": C.prob(),
    "semi.bg_threshold": C.prob(), "semi.start_step": C.integer(0), "semi.ema_momentum": C.prob(),
    "optim.lr": C.positive(), "optim.weight_decay": C.nonneg(), "optim.warmup_steps": C.integer(0),
    "optim.clip_grad": C.nonneg(), "optim.backbone_train_mode": C.optional(C.boolean()),
    "train.steps": C.integer(1), "train.batch_size": C.integer(1), "train.log_every": C.integer(1),
    "train.ckpt_every": C.integer(1), "train.keep": C.integer(1), "train.eval_every": C.integer(0),
    "train.max_points": C.integer(0), "train.export": C.choice("teacher", "student"), "train.progress": C.boolean(),
    "infer.window": C.integer(1), "infer.overlap": C.integer(0), "infer.batch_size": C.integer(1),
    "infer.score_threshold": C.prob(), "infer.nms_radius_um": C.positive("µm"), "infer.max_detections": C.integer(1),
    "eval.modes": C.sequence(C.choice(*metrics_lib.MODES)), "eval.radius_um": C.positive("µm"),
    "eval.max_images": C.integer(0),
}
# Fields older configs (a resumed run's config.json) may lack, with the value that reproduces the older code.
LEGACY_DEFAULTS: dict[str, Any] = {"lfov.center": False, "optim.backbone_train_mode": None, "num_devices": 0}
# Fields a resume may change (WORKSPACE.md, "Errors and recovery"): the run's length, logging, checkpoint cadence and
# retention, the progress bar, which weights are exported, the device count, inference and evaluation settings, the
# validation split and the context cache size. Anything else would mix two runs in one workdir.
RESUMABLE: tuple[str, ...] = ("train.steps", "train.log_every", "train.ckpt_every", "train.keep", "train.progress",
                              "train.eval_every", "train.export", "num_devices", "infer.", "eval.", "data.val_split",
                              "data.context_cache_mb")
FOREIGN_FILES = {"model_config.json": "a backbone export (muse_jax.export / tools.import_torch)",
                 infer_lib.CONFIG_FILE: "an NDC model export (muse_jax.finetune's export/)"}
BUNDLED = "bundled"


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `cli.UserError` naming `config.<field>` for a missing, mistyped or impossible field (`RULES`, then the
  relations between fields and the data / init paths); reads no data."""
  if config_check.lookup(config, "data.dir") is None:
    raise cli.UserError("not set", "config.data.dir",
                        "pass --config.data.dir=PATH (a BRCA-M2C folder or a TFDS data dir prepared by "
                        f"muse_jax.data.prepare), or --config.data.dir={BUNDLED} for the 11-tile bundled sample")
  config_check.check(config, RULES, optional_fields=LEGACY_DEFAULTS)
  d = config.data
  if d.dir != BUNDLED and "://" not in d.dir and not os.path.isdir(d.dir):
    raise cli.UserError("data folder not found", "config.data.dir", f"{d.dir!r} is not a folder (or '{BUNDLED}')")
  if d.context is not None and "://" not in d.context and not os.path.isfile(d.context):
    raise cli.UserError("context manifest not found", "config.data.context", f"{d.context!r} is not a file")
  init = str(config.init)
  if init.startswith("random:"):
    from configs import models as model_configs  # pylint: disable=import-outside-toplevel
    if init[len("random:"):] not in model_configs.VARIANTS:
      raise cli.UserError("unknown random backbone", "config.init (--init)",
                          f"got {init!r}; expected random:<{'|'.join(model_configs.VARIANTS)}>")
  elif "://" not in init and not os.path.isdir(init):
    raise cli.UserError("backbone directory not found", "config.init (--init)",
                        f"{init!r}: expected random:<variant> or a backbone directory (muse_jax.export)")
  if config.infer.overlap >= config.infer.window:
    raise cli.UserError("must be smaller than config.infer.window", "config.infer.overlap",
                        f"got {config.infer.overlap} >= {config.infer.window}")
  if config.lfov.label_size is not None and config.lfov.label_size > config.lfov.field:
    raise cli.UserError("must be <= config.lfov.field", "config.lfov.label_size",
                        f"got {config.lfov.label_size} > {config.lfov.field}")
  check_field(config)


def check_workdir(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """Refuses a workdir `run(config, workdir)` must not write into or resume (another command's, an export, a resume
  that changes a field outside `RESUMABLE`); returns its stored config or None. Reads only `config.json`."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  return config_check.check_workdir(epath.Path(os.path.abspath(os.fspath(workdir))), "finetune", config, RESUMABLE,
                                    foreign_files=FOREIGN_FILES, legacy=LEGACY_DEFAULTS)


# ---------------------------------------------------------------------------------------------------- data
def _resample_sample(s: Any, mpp: float) -> Any:
  """Resamples a `readers.Sample`-like object to `mpp` (bicubic; coordinates scaled) when it differs by > 2 %."""
  if abs(s.mpp / mpp - 1.0) <= 0.02:
    return s
  from muse_jax.data.readers import Sample  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  f = s.mpp / mpp
  H, W = s.image.shape[:2]
  w, h = max(1, round(W * f)), max(1, round(H * f))
  img = np.asarray(Image.fromarray(s.image).resize((w, h), Image.BICUBIC))
  xy = (np.asarray(s.coords, np.float32) + 0.5) * np.array([w / W, h / H], np.float32) - 0.5
  out = Sample(img, xy, s.classes, mpp, s.name, s.split)
  out.orig_mpp = s.mpp  # the stored tile's µm/px (the default context mpp, muse_jax/ndc/context.py)
  return out


def load_samples(data_cfg: ml_collections.ConfigDict, split: str) -> list[Any]:
  """Labelled samples of `split` at `data_cfg.mpp` (`muse_jax.data.load_labelled`)."""
  from muse_jax.data import load_labelled  # pylint: disable=import-outside-toplevel

  samples = load_labelled(data_cfg.dataset, data_cfg.dir, split)
  n = int(data_cfg.get("max_samples", 0))
  samples = samples[:n] if n > 0 else samples
  return [_resample_sample(s, float(data_cfg.mpp)) for s in samples]


def field_size(config: ml_collections.ConfigDict) -> int:
  return int(config.lfov.field if config.lfov.enabled else config.lfov.no_lfov_field)


def make_batch(samples: list[Any], config: ml_collections.ConfigDict, step: int, batch_size: int,
               max_points: int, context: Any = None) -> dict[str, np.ndarray]:
  """The batch of `step`: a pure function of (config.seed, step).

  `context` (a `muse_jax.ndc.context.ContextProvider`, optional) supplies the real surroundings of the tiles it
  knows; other tiles are padded (`config.lfov.pad_mode`).
  """
  rng = np.random.default_rng([int(config.seed), int(step)])
  F = field_size(config)
  label_size = config.lfov.label_size if config.lfov.enabled else None
  out = []
  for i in rng.integers(0, len(samples), batch_size):
    s = samples[int(i)]
    ctx, origin = (None, None)
    if context is not None and config.lfov.enabled and s.name in context:
      ctx, origin = context.get(s.name, s.image, getattr(s, "orig_mpp", None))
    smp = lfov.make_lfov_sample(s.image, s.coords, s.classes, field=F, rng=rng, label_size=label_size,
                                context=ctx, tile_origin=origin, pad_mode=config.lfov.pad_mode,
                                center=bool(config.lfov.get("center", False)))
    if config.lfov.flips:
      smp = lfov.random_dihedral(smp, rng)
    out.append(smp)
  return lfov.collate(out, max_points)


def strong_photometric(key: jax.Array, x: jax.Array) -> jax.Array:
  """Strong photometric view of float images [B, H, W, 3] in [0, 1]: brightness, contrast, saturation, channel
  gains and Gaussian noise, drawn per image."""
  B = x.shape[0]
  k = jax.random.split(key, 5)
  u = lambda kk, shape, lo, hi: jax.random.uniform(kk, shape, jnp.float32, lo, hi)  # noqa: E731
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  x = (x - mean) * u(k[0], (B, 1, 1, 1), 0.7, 1.3) + mean + u(k[1], (B, 1, 1, 1), -0.1, 0.1)
  gray = jnp.mean(x, -1, keepdims=True)
  x = gray + (x - gray) * u(k[2], (B, 1, 1, 1), 0.6, 1.4)
  x = x * u(k[3], (B, 1, 1, 3), 0.9, 1.1) + 0.03 * jax.random.normal(k[4], x.shape)
  return jnp.clip(x, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------- model
def model_config_for(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The backbone's model config named by `config.init` (`random:<variant>` or a backbone directory), without
  reading any weights."""
  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

  src = str(config.init)
  if src.startswith(backbone_io.RANDOM_PREFIX):
    from configs import models as model_configs  # pylint: disable=import-outside-toplevel

    return model_configs.get_config(src[len(backbone_io.RANDOM_PREFIX):])
  return backbone_io.load_model_config(src)


def _head_params(config: ml_collections.ConfigDict, model_cfg: Any, module) -> Any:
  s = 8 * int(config.head.stride)
  dummy = jnp.zeros((1, s // 4, s // 4, int(model_cfg.map_dim)), jnp.float32)
  return module.head.init(jax.random.key(int(config.seed) + 1), dummy, s)["params"]


def _assemble_variables(bb_vars: Any, head_params: Any) -> dict[str, Any]:
  params = {"backbone": bb_vars["params"], "head": head_params}
  batch_stats = {"backbone": bb_vars["batch_stats"]} if bb_vars.get("batch_stats") else {}
  return {"params": params, "batch_stats": batch_stats}


def init_model(config: ml_collections.ConfigDict, num_classes: int):
  """Builds the NDC model and its variables: the backbone from `config.init`, a freshly initialised head."""
  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

  model_cfg, bb_vars = backbone_io.load_backbone(config.init, seed=int(config.seed))
  module = head_lib.build_model(model_cfg, config.head, num_classes)
  head_params = jax.tree.map(np.asarray, _head_params(config, model_cfg, module))
  return model_cfg, module, _assemble_variables(bb_vars, head_params)


def abstract_model(config: ml_collections.ConfigDict, num_classes: int):
  """`init_model` without weights: `(model_cfg, module, variables)` with `jax.ShapeDtypeStruct` leaves (backbone
  shapes from its model config, the head's from `jax.eval_shape` of its init)."""
  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

  model_cfg = model_config_for(config)
  module = head_lib.build_model(model_cfg, config.head, num_classes)
  bb_vars = dict(backbone_io.abstract_variables(model_cfg))
  head_params = jax.eval_shape(lambda: _head_params(config, model_cfg, module))
  return model_cfg, module, _assemble_variables(bb_vars, head_params)


def backbone_train_mode(config: ml_collections.ConfigDict) -> bool:
  """BN in training mode (batch statistics) and drop-path on? Default: only for a random initialisation (its
  running statistics mean nothing); pretrained backbones keep their running statistics (small batches)."""
  v = config.optim.get("backbone_train_mode", None)
  return str(config.init).startswith("random:") if v is None else bool(v)


def build_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
  o = config.optim
  total = max(2, int(config.train.steps))
  # Short runs (smoke tests, --config.train.steps below the warm-up): the warm-up takes all but the last step.
  warmup = max(1, min(int(o.warmup_steps), total - 1))
  lr = optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup, total, o.lr * 0.01)
  decay = jax.tree.map(lambda p: p.ndim > 1, params)
  parts = []
  if o.clip_grad and o.clip_grad > 0:
    parts.append(optax.clip_by_global_norm(float(o.clip_grad)))
  parts.append(optax.adamw(lr, weight_decay=float(o.weight_decay), mask=decay))
  parts.append(teacher_lib.ema_teacher(float(config.semi.ema_momentum)))
  return optax.chain(*parts)


def make_step_fn(config: ml_collections.ConfigDict, module, tx, num_classes: int,
                 gather: NamedSharding | None = None):
  """The pure step `(state, batch) -> (state, metrics)`.

  `gather` (a NamedSharding on the step's mesh; None on one device): on several devices the Hungarian host
  callback runs per device on its own rows of the batch (`jax.shard_map` over `data`), so no device waits in a
  collective for a callback pinned to device 0 (that deadlocked XLA:CPU's in-process collectives with 4 devices)
  and the matching work is spread over the hosts.
  """
  F = field_size(config)
  stride = int(config.head.stride)
  anchors = jnp.asarray(head_lib.anchor_grid(F, stride))
  L, S = config.loss, config.semi
  bb_train = backbone_train_mode(config)
  max_dist = float(L.match_max_dist_um) / float(config.data.mpp)
  base_key = jax.random.key(int(config.seed) + 2)

  def apply(params, batch_stats, x, train, key):
    v = {"params": params, "batch_stats": batch_stats}
    if train:
      out, upd = module.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
      return out, upd["batch_stats"]
    return module.apply(v, x, train=False), batch_stats

  def step_fn(state, batch):
    step = state["step"]
    key = jax.random.fold_in(base_key, step)
    x01 = batch["images"].astype(jnp.float32) / 255.0
    x_student = strong_photometric(jax.random.fold_in(key, 1), x01) if (S.enabled and S.strong_aug) else x01
    valid = lfov.in_region(anchors[None], batch["region"])  # [B, P]
    if S.enabled:
      t_params = teacher_lib.get_teacher(state["opt_state"])
      t_out = module.apply({"params": t_params, "batch_stats": state["batch_stats"]}, ops.normalize_images(x01),
                           train=False)
      t_out = jax.lax.stop_gradient(t_out)
      cons_on = (step >= int(S.start_step)).astype(jnp.float32)

    def loss_fn(params):
      out, new_bs = apply(params, state["batch_stats"], ops.normalize_images(x_student), bb_train,
                          jax.random.fold_in(key, 2))
      probs = jax.nn.softmax(jax.lax.stop_gradient(out["logits"]).astype(jnp.float32), -1)
      args = (jax.lax.stop_gradient(out["points"]), probs, valid, batch["coords"], batch["classes"], batch["mask"])
      match = functools.partial(matching.hungarian_assign, point_weight=float(L.match_point_weight),
                                class_weight=float(L.match_class_weight), max_dist=max_dist)
      if gather is not None and gather.mesh.size > 1:
        match = jax.shard_map(match, mesh=gather.mesh, in_specs=(P("data"),) * len(args), out_specs=P("data"),
                              check_vma=False)
      assign = match(*args)
      sup = losses.supervised_loss(out["logits"], out["points"], assign, batch["coords"], batch["classes"], valid,
                                   stride=stride, bg_weight=float(L.bg_weight))
      loss = L.cls * sup["cls"] + L.reg * sup["reg"]
      m = {"loss_cls": sup["cls"], "loss_reg": sup["reg"], "matched": sup["num_matched"],
           "gt": jnp.sum(batch["mask"]), "unmatched_gt": jnp.sum(batch["mask"] & (assign < 0))}
      if S.enabled:
        c = losses.consistency_loss(out["logits"], out["points"], t_out["logits"], t_out["points"], ~valid,
                                    stride=stride, threshold=float(S.threshold), bg_threshold=float(S.bg_threshold),
                                    bg_weight=float(L.bg_weight))
        loss = loss + cons_on * L.cons * (c["cls"] + L.reg * c["reg"])
        m.update({"loss_cons_cls": c["cls"], "loss_cons_reg": c["reg"], "pseudo_fg": c["num_fg"],
                  "pseudo_bg": c["num_bg"]})
      m["loss_sup"] = L.cls * sup["cls"] + L.reg * sup["reg"]
      m["loss"] = loss
      return loss, (m, new_bs)

    (_, (m, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    m["grad_norm"] = optax.global_norm(grads)
    new_state = {"step": step + 1, "params": params, "batch_stats": new_bs, "opt_state": opt_state}
    return new_state, m

  return step_fn


def make_mesh(batch_size: int, num_devices: int = 0, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """1-D data mesh over as many devices as divide `batch_size` (at most `num_devices` when > 0; Auto axes).

  `devices` defaults to `jax.devices()`; the AOT tool passes compile-only TPU devices.
  """
  devs = list(jax.devices() if devices is None else devices)
  n = math.gcd(len(devs) if num_devices <= 0 else min(num_devices, len(devs)), batch_size)
  return Mesh(np.array(devs[:n]), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def create_state(tx: optax.GradientTransformation, variables: dict[str, Any]) -> dict[str, Any]:
  """The train state `{'step', 'params', 'batch_stats', 'opt_state'}` at step 0."""
  return {"step": jnp.zeros([], jnp.int32), "params": variables["params"], "batch_stats": variables["batch_stats"],
          "opt_state": tx.init(variables["params"])}


def build_step(config: ml_collections.ConfigDict, module, tx: optax.GradientTransformation, num_classes: int,
               mesh: Mesh) -> dict[str, Any]:
  """The jitted fine-tuning step on `mesh`: ONE builder for `run` and `abstract_step` (the AOT tool).

  State replicated, batch split over `data`, state donated. Returns a dict with `step_fn` (pure), `jit_step`,
  `replicated` and `batch_sharding` (NamedShardings) and `mesh`.
  """
  repl, data_sh = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step_fn = make_step_fn(config, module, tx, num_classes, repl if mesh.devices.size > 1 else None)
  jit_step = jax.jit(step_fn, in_shardings=(repl, data_sh), out_shardings=(repl, repl), donate_argnums=(0,))
  return {"step_fn": step_fn, "jit_step": jit_step, "replicated": repl, "batch_sharding": data_sh, "mesh": mesh}


def batch_shapes(config: ml_collections.ConfigDict, batch_size: int, max_points: int) -> dict[str, Any]:
  """Abstract batch of `make_batch` (`lfov.collate`): shapes and dtypes only."""
  F = field_size(config)
  return {"images": jax.ShapeDtypeStruct((batch_size, F, F, 3), jnp.uint8),
          "coords": jax.ShapeDtypeStruct((batch_size, max_points, 2), jnp.float32),
          "classes": jax.ShapeDtypeStruct((batch_size, max_points), jnp.int32),
          "mask": jax.ShapeDtypeStruct((batch_size, max_points), jnp.bool_),
          "region": jax.ShapeDtypeStruct((batch_size, 4), jnp.float32)}


ABSTRACT_MAX_POINTS = 512  # GT slots per field for abstract_step when config.train.max_points is 0 (no data read)


def check_field(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError when the field side is not a multiple of the backbone's stride and the head's stride."""
  F = field_size(config)
  mult = math.lcm(32 if "r50" in config.variant else 16, int(config.head.stride))
  if F % mult:
    where = "config.lfov.field" if config.lfov.enabled else "config.lfov.no_lfov_field"
    raise cli.UserError(f"must be a multiple of {mult} (backbone and head strides)", where, f"got {F}")


def abstract_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> dict[str, Any]:
  """The jitted fine-tuning step `run` executes, on abstract sharded arguments (for `muse_jax.tools.aot`).

  Nothing is loaded or read: the backbone's variable shapes come from its model config (`config.init`), the state
  from `jax.eval_shape`, the batch from `batch_shapes` with `config.train.max_points` GT slots per field
  (`ABSTRACT_MAX_POINTS` when 0). Mesh rule, step function, shardings and donation are `run`'s (`make_mesh`,
  `build_step`). The Hungarian matching stays a host callback (`jax.pure_callback`) in the compiled program.

  Returns:
    dict(jitted=, args=(state, batch), mesh=, global_batch=, images_per_sample=1, description=).
  """
  check_field(config)
  C = len(config.data.class_names)
  B = int(config.train.batch_size)
  max_points = max(int(config.train.max_points) or ABSTRACT_MAX_POINTS, 64)
  model_cfg, module, variables = abstract_model(config, C)
  tx = build_optimizer(config, variables["params"])
  state = jax.eval_shape(lambda v: create_state(tx, v), variables)
  mesh = make_mesh(B, int(config.get("num_devices", 0)), devices)
  built = build_step(config, module, tx, C, mesh)
  with_sh = lambda tree, sh: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree)
  args = (with_sh(state, built["replicated"]), with_sh(batch_shapes(config, B, max_points), built["batch_sharding"]))
  desc = (f"finetune {config.variant}{',' + config.ablations if config.ablations else ''}: model {model_cfg.name}, "
          f"{field_size(config)}px fields, {max_points} GT slots, semi={bool(config.semi.enabled)}, Hungarian "
          f"matching as a host callback; data mesh {mesh.shape['data']} (state replicated)")
  return {"jitted": built["jit_step"], "args": args, "mesh": mesh, "global_batch": B, "images_per_sample": 1,
          "description": desc}


# ---------------------------------------------------------------------------------------------------- eval
def export_variables(state: dict[str, Any], which: str, semi: bool) -> dict[str, Any]:
  params = teacher_lib.get_teacher(state["opt_state"]) if (which == "teacher" and semi) else state["params"]
  return {"params": params, "batch_stats": state["batch_stats"]}


def make_predictor(config, model_cfg, variables) -> infer_lib.Predictor:
  i = config.infer
  return infer_lib.Predictor(model_cfg, config.head, variables, list(config.data.class_names), config.data.mpp,
                             window=int(i.window), overlap=int(i.overlap), batch_size=int(i.batch_size),
                             score_threshold=float(i.score_threshold), nms_radius_um=float(i.nms_radius_um),
                             max_detections=int(i.max_detections))


def evaluate_samples(predictor: infer_lib.Predictor, samples: list[Any], modes, radius_um: float
                     ) -> dict[str, dict[str, Any]]:
  """Predicts every sample (whole image, sliding windows) and scores it under each mode."""
  preds = [predictor.predict_image(s.image, s.mpp) for s in samples]
  gts = [{"points": s.coords, "classes": s.classes} for s in samples]
  return {m: metrics_lib.evaluate(preds, gts, mode=m, class_names=predictor.class_names,
                                  mpp=[s.mpp for s in samples], radius_um=radius_um) for m in modes}


def _summary(res: dict[str, dict[str, Any]]) -> dict[str, float]:
  out = {}
  for m, r in res.items():
    out[f"{m}/f_det"] = r["detection"]["f1"]
    out[f"{m}/f_mean"] = r["mean_f1"]
    for c, v in r["classes"].items():
      out[f"{m}/f_{c}"] = v["f1"]
  return out


# ---------------------------------------------------------------------------------------------------- run
def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, "dtype"):
    return np.asarray(x).tolist()
  return x


def _host(x: Any) -> np.ndarray:
  """A (replicated) array as host NumPy, also when it spans several processes (multi-host)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(jax.device_get(x))


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Fine-tunes the NDC model; returns `{'step', 'last_metrics', 'eval', 'export'}`.

  Resumes from the newest checkpoint in `workdir/checkpoints` when there is one.

  Multi-host (after `jax.distributed.initialize`, e.g. `python -m muse_jax.finetune --multihost`): every process
  runs this with the same config and workdir (shared storage). The batch is a pure function of (seed, step), so each
  process builds it and feeds its own rows (`jax.make_array_from_process_local_data`): the data are the same for any
  number of processes. The mesh spans all devices (the batch must be a multiple of the device count). Process 0
  writes the logs, the config and the evaluation; checkpoints and the export are written by all (Orbax).
  """
  from muse_jax.pretrain.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  validate_config(config)
  check_workdir(workdir, config)
  workdir = os.path.abspath(os.fspath(workdir))
  B = int(config.train.batch_size)
  pi, pc = jax.process_index(), jax.process_count()
  is_main = pi == 0
  if pc > 1 and B % jax.device_count():
    raise cli.UserError(f"got {B}, expected a multiple of the {jax.device_count()} devices of the {pc} processes "
                        "(multi-host runs use every device)", "config.train.batch_size")
  class_names = list(config.data.class_names)
  C = len(class_names)
  try:
    train = load_samples(config.data, config.data.train_split)
  except ValueError as e:
    raise cli.UserError("cannot read the training data", "config.data.dir", str(e)) from e
  if not train:
    raise cli.UserError(f"no training samples in split {config.data.train_split!r}", "config.data.dir",
                        f"{config.data.dir!r}")
  bad = [s.name for s in train if len(s.classes) and (s.classes.max() >= C)]
  if bad:
    raise cli.UserError(f"has {C} names but samples {bad[:3]} have class ids >= {C}", "config.data.class_names")
  F = field_size(config)
  os.makedirs(workdir, exist_ok=True)
  max_points = int(config.train.max_points) or int(64 * math.ceil(max(len(s.coords) for s in train) / 64 + 1e-9))
  max_points = max(max_points, 64)

  from muse_jax.ndc import context as context_lib  # pylint: disable=import-outside-toplevel

  try:
    context = (context_lib.from_config(config.data, F, [s.name for s in train]) if config.lfov.enabled else None)
  except ValueError as e:
    raise cli.UserError("bad context manifest", "config.data.context", str(e)) from e
  model_cfg, module, variables = init_model(config, C)
  tx = build_optimizer(config, variables["params"])
  state = create_state(tx, variables)
  mesh = make_mesh(B, 0 if pc > 1 else int(config.get("num_devices", 0)))
  built = build_step(config, module, tx, C, mesh)  # the same builder as abstract_step (the AOT tool)
  repl, data_sh = built["replicated"], built["batch_sharding"]
  state = jax.device_put(state, repl)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(config.train.keep), async_save=False)
  start = 0
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
    try:
      state, start = ckpt.restore(abstract)
    except (ValueError, KeyError, OSError) as e:
      raise cli.UserError("cannot restore the latest checkpoint", f"{ckpt.directory}/{ckpt.latest_step()}",
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
  if is_main:  # written only now that the run is known to be valid (checked config and workdir, restored state)
    from etils import epath  # pylint: disable=import-outside-toplevel
    config_check.write_json_atomic(epath.Path(workdir) / config_check.CONFIG_FILE,
                                   config.to_json_best_effort(indent=2, sort_keys=True))
  rows = slice(pi * B // pc, (pi + 1) * B // pc)  # this process's rows of the global batch

  step_fn = built["jit_step"]
  total = int(config.train.steps)
  log_path = os.path.join(workdir, "metrics.jsonl")
  last: dict[str, Any] = {}
  bar = None
  if config.train.progress and start < total and is_main:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm(total=total, initial=start, desc="ndc finetune", unit="step", dynamic_ncols=True)
  val = None
  t0, t_last = time.time(), time.time()
  for step in range(start, total):
    batch = make_batch(train, config, step, B, max_points, context)
    if pc > 1:
      batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(data_sh, x[rows]), batch)
    else:
      batch = jax.device_put(batch, data_sh)
    state, m = step_fn(state, batch)
    if (step + 1) % int(config.train.log_every) == 0 or step + 1 == total or step == start:
      m = {k: float(_host(v)) for k, v in m.items()}
      if not math.isfinite(m["loss"]):
        raise cli.UserError(f"non-finite loss ({m['loss']}) at step {step + 1}; training stopped", f"--workdir {workdir}",
                            "the bad state was not saved; lower config.optim.lr, then rerun (it resumes from the last "
                            "checkpoint)")
      now = time.time()
      m.update({"step": step + 1, "time": now - t0, "steps_per_s": (step + 1 - start) / max(now - t0, 1e-9)})
      last = m
      if is_main:
        with open(log_path, "a") as f:
          f.write(json.dumps(m) + "\n")
      if bar is not None:
        bar.set_postfix(loss=f"{m['loss']:.3f}", matched=f"{m['matched']:.0f}/{m['gt']:.0f}")
      t_last = now
    if bar is not None:
      bar.update(1)
    if (step + 1) % int(config.train.ckpt_every) == 0 and step + 1 < total:
      ckpt.save(step + 1, state)
    if (config.train.eval_every and (step + 1) % int(config.train.eval_every) == 0 and step + 1 < total
        and is_main):
      val = val if val is not None else _val_samples(config)
      if val:
        pred = make_predictor(config, model_cfg, jax.tree.map(
            _host, export_variables(state, config.train.export, config.semi.enabled)))
        res = _summary(evaluate_samples(pred, val, config.eval.modes, float(config.eval.radius_um)))
        with open(log_path, "a") as f:
          f.write(json.dumps({"step": step + 1, "eval": res}) + "\n")
  if bar is not None:
    bar.close()
  del t_last
  final_step = int(_host(state["step"]))
  if ckpt.latest_step() != final_step:
    ckpt.save(final_step, state)
  ckpt.close()
  if context is not None:
    context.close()

  variables = jax.tree.map(_host, export_variables(state, config.train.export, config.semi.enabled))
  export = infer_lib.save_predictor(os.path.join(workdir, "export"), model_cfg, config.head, class_names,
                                    float(config.data.mpp), variables, config.infer,
                                    extra={"init": config.init, "step": final_step, "variant": config.variant,
                                           "ablations": config.ablations, "weights": config.train.export})
  result = {"step": final_step, "last_metrics": last, "export": str(export), "eval": None}
  val = val if val is not None else (_val_samples(config) if is_main else [])
  if val:
    pred = make_predictor(config, model_cfg, variables)
    res = evaluate_samples(pred, val, config.eval.modes, float(config.eval.radius_um))
    result["eval"] = res
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(_jsonable(res), f, indent=2)
    with open(log_path, "a") as f:
      f.write(json.dumps({"step": final_step, "eval": _summary(res)}) + "\n")
    # the threshold that maximises val F1 becomes the export's default (issue #19: 0.5 can find nothing)
    result["threshold"] = infer_lib.choose_threshold(pred, val, config.eval.modes[0], float(config.eval.radius_um))
    infer_lib.store_threshold(export, result["threshold"]["score_threshold"], result["threshold"]["source"])
  return result


def _val_samples(config: ml_collections.ConfigDict) -> list[Any]:
  if not config.data.val_split:
    return []
  try:
    val = load_samples(config.data, config.data.val_split)
  except (ValueError, FileNotFoundError):
    return []
  n = int(config.eval.max_images)
  return val[:n] if n else val
