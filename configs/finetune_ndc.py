"""NDC fine-tuning (point head + large-FoV semi-supervised training, MUSE_SPEC §4).

Launch:
  python -m muse_jax.finetune --config configs/finetune_ndc.py:vit_s16 --init runs/pretrain/export \
      --workdir runs/ndc_vit_s16 --config.data.dir=/path/to/BRCA-M2C

VARIANT is a backbone variant (`tiny`, `vit_s16`, `vit_b16`, `r50`), optionally followed by comma-separated
ablations:
  no_semi    no EMA teacher / consistency loss (supervised only)
  no_strong  consistency without the strong photometric augmentation (student sees the weak view)
  no_lfov    field = labelled tile (no context, no padding beyond what the window needs)
  white_pad  constant white padding instead of reflect padding (context control)
  stride8    proposals on a stride-8 grid instead of stride 4
e.g. `configs/finetune_ndc.py:vit_s16,no_semi`. Any field can be overridden: `--config.train.steps=2000`.
`--init` is `random:<variant>` (default), a backbone directory from pretraining export or torch import.
"""

from __future__ import annotations

import ml_collections

BACKBONES = ("tiny", "vit_s16", "vit_b16", "r50", "tiny_r50")
ABLATIONS = ("no_semi", "no_strong", "no_lfov", "white_pad", "stride8")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the fine-tuning config for `VARIANT[,ablation...]`."""
  parts = [p.strip() for p in str(arg).split(",") if p.strip()]
  variant, ablations = (parts[0] if parts else "tiny"), parts[1:]
  if variant not in BACKBONES:
    raise ValueError(f"finetune_ndc variant: got {variant!r}, expected one of {BACKBONES}")
  bad = [a for a in ablations if a not in ABLATIONS]
  if bad:
    raise ValueError(f"finetune_ndc ablations: got {bad}, expected some of {ABLATIONS}")
  tiny = variant in ("tiny", "tiny_r50")

  c = ml_collections.ConfigDict()
  c.variant = variant
  c.ablations = ",".join(ablations)
  c.init = f"random:{variant}"
  c.seed = 0
  c.num_devices = 0  # 0: every device that divides the batch (data parallel)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "brca_m2c"
  c.data.dir = ml_collections.config_dict.placeholder(str)  # required: a folder, a TFDS data dir or "bundled"
  c.data.train_split = "train"
  c.data.val_split = "val"
  c.data.class_names = ("lymphocyte", "tumor", "stromal")
  c.data.max_samples = 0  # > 0: only the first N samples of each split (smoke tests)
  c.data.mpp = 0.5  # the model's working resolution; tiles at another mpp are resampled
  # Real context around the tiles (muse_jax/ndc/context.py): a CSV manifest `name,context,x,y[,mpp]` giving each
  # tile's slide (or larger image) and its top-left there. None: context is padding (lfov.pad_mode).
  c.data.context = ml_collections.config_dict.placeholder(str)
  c.data.context_tolerance = 25.0  # max mean |RGB difference| between a tile and the context under it
  c.data.context_cache_mb = 2048.0  # in-memory cache of context crops

  c.lfov = ml_collections.ConfigDict()
  c.lfov.enabled = "no_lfov" not in ablations
  c.lfov.field = 256 if tiny else 1024
  # Labelled window cut from each tile; the rest of the field is unlabelled context (tile pixels, then padding).
  # None: the whole tile (clipped to the field). tiny: a 128 window in a 256 field, so the consistency loss has
  # unlabelled context to work on even though BRCA-M2C tiles (~491 px) are larger than the field.
  c.lfov.label_size = 128 if tiny else ml_collections.config_dict.placeholder(int)
  c.lfov.pad_mode = "constant" if "white_pad" in ablations else "reflect"
  c.lfov.flips = True
  c.lfov.center = False  # True: deterministic centred samples (overfitting checks), no random offset
  c.lfov.no_lfov_field = 256 if tiny else 512  # field when lfov is disabled (tile crops, no padding context)

  c.head = ml_collections.ConfigDict()
  c.head.stride = 8 if "stride8" in ablations else 4
  c.head.hidden_dim = 64 if tiny else 256
  c.head.num_layers = 2
  c.head.bg_prior = 0.9

  c.loss = ml_collections.ConfigDict()
  c.loss.cls = 1.0
  c.loss.reg = 1.0
  c.loss.cons = 1.0
  c.loss.bg_weight = 0.2
  c.loss.match_point_weight = 0.1  # per px
  c.loss.match_class_weight = 1.0
  c.loss.match_max_dist_um = 8.0

  c.semi = ml_collections.ConfigDict()
  c.semi.enabled = "no_semi" not in ablations
  c.semi.strong_aug = "no_strong" not in ablations
  c.semi.threshold = 0.9  # teacher max foreground probability for a foreground pseudo-label
  c.semi.bg_threshold = 0.9
  c.semi.start_step = 20 if tiny else 500  # consistency off until the teacher has learnt something
  c.semi.ema_momentum = 0.99 if tiny else 0.999

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3 if tiny else 1e-4
  c.optim.weight_decay = 0.05
  c.optim.warmup_steps = 10 if tiny else 200
  c.optim.clip_grad = 1.0
  # BN batch statistics + drop-path in the student? None: only for random init (pretrained: frozen running stats)
  c.optim.backbone_train_mode = ml_collections.config_dict.placeholder(bool)

  c.train = ml_collections.ConfigDict()
  c.train.steps = 200 if tiny else 4000
  c.train.batch_size = 4 if tiny else 8
  c.train.log_every = 10 if tiny else 50
  c.train.ckpt_every = 100 if tiny else 500
  c.train.keep = 2
  c.train.eval_every = 0  # 0: evaluate at the end only
  c.train.max_points = 0  # 0: from the data (largest nucleus count of a tile, rounded up to 64)
  c.train.export = "teacher" if not tiny else "student"  # which weights `export/` gets (teacher needs semi)
  c.train.progress = True

  c.infer = ml_collections.ConfigDict()
  c.infer.window = 256 if tiny else 512
  c.infer.overlap = 32 if tiny else 64
  c.infer.batch_size = 4 if tiny else 8
  c.infer.score_threshold = 0.5
  c.infer.nms_radius_um = 3.0
  c.infer.max_detections = 4096

  c.eval = ml_collections.ConfigDict()
  c.eval.modes = ("mcspatnet", "muse")
  c.eval.radius_um = 3.0
  c.eval.max_images = 0  # 0: all val images
  return c
