"""Networks and train state of MUSE pretraining.

The train state is a plain dict (an Orbax-saveable pytree):

  step                 int32 scalar, optimizer steps taken
  params               student params {'backbone', 'cls_head' (if w_image > 0), 'nu_head' (if w_nu > 0)}
  batch_stats          student BatchNorm statistics {'backbone': ...} (may be empty for BN-free models)
  opt_state            optax chain state; its LAST element is `TeacherEmaState(count, teacher_params)`
  teacher_batch_stats  teacher BatchNorm statistics (the teacher runs BN in train mode)
  centers              {'cls': [K_cls], 'nu': [K_nu]} teacher centers (absent heads: [1] zeros)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from muse_jax import models
from muse_jax.models import heads as heads_lib
from muse_jax.pretrain import teacher as teacher_lib

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Networks:
  """Flax modules of a pretraining run (stateless; variables live in the train state)."""
  student: nn.Module  # backbone with the configured drop-path
  teacher: nn.Module  # same backbone, drop-path 0
  cls_head: nn.Module | None
  nu_head: nn.Module | None
  model_cfg: ml_collections.ConfigDict


def _head(cfg: ml_collections.ConfigDict, out_dim: int) -> nn.Module:
  return heads_lib.DINOHead(out_dim=out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                            num_layers=cfg.num_layers, norm_last_layer=cfg.norm_last_layer)


def build_networks(config: ml_collections.ConfigDict) -> Networks:
  """Student/teacher backbones and the two heads (a head is omitted when its loss weight is 0)."""
  model_cfg = config.model
  student = models.build_backbone(model_cfg, drop_path_rate=config.drop_path_rate)
  teacher = models.build_backbone(model_cfg, drop_path_rate=0.0)
  cls_head = _head(config.heads, config.heads.cls_out_dim) if config.loss.w_image > 0 else None
  nu_head = _head(config.heads, config.heads.nu_out_dim) if config.loss.w_nu > 0 else None
  return Networks(student, teacher, cls_head, nu_head, model_cfg)


def init_variables(nets: Networks, rng: jax.Array, image_size: int) -> tuple[dict, dict]:
  """Initial student `(params, batch_stats)`."""
  k_bb, k_cls, k_nu = jax.random.split(rng, 3)
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = nets.teacher.init(k_bb, dummy, train=False)
  params = {"backbone": variables["params"]}
  batch_stats = {"backbone": variables.get("batch_stats", {})}
  if nets.cls_head is not None:
    params["cls_head"] = nets.cls_head.init(k_cls, jnp.zeros((1, nets.model_cfg.cls_dim)))["params"]
  if nets.nu_head is not None:
    params["nu_head"] = nets.nu_head.init(k_nu, jnp.zeros((1, nets.model_cfg.map_dim)))["params"]
  return params, batch_stats


def create_state(config: ml_collections.ConfigDict, nets: Networks, tx: optax.GradientTransformation,
                 rng: jax.Array) -> State:
  """A fresh train state (teacher = copy of the student; zero centers)."""
  params, batch_stats = init_variables(nets, rng, config.data.global_size)
  k_cls = config.heads.cls_out_dim if nets.cls_head is not None else 1
  k_nu = config.heads.nu_out_dim if nets.nu_head is not None else 1
  return {
      "step": jnp.zeros([], jnp.int32),
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": tx.init(params),
      "teacher_batch_stats": jax.tree.map(jnp.copy, batch_stats),
      "centers": {"cls": jnp.zeros([k_cls], jnp.float32), "nu": jnp.zeros([k_nu], jnp.float32)},
  }


def teacher_backbone_variables(state: State) -> dict[str, Any]:
  """`{'params', 'batch_stats'}` of the teacher backbone alone (the export)."""
  tp = teacher_lib.get_teacher(state["opt_state"])
  return {"params": tp["backbone"], "batch_stats": state["teacher_batch_stats"]["backbone"]}
