r"""MUSE pretraining configs (DINO image loss + NuLo nucleus loss, EMA teacher).

Variants (`--config configs/pretrain.py:VARIANT`):
  * `tiny`: 4-block ViT (embed 64), 2 x 64 px global + 2 x 32 px local views, small heads; minutes on a 2-core CPU
    (tests and `make demo`).
  * `vit_s16`, `vit_b16`: spec §3.6-3.7 defaults (2 x 224 + 8 x 96 views, K_cls 65536, K_nu 8192, DINO optimiser
    recipe), 100 epochs, global batch 512.
  * `r50`: ResNet-50 backbone with the same recipe (no drop-path).
  * `lfov_vit_b16`: large field of view, 2 x 512 + 4 x 208 views (spec §3.6).
  * `study`: the CPU-sized recipe of the reproduction study (issue #9, `experiments/study.py`): the `tiny` model
    and optimiser, 2 x 96 px global + 4 x 48 px local views at a mixed physical resolution mpp U(0.5, 1.0), batch 8,
    a few hundred steps (minutes on 2 cores). Data: `--config.data.source='brca:BRCA|folder:REGIONS'` (BRCA-M2C
    train + val tiles and unlabelled slide regions; never the test tiles) with `--config.data.region_mpp` the
    regions' µm/px. Ablations: `--config.loss.w_nu=0` (DINO), `--config.loss.w_image=0` (NuLo),
    `--config.data.mpp_range='(0.5, 0.5)'` (fixed mpp).

Launch (one host; any number of local devices):

  python -m muse_jax.main --config configs/pretrain.py:tiny --workdir runs/tiny
  python -m muse_jax.main --config configs/pretrain.py:vit_s16 --workdir gs://BUCKET/muse/vit_s16 \
      --config.data.data_dir=gs://BUCKET/data --config.batch_size=1024
  # ablations are configs, not code edits:
  python -m muse_jax.main --config configs/pretrain.py:vit_s16 --workdir runs/img_only --config.loss.w_nu=0
  python -m muse_jax.main --config configs/pretrain.py:vit_s16 --workdir runs/nulo_only --config.loss.w_image=0

Restarting the same command on the same workdir resumes from the latest checkpoint. Multi-host (TPU pod slice,
multi-node GPU): run the same command on every host with `--multihost` (see WORKSPACE.md). Export the teacher
backbone with `python -m muse_jax.export --workdir DIR --out DIR/export`.

Every hyper-parameter is a field; ConfigDicts are type-safe, so `--config.batch_size=abc` fails at start.
"""
from __future__ import annotations

import ml_collections

from configs import models as models_cfg
from muse_jax.data import pipeline
from muse_jax.pretrain import health

VARIANTS = ("tiny", "vit_s16", "vit_b16", "r50", "lfov_vit_b16", "study", "small", "small_sk")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the pretraining config of `variant` (one of `VARIANTS`)."""
  if variant not in VARIANTS:
    raise ValueError(f"configs/pretrain.py: unknown variant {variant!r}; expected one of {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  model_variant = {"tiny": "tiny", "vit_s16": "vit_s16", "vit_b16": "vit_b16", "r50": "r50",
                   "lfov_vit_b16": "vit_b16", "study": "tiny", "small": "tiny_p8",
                   "small_sk": "tiny_p8"}[variant]
  c.model = models_cfg.get_config(model_variant)
  c.drop_path_rate = 0.0 if variant == "r50" else 0.1  # student only; the teacher always uses 0

  # Data. data_source: 'pipeline' (muse_jax.data.pipeline over config.data; config.data.source says which records:
  # 'bundled', 'brca:PATH', 'tfds:[NAME@]DATA_DIR', 'folder:PATH') or 'synthetic' (random images and nuclei).
  c.data_source = "pipeline"
  c.data = pipeline.default_data_config("lfov" if variant.startswith("lfov") else "default")
  # Where the regions come from. Only `tiny` (the test / smoke config) names the bundled 11-tile sample; every other
  # variant starts unset, so a run that forgets `--config.data.source` stops at start naming the field instead of
  # pretraining on the sample (issue #19).
  c.data.source = "bundled" if variant == "tiny" else ""
  # The accelerator recipes resize and augment their views in the jitted step (the host only crops and packs, so
  # a few cores feed a chip: experiments/BENCHMARKS.md, bench_data); the CPU-scale recipes keep it on the host.
  c.data.augment_on = "device" if variant in ("vit_s16", "vit_b16", "r50", "lfov_vit_b16") else "host"
  c.synthetic_region_nuclei = 32  # nuclei per synthetic region (data_source='synthetic' only)
  c.batch_size = 512  # GLOBAL batch (regions per step); must be a multiple of the device count

  # Length. steps_per_epoch = -1: len(dataset) // batch_size. total_steps = -1: num_epochs * steps_per_epoch.
  c.num_epochs = 100
  c.steps_per_epoch = -1
  c.total_steps = -1

  # Heads (spec §2.7; DINOHead: in -> hidden -> hidden -> bottleneck, L2-norm, weight-normed last layer -> K).
  c.heads = ml_collections.ConfigDict()
  c.heads.cls_out_dim = 65536
  c.heads.nu_out_dim = 8192
  c.heads.hidden_dim = 2048
  c.heads.bottleneck_dim = 256
  c.heads.num_layers = 3
  c.heads.norm_last_layer = True
  c.heads.last_layer_name = "last_layer"  # the module name frozen during the first epoch(s)

  # Loss = w_image * L_image + w_nu * L_nu; a 0 weight removes that head and skips its computation.
  c.loss = ml_collections.ConfigDict()
  c.loss.w_image = 1.0
  c.loss.w_nu = 1.0
  # Teacher targets per head: 'center' (DINO's centred, sharpened softmax; the paper's) or 'sinkhorn' (Sinkhorn-Knopp
  # over the global batch as in SwAV / DINOv2: every prototype gets equal mass, which prevents the partial collapse
  # onto a few prototypes that centering allows on small batches). Inferred: the spec does not name them.
  c.loss.image_targets = "center"
  c.loss.nu_targets = "center"
  c.loss.sinkhorn_iters = 3
  # KoLeo regulariser (DINOv2) on the student's nucleus features of the global views; 0 = off (the paper's).
  c.loss.w_koleo_nu = 0.0

  # Optimisation (spec §3.7, DINO defaults).
  o = c.optim = ml_collections.ConfigDict()
  o.base_lr = 5e-4  # peak lr = base_lr * batch_size / 256 when scale_lr
  o.scale_lr = True
  o.min_lr = 1e-6
  o.warmup_epochs = 10.0
  o.weight_decay = 0.04
  o.weight_decay_end = 0.4
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.clip_grad = 3.0  # global-norm clipping; 0 disables
  o.freeze_last_layer_epochs = 1.0
  o.momentum_teacher = 0.996
  o.momentum_teacher_end = 1.0
  # Run-length-aware schedules (optim.schedule_steps): a fraction >= 0 replaces the epoch-based field beside it, and
  # teacher_half_life_frac > 0 sets the starting teacher momentum from a half-life of that fraction of the run
  # (m = 0.5 ** (1 / (frac * total_steps))), so that a short run's teacher moves. -1 / 0 = DINO's epoch-based values.
  # For scale: DINO's 0.996 is a half-life of 173 steps, 0.14% of a 125k-step run but 35% of a 500-step run.
  o.warmup_frac = -1.0
  o.warmup_teacher_temp_frac = -1.0
  o.freeze_last_layer_frac = -1.0
  o.teacher_half_life_frac = 0.0
  o.warmup_teacher_temp = 0.04
  o.teacher_temp = 0.07
  o.warmup_teacher_temp_epochs = 30.0
  o.student_temp = 0.1
  o.center_momentum = 0.9

  # Parallelism: mesh ('data', 'fsdp'); data=-1 takes all devices left after fsdp.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.fsdp_min_size = 2**14  # leaves with fewer elements stay replicated

  # Run health (muse_jax.pretrain.health): thresholds of the collapse detector, checked at every log record.
  c.health = health.default_config()

  # Checkpoints / logging.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.log_every_steps = 50
  c.progress_bar = True

  if variant in ("tiny", "study", "small", "small_sk"):
    c.data.n_global, c.data.global_size = 2, 64
    c.data.n_local, c.data.local_size = 2, 32
    c.data.max_nuclei_global, c.data.max_nuclei_local = 32, 16
    c.data.mpp_range = (1.0, 2.0)  # small views must still cover tens of nuclei (64 px = 64-128 µm)
    c.batch_size = 8
    c.num_epochs = 10
    c.steps_per_epoch = 10
    c.heads.cls_out_dim = 256
    c.heads.nu_out_dim = 128
    c.heads.hidden_dim = 128
    c.heads.bottleneck_dim = 32
    # Small-scale DINO collapses to the uniform distribution (losses pinned at log K, vanishing gradients) with
    # larger learning rates (2e-3 and 5e-4 both collapsed on the bundled sample within ~50 steps); 5e-5 with a
    # fixed sharp teacher (0.04) did not.
    c.optim.base_lr = 5e-5
    c.optim.scale_lr = False
    c.optim.warmup_epochs = 1.0
    c.optim.warmup_teacher_temp = 0.04
    c.optim.teacher_temp = 0.04
    c.optim.warmup_teacher_temp_epochs = 2.0
    c.optim.momentum_teacher = 0.996
    c.checkpoint_every_steps = 50
    c.log_every_steps = 5
  if variant == "study":
    # Sized from a timing run on the shared 2 cores (experiments/RESULTS.md, "Reproduction study").
    c.data.source = ""  # unset: the study passes 'brca:PATH|folder:REGIONS'
    c.data.n_global, c.data.global_size = 2, 96
    c.data.n_local, c.data.local_size = 4, 48
    c.data.max_nuclei_global, c.data.max_nuclei_local = 64, 32
    c.data.mpp_range = (0.5, 1.0)  # BRCA-M2C is 0.5 µm/px: finer would only upsample
    c.data.read_threads = 2
    c.num_epochs = 10
    c.steps_per_epoch = 40  # 400 steps: ~5 steps/s after ~35 s of start-up and compilation on 2 idle cores
    c.checkpoint_every_steps = 100
    c.log_every_steps = 10
    c.progress_bar = False
  elif variant in ("small", "small_sk"):
    # The CPU-scale recipe that learns (issue #21; evidence in experiments/RESULTS.md, "CPU-scale recipe"): a
    # model that resolves single nuclei (8 px patches: a token is 4 µm at 0.5 µm/px), views at the evaluation's
    # scale, overlapping views so NuLo sees tens of shared nuclei, H&E stain jitter instead of DINO's RGB jitter /
    # grayscale / solarisation, blur in µm, and schedules that follow the run's length.
    c.data.source = ""  # unset: pass 'brca:PATH' or 'brca:PATH|folder:REGIONS' (train + val; never test)
    c.data.n_global, c.data.global_size = 2, 96
    c.data.n_local, c.data.local_size = 4, 64
    c.data.max_nuclei_global, c.data.max_nuclei_local = 64, 32
    c.data.mpp_range = (0.4, 0.7)  # 96 px = 38-67 µm; the evaluation runs at 0.5
    c.data.global_in_global = True
    c.data.color_aug = "hed"
    c.data.stain_jitter = 0.1
    c.data.grayscale_p = 0.0
    c.data.solarize_p = 0.0
    c.data.blur_sigma_um = (0.05, 0.5)
    c.data.read_threads = 2
    c.batch_size = 16
    c.num_epochs = 1
    c.steps_per_epoch = 400
    c.total_steps = 400
    c.optim.base_lr = 5e-4
    c.optim.warmup_frac = 0.1
    c.optim.warmup_teacher_temp_frac = 0.0
    c.optim.freeze_last_layer_frac = 0.02
    c.optim.teacher_half_life_frac = 0.05  # 20 steps of 400: momentum 0.966 -> 1
    c.checkpoint_every_steps = 100
    c.log_every_steps = 10
    c.progress_bar = False
    if variant == "small_sk":
      # The best CPU-scale recipe measured so far (experiments/RESULTS.md, "Sinkhorn-Knopp targets"): NuLo only
      # (the image loss competes with it in a 64-wide backbone), Sinkhorn-Knopp nucleus targets (93-95 of 128
      # prototypes in use instead of 6) and 1,500 steps, which with Sinkhorn targets keep improving (centering
      # plateaus after ~400). ~22-30 min on 2 cores. kNN macro-F1 48.2 +- 2.9 vs random init 38.4 (3 seeds).
      c.loss.w_image = 0.0
      c.loss.nu_targets = "sinkhorn"
      c.loss.image_targets = "sinkhorn"  # used only when the image loss is on (the study's DINO / MUSE rows)
      c.num_epochs = 1
      c.steps_per_epoch = 1500
      c.total_steps = 1500
      c.checkpoint_every_steps = 250
  elif variant == "lfov_vit_b16":
    c.data.n_global, c.data.global_size = 2, 512
    c.data.n_local = 4
    c.batch_size = 256
  return c
