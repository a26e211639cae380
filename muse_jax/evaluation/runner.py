"""Evaluation driver: backbone source + labelled dataset -> kNN / linear / fine-tune results and reports.

`run(config, workdir)` evaluates one backbone at one (mpp, size) setting, or, with `config.all`, the grid
mpp {0.5, 0.25} x size {224, 512} x protocols, and writes to `workdir`:

  results.json            every setting and protocol: accuracies, macro-F1, per-class F1, confusion matrices,
                          kNN accuracy per k (test and val), linear per-epoch curves, all settings used
  results.md              the tables in the layout of the published tables (spec §6) + a details table
  confusion_<setting>_<protocol>.png

Protocol settings default to the spec (§5.3-§5.5); anything changed (e.g. fewer linear epochs) is recorded in
the JSON and printed under the table. `run` first checks every config field (`validate_config`: types, mpp in
`EVAL_MPP_RANGE`, sizes, epochs, batch sizes, k, rates, the backbone source and the data folder) and raises
`cli.UserError` naming the field before any work starts.
"""
from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from muse_jax import cli
from muse_jax.cli import UserError
from muse_jax.evaluation import features as features_lib
from muse_jax.evaluation import finetune as finetune_lib
from muse_jax.evaluation import knn as knn_lib
from muse_jax.evaluation import linear as linear_lib
from muse_jax.evaluation import report

PROTOCOLS = ("knn", "linear", "finetune")
SPLITS = ("train", "val", "test")
GRID_MPPS = (0.5, 0.25)
GRID_SIZES = (224, 512)
EVAL_MPP_RANGE = (0.0625, 4.0)
"""Target resolutions accepted, µm/px: BRCA-M2C's 0.5 µm/px tiles resampled at most 8x either way."""
SIZE_MULTIPLE = 32  # image sides a multiple of every backbone's stride (ViT patch 8 / 16, ResNet-50 output stride 32)
MAX_SIZE = 2048


def default_config() -> ml_collections.ConfigDict:
  """The evaluation config; defaults follow spec §5.2-§5.5."""
  c = ml_collections.ConfigDict()
  c.backbone = "random:tiny"   # backbone directory or random:<variant>
  c.backbone_seed = 0          # seed of a random:<variant> initialisation
  c.method = ""                # row label in the tables (default: derived from the backbone source)
  c.dataset = "brca_m2c"
  c.data_dir = "bundled"       # 'bundled' = the sample inside the package
  c.protocols = "knn,linear"
  c.mpp = 0.5
  c.size = 224
  c.valid = 224
  c.pad_mode = "reflect"
  c.all = False                # the grid GRID_MPPS x GRID_SIZES
  c.batch_size = 10            # tiles per feature-extraction call (§5.2)
  c.seed = linear_lib.SEED
  c.knn_ks = knn_lib.KS
  c.knn_temperature = knn_lib.TEMPERATURE
  c.linear_epochs = 100
  c.linear_lr = 0.01
  c.linear_batch_size = 256
  c.finetune_epochs = 10
  c.finetune_lr = 0.0          # 0 = 1e-5 for ViTs, 4e-5 for R50
  c.finetune_batch_size = 32
  c.progress = True
  return c


def _int(value: Any, where: str, *, allow_zero: bool = False) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise UserError("not an integer", where, f"got {value!r}")
  return cli.positive_int(value, where, allow_zero=allow_zero)


def validate_config(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
                    check_backbone: bool = True) -> None:
  """Checks every field of an evaluation config (types, ranges, paths) before any work starts.

  Raises:
    UserError naming the field as its `evaluate` flag (`--mpp`, ...) or `config.<field>` when it has none.
  """
  parse_protocols(config.protocols)
  class_names_for(config.dataset)
  if not isinstance(config.backbone, str) or not config.backbone:
    raise UserError("not a backbone source", "--backbone", f"got {config.backbone!r}")
  if check_backbone:
    _check_backbone_source(config.backbone)
  _int(config.backbone_seed, "--backbone_seed", allow_zero=True)
  _int(config.seed, "--seed", allow_zero=True)
  if not isinstance(config.method, str):
    raise UserError("not a string", "--method", f"got {config.method!r}")
  if not config.all:
    mpp = cli.mpp(config.mpp, "--mpp")
    if not EVAL_MPP_RANGE[0] <= mpp <= EVAL_MPP_RANGE[1]:
      raise UserError(f"must be in [{EVAL_MPP_RANGE[0]:g}, {EVAL_MPP_RANGE[1]:g}] µm/px", "--mpp",
                      f"got {mpp:g} µm/px (the 0.5 µm/px tiles are resampled at most 8x)")
  valid = _int(config.valid, "config.valid")
  sizes = GRID_SIZES if config.all else (config.size,)
  for size in sizes:
    size = _int(size, "--size")
    if size < valid or size > MAX_SIZE or size % SIZE_MULTIPLE:
      raise UserError(f"must be a multiple of {SIZE_MULTIPLE} in [{valid}, {MAX_SIZE}] px", "--size",
                      f"got {size} (the valid window is {valid} px)")
  if config.pad_mode not in ("reflect", "constant"):
    raise UserError("not a pad mode", "--pad_mode", f"got {config.pad_mode!r}, expected reflect or constant")
  for key, flag in (("batch_size", "--batch_size"), ("linear_epochs", "--linear_epochs"),
                    ("linear_batch_size", "config.linear_batch_size"), ("finetune_epochs", "--finetune_epochs"),
                    ("finetune_batch_size", "config.finetune_batch_size")):
    _int(config[key], flag)
  cli.positive(config.linear_lr, "config.linear_lr", upper=10.0)
  cli.positive(config.finetune_lr, "--finetune_lr", allow_zero=True, upper=1.0)
  cli.positive(config.knn_temperature, "config.knn_temperature", upper=100.0)
  ks = config.knn_ks
  if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks:
    raise UserError("not a non-empty list of integers", "config.knn_ks", f"got {ks!r}")
  for k in ks:
    _int(k, "config.knn_ks")
  for key in ("all", "progress"):
    if not isinstance(config[key], bool):
      raise UserError("not true or false", f"config.{key}", f"got {config[key]!r}")
  _check_data_dir(config.dataset, config.data_dir)
  if workdir is not None and pathlib.Path(workdir).exists() and not pathlib.Path(workdir).is_dir():
    raise UserError("not a folder", "--out", f"{workdir} is a file")


def _check_backbone_source(source: str) -> None:
  """`random:<known variant>`, `raw:<px>` or an existing directory; UserError otherwise."""
  try:
    if features_lib.parse_raw_source(source) is not None:
      return
  except ValueError as e:
    raise UserError("bad raw-pixel source", "--backbone", str(e)) from None
  if source.startswith("random:"):
    from configs import models as model_configs  # pylint: disable=import-outside-toplevel

    if source[len("random:"):] not in model_configs.VARIANTS:
      raise UserError("unknown model variant", "--backbone", f"got {source!r}, expected random:<one of "
                      f"{', '.join(model_configs.VARIANTS)}>")
    return
  if "://" in source:  # a cloud path: checked when it is opened
    return
  p = pathlib.Path(source)
  if not p.exists():
    raise UserError("no such backbone directory", "--backbone",
                    f"{source} (expected a backbone directory, random:<variant> or raw:<px>)")
  if not p.is_dir():
    raise UserError("not a backbone directory", "--backbone", f"{source} is a file")


def _check_data_dir(dataset: str, data_dir: Any) -> None:
  """'bundled', a raw folder of `dataset`, or a TFDS data dir holding `<dataset>/` records; UserError otherwise."""
  if data_dir is None or str(data_dir) == "bundled":
    return
  p = pathlib.Path(str(data_dir))
  if not p.is_dir():
    raise UserError("no such folder" if not p.exists() else "not a folder", "--data_dir", str(p))
  if not ((p / "brca_ds_train.txt").exists() or (p / dataset).is_dir()):
    raise UserError(f"neither a {dataset} folder nor prepared records", "--data_dir",
                    f"{p} has no brca_ds_train.txt and no {dataset}/ (python -m muse_jax.data.prepare --out DIR)")


def class_names_for(dataset: str) -> list[str]:
  """The class map of a dataset, by id."""
  from muse_jax.data import readers  # pylint: disable=import-outside-toplevel

  if dataset == "brca_m2c":
    return list(readers.BRCA_CLASSES)
  raise UserError("no class map known", "--dataset", f"got {dataset!r}, expected 'brca_m2c'")


def method_label(source: str, model_cfg: ml_collections.ConfigDict) -> str:
  """A readable row label: `random init (vit_s16)` or `<dir name> (<model name>)`."""
  name = model_cfg.get("name", model_cfg.arch)
  if model_cfg.get("arch") == "raw":
    return f"Raw pixels ({model_cfg.patch_size} px patch)"
  if str(source).startswith("random:"):
    return f"Random init ({name})"
  return f"{pathlib.Path(str(source)).name} ({name})"


def parse_protocols(protocols: str | Sequence[str]) -> list[str]:
  """'knn,linear' -> ['knn', 'linear'] in canonical order; ValueError for unknown names."""
  items = [p.strip() for p in (protocols.split(",") if isinstance(protocols, str) else protocols) if p.strip()]
  bad = [p for p in items if p not in PROTOCOLS]
  if bad or not items:
    raise UserError("not a non-empty subset of knn, linear, finetune", "--protocols", f"protocols {items!r}")
  return [p for p in PROTOCOLS if p in items]


def load_backbone(source: str | tuple, seed: int = 0) -> tuple[ml_collections.ConfigDict, dict]:
  """`(model_cfg, variables)` from a source string (`backbone_io.load_backbone`) or an already loaded tuple."""
  if isinstance(source, tuple):
    return source
  patch = features_lib.parse_raw_source(source)
  if patch is not None:
    return features_lib.raw_model_config(patch), {}
  from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

  return backbone_io.load_backbone(source, seed=seed)


class _Bar:
  """A tqdm bar when `enabled`, else a no-op."""

  def __init__(self, enabled: bool, total: int, desc: str, unit: str = "tile"):
    self.bar = None
    if enabled:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel

      self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

  def __call__(self, n: int) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def load_tiles(dataset: str, data_dir: str, *, mpp: float, size: int, valid: int = 224,
               pad_mode: str = "reflect", _cache: dict | None = None) -> dict[str, list[dict]]:
  """Evaluation tiles of the three splits; ValueError when a split has none."""
  from muse_jax.data import eval_tiles, load_labelled  # pylint: disable=import-outside-toplevel

  out = {}
  for split in SPLITS:
    key = (dataset, str(data_dir), split)
    if _cache is not None and key in _cache:
      samples = _cache[key]
    else:
      samples = load_labelled(dataset, data_dir, split)
      if _cache is not None:
        _cache[key] = samples
    if not samples:
      raise UserError(f"split {split!r} is empty (no samples)", "--data_dir", f"dataset {dataset!r} at {data_dir}")
    tiles = eval_tiles.make_eval_tiles(samples, target_mpp=mpp, size=size, valid=valid, pad_mode=pad_mode)
    if not tiles:
      raise UserError(f"split {split!r} has no labelled nuclei at mpp {mpp} (empty split)", "--data_dir",
                      f"dataset {dataset!r} at {data_dir}")
    out[split] = tiles
  return out


def evaluate_setting(model_cfg: ml_collections.ConfigDict, variables: dict, tiles: dict[str, list[dict]],
                     protocols: Sequence[str], config: ml_collections.ConfigDict,
                     class_names: Sequence[str]) -> dict[str, Any]:
  """Runs the protocols for one (mpp, size) setting on prepared tiles.

  Returns:
    {'counts': 'train/val/test' nuclei, 'timing_s': {...}, 'knn'|'linear'|'finetune': protocol result}.
    Fine-tuning runs the linear probe first (its head is the initialisation) even when not requested.
  """
  num_classes = len(class_names)
  size = tiles["train"][0]["image"].shape[0]
  timing = {}
  t0 = time.perf_counter()
  if model_cfg.get("arch") == "raw":
    if "finetune" in protocols:
      raise UserError("the raw-pixel baseline has no network to fine-tune", "--protocols",
                      "use --protocols knn,linear")
    fn = features_lib.RawPatchFeatureFn(model_cfg.patch_size)
  else:
    fn = features_lib.make_feature_fn(model_cfg, variables, image_size=size)
  n_pad = features_lib.pad_size([t for s in SPLITS for t in tiles[s]])
  feats = {}
  bar = _Bar(config.progress, sum(len(tiles[s]) for s in SPLITS), f"features {size}px")
  for split in SPLITS:
    feats[split] = features_lib.extract_features(tiles[split], fn, num_classes=num_classes,
                                                 batch_size=config.batch_size, n_pad=n_pad, split=split,
                                                 progress=bar)
  bar.close()
  timing["features"] = time.perf_counter() - t0
  out: dict[str, Any] = {"counts": "/".join(str(len(feats[s]["labels"])) for s in SPLITS),
                         "feature_dim": int(feats["train"]["features"].shape[1])}
  xy = {s: (feats[s]["features"], feats[s]["labels"]) for s in SPLITS}
  if "knn" in protocols:
    t0 = time.perf_counter()
    out["knn"] = knn_lib.knn_eval(*xy["train"], *xy["test"], num_classes, *xy["val"], ks=tuple(config.knn_ks),
                                  temperature=config.knn_temperature, class_names=list(class_names))
    timing["knn"] = time.perf_counter() - t0
  if "linear" in protocols or "finetune" in protocols:
    t0 = time.perf_counter()
    out["linear"] = linear_lib.linear_probe(*xy["train"], *xy["val"], *xy["test"], num_classes,
                                            epochs=config.linear_epochs, lr=config.linear_lr,
                                            batch_size=config.linear_batch_size, seed=config.seed,
                                            class_names=list(class_names))
    timing["linear"] = time.perf_counter() - t0
  if "finetune" in protocols:
    t0 = time.perf_counter()
    steps = config.finetune_epochs * -(-len(tiles["train"]) // config.finetune_batch_size)
    bar = _Bar(config.progress, steps, f"finetune {size}px", unit="step")
    out["finetune"] = finetune_lib.finetune(
        model_cfg, variables, out["linear"]["head"], tiles["train"], tiles["val"], tiles["test"],
        num_classes=num_classes, epochs=config.finetune_epochs, lr=config.finetune_lr or None,
        batch_size=config.finetune_batch_size, seed=config.seed, eval_batch_size=config.batch_size,
        class_names=list(class_names), progress=bar)
    bar.close()
    timing["finetune"] = time.perf_counter() - t0
  out["timing_s"] = timing
  return out


def _deviations(config: ml_collections.ConfigDict) -> list[str]:
  d = default_config()
  notes = []
  for key, what in (("linear_epochs", "linear-probe epochs"), ("linear_lr", "linear-probe lr"),
                    ("linear_batch_size", "linear-probe batch"), ("finetune_epochs", "fine-tuning epochs"),
                    ("finetune_batch_size", "fine-tuning batch"), ("knn_temperature", "kNN temperature")):
    if config[key] != d[key]:
      notes.append(f"{what} = {config[key]} (spec: {d[key]})")
  if tuple(config.knn_ks) != tuple(d.knn_ks):
    notes.append(f"kNN k set = {tuple(config.knn_ks)} (spec: {tuple(d.knn_ks)})")
  if config.finetune_lr:
    notes.append(f"fine-tuning lr = {config.finetune_lr} (spec: 1e-5 ViT / 4e-5 R50)")
  return notes


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
        backbone: tuple | None = None) -> dict[str, Any]:
  """Evaluates one backbone and writes `results.json`, `results.md` and confusion PNGs to `workdir`.

  Args:
    config: see `default_config`.
    workdir: output folder (created); None writes nothing.
    backbone: optional already loaded `(model_cfg, variables)` (then `config.backbone` only labels it).

  Returns:
    {'rows': [...], 'markdown': str, 'config': dict, 'notes': [...]} (rows as in `report`).
  """
  validate_config(config, workdir, check_backbone=backbone is None)
  protocols = parse_protocols(config.protocols)
  if "finetune" in protocols and features_lib.parse_raw_source(config.backbone) is not None and backbone is None:
    raise UserError("the raw-pixel baseline has no network to fine-tune", "--protocols", "use --protocols knn,linear")
  class_names = class_names_for(config.dataset)
  model_cfg, variables = load_backbone(backbone or config.backbone, config.backbone_seed)
  method = config.method or method_label(config.backbone, model_cfg)
  settings = ([(m, s) for m in GRID_MPPS for s in GRID_SIZES] if config.all
              else [(float(config.mpp), int(config.size))])
  cache: dict = {}
  rows = []
  for mpp, size in settings:
    tiles = load_tiles(config.dataset, config.data_dir, mpp=mpp, size=size, valid=config.valid,
                       pad_mode=config.pad_mode, _cache=cache)
    upsampled = any(t.get("resampled") == "up" for t in tiles["train"])
    padded = sum("pad" in t.get("context", "") for s in SPLITS for t in tiles[s])
    res = evaluate_setting(model_cfg, variables, tiles, protocols, config, class_names)
    for proto in protocols:
      rows.append({"method": method, "backbone": str(config.backbone), "dataset": config.dataset,
                   "mpp": mpp, "upsampled": upsampled, "size": size, "valid": config.valid,
                   "protocol": proto, "counts": res["counts"], "feature_dim": res["feature_dim"],
                   "tiles": "/".join(str(len(tiles[s])) for s in SPLITS), "padded_context_tiles": padded,
                   "timing_s": res["timing_s"], "result": res[proto]})
  notes = [f"Conditions: backbone `{config.backbone}` ({model_cfg.get('name', model_cfg.arch)}), dataset "
           f"`{config.dataset}` at `{config.data_dir}`, valid window {config.valid} px, context beyond the tile "
           f"filled by `{config.pad_mode}` padding (substitute for slide context), seed {config.seed}."]
  notes += [f"Deviation from the spec: {n}." for n in _deviations(config)]
  markdown = report.markdown_tables(rows, notes)
  out = {"rows": rows, "markdown": markdown, "config": config.to_dict(), "notes": notes}
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report.write_json(workdir / "results.json", {"config": config.to_dict(), "notes": notes, "rows": rows})
    (workdir / "results.md").write_text(markdown)
    for r in rows:
      res = r["result"]
      m = res["official"]["metrics"] if r["protocol"] == "knn" else res["metrics"]
      tag = f"mpp{r['mpp']}_size{r['size']}_{r['protocol']}"
      report.plot_confusion(m["confusion_matrix"], m["class_names"], workdir / f"confusion_{tag}.png",
                            title=f"{method} {report.column_label(r)} {r['protocol']} "
                                  f"acc {100 * m['accuracy']:.1f}%")
  return out
