"""NDC inference: batched jit forward, score threshold, point NMS (radius in µm), sliding windows over large images.

`Predictor` is the object whole-slide inference uses:

    pred = Predictor.from_checkpoint("runs/ndc/export")      # or the fine-tuning workdir
    pred.class_names, pred.mpp, pred.window                 # what the model expects
    dets = pred.predict_tiles(tiles)    # tiles uint8 [B, window, window, 3] at pred.mpp
    # -> [{'points': [K,2] (x,y) tile px, 'classes': [K] int, 'scores': [K]}]  (thresholded, NMS per tile)
    det = pred.predict_image(image, mpp=0.5)                 # any size; sliding windows + seam de-duplication

Documented handling of awkward input:
- image smaller than the window: padded (reflect, or white if the image is tiny) to the window; points in the
  padding are dropped.
- nothing found: empty arrays (`points` [0, 2]), never an error.
- `mpp` of the image differs from the model's by more than `mpp_tolerance` (10 %): the image is resampled to the
  model's mpp and the points mapped back to the input's pixels (`rescale=False` raises instead); a non-positive,
  non-finite or implausible mpp (outside [0.05, 20] µm/px) raises `cli.UserError` (a `ValueError`).
- class names given by the caller that differ from the checkpoint's: `cli.UserError` naming both lists.
- a missing, cut-short or foreign checkpoint, or bad inference settings in it: `cli.UserError` naming the file or
  field (the CLIs print it as one line and exit 2).

Seams: windows overlap by `overlap` px. Each window keeps only the points in the part of the image it owns (the
overlaps are split at their middle), so no location is reported by two windows; a final image-level point NMS
(same radius) merges one nucleus seen at slightly different positions on the two sides of a boundary.

Checkpoint layout (written by `save_predictor`, read by `from_checkpoint`): `ndc_config.json` (model config, head
config, class names, mpp, inference defaults, and optionally `threshold`: the score threshold chosen on the
validation split with its source) and `variables/` (Orbax, `{'params', 'batch_stats'}` of `NDCModel`).

Score threshold: the one a `Predictor` uses comes, in this order, from the caller (`--score-threshold`), the
checkpoint's `threshold` (chosen on val), the checkpoint's inference defaults (`infer.score_threshold`, a config
value that nobody tuned), or 0.5; `Predictor.threshold_source` says which. A threshold chosen on val is attached to
an existing checkpoint with

    python -m muse_jax.predict --checkpoint CK --inputs VAL_IMAGES --mpp 0.5 --out val_pred --score-threshold 0.05
    python -m muse_jax.score --predictions val_pred --labels BRCA-M2C --split val --mpp 0.5 --sweep auto \\
        --json val_sweep.json
    python -m muse_jax.ndc.infer --checkpoint CK --threshold-from val_sweep.json   # or --score-threshold T

(`store_threshold`; `save_predictor(..., score_threshold=, threshold_source=)` does the same at export time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from scipy.spatial import cKDTree

from muse_jax import cli, ops
from muse_jax.ndc import head as head_lib

CONFIG_FILE = "ndc_config.json"
VARIABLES_DIR = "variables"
MPP_RANGE = (0.05, 20.0)
DEFAULT_SCORE_THRESHOLD = 0.5


def point_nms(points: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
  """Greedy point NMS: by descending score, keep a point and drop every other point within `radius` px.

  Returns:
    indices of the kept points, highest score first.
  """
  points = np.asarray(points, np.float64).reshape(-1, 2)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if len(points) == 0:
    return np.zeros(0, np.int64)
  order = np.argsort(-scores, kind="stable")
  if radius <= 0:
    return order
  tree = cKDTree(points)
  alive = np.ones(len(points), bool)
  keep = []
  for i in order:
    if not alive[i]:
      continue
    keep.append(i)
    alive[tree.query_ball_point(points[i], r=radius)] = False
  return np.asarray(keep, np.int64)


def window_starts(length: int, window: int, overlap: int) -> list[int]:
  """Start offsets of windows of size `window` covering [0, length) with at least `overlap` px overlap."""
  if length <= window:
    return [0]
  step = window - overlap
  if step <= 0:
    raise ValueError(f"overlap: got {overlap}, expected less than the window ({window})")
  starts = list(range(0, length - window, step)) + [length - window]
  return sorted(set(starts))


def ownership_bounds(starts: Sequence[int], window: int) -> list[tuple[float, float]]:
  """Half-open [lo, hi) range each window owns: neighbouring windows split their overlap at its middle."""
  bounds = []
  for i, s in enumerate(starts):
    lo = -math.inf if i == 0 else (starts[i - 1] + window + s) / 2.0
    hi = math.inf if i == len(starts) - 1 else (s + window + starts[i + 1]) / 2.0
    bounds.append((lo, hi))
  return bounds


def _empty() -> dict[str, np.ndarray]:
  return {"points": np.zeros((0, 2), np.float32), "classes": np.zeros(0, np.int32), "scores": np.zeros(0, np.float32)}


def check_mpp(mpp: Any, what: str = "mpp") -> float:
  """A plausible µm/px value, as float; else `cli.UserError` (a `ValueError`) naming `what`."""
  try:
    if isinstance(mpp, bool):
      raise TypeError
    v = float(mpp)
  except (TypeError, ValueError):
    raise cli.UserError("not a number of µm per pixel", what, f"got {mpp!r}") from None
  if not math.isfinite(v) or not MPP_RANGE[0] <= v <= MPP_RANGE[1]:
    raise cli.UserError(f"µm/px must be in [{MPP_RANGE[0]}, {MPP_RANGE[1]}]", what,
                        f"got {mpp!r} (0.25 is 40x, 0.5 is 20x)")
  return v


def check_score_threshold(value: Any, what: str = "score_threshold") -> float:
  """A score threshold in [0, 1], as float; else `cli.UserError` naming `what`."""
  return cli.in_range(value, what, 0.0, 1.0)


def _resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=import-outside-toplevel

  return np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC))


def save_predictor(path: str | os.PathLike, model_cfg: Any, head_cfg: Any, class_names: Sequence[str], mpp: float,
                   variables: dict[str, Any], infer_cfg: Any | None = None, extra: dict[str, Any] | None = None,
                   score_threshold: float | None = None, threshold_source: str | None = None) -> epath.Path:
  """Writes an NDC checkpoint directory (see the module docstring). Returns its path.

  `score_threshold` (optional): the threshold chosen on the validation split, used by default at inference
  (`threshold_source` says how it was chosen, e.g. "val sweep, best mcspatnet/f_det").
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  path = epath.Path(os.path.abspath(os.fspath(path)))
  main = jax.process_index() == 0  # multi-host: every process calls this (Orbax), process 0 owns the files
  var_dir = path / VARIABLES_DIR
  if main:
    path.mkdir(parents=True, exist_ok=True)
    if var_dir.exists():
      var_dir.rmtree()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

    multihost_utils.sync_global_devices("muse_jax.save_predictor")
  host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                      and not x.is_fully_addressable else np.asarray(jax.device_get(x)),
                      {k: v for k, v in dict(variables).items() if k in ("params", "batch_stats")})
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(var_dir, host)
  ckptr.wait_until_finished()
  to_dict = lambda c: c.to_dict() if isinstance(c, ml_collections.ConfigDict) else dict(c or {})  # noqa: E731
  cfg = {"model": to_dict(model_cfg), "head": to_dict(head_cfg), "class_names": list(class_names),
         "mpp": float(mpp), "infer": to_dict(infer_cfg), "extra": extra or {}}
  if score_threshold is not None:
    cfg["threshold"] = {"score_threshold": check_score_threshold(score_threshold),
                        "source": str(threshold_source or "given to save_predictor")}
  if main:
    _write_config(path, cfg)
  return path


def _write_config(path: epath.Path, cfg: dict[str, Any]) -> None:
  tmp = path / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
  os.replace(os.fspath(tmp), os.fspath(path / CONFIG_FILE))


def checkpoint_dir(path: str | os.PathLike) -> epath.Path:
  """The NDC checkpoint directory of `path` (itself, or its `export/`); `cli.UserError` if there is none."""
  p = epath.Path(os.path.abspath(os.fspath(path)))
  if not p.exists():
    raise cli.UserError("does not exist", os.fspath(path), "expected an NDC checkpoint directory (`export/` of "
                        "`python -m muse_jax.finetune`) or the fine-tuning workdir")
  if not p.is_dir():
    raise cli.UserError("is a file, not a directory", os.fspath(path), "expected an NDC checkpoint directory "
                        "(`export/` of `python -m muse_jax.finetune`) or the fine-tuning workdir")
  if not (p / CONFIG_FILE).exists() and (p / "export" / CONFIG_FILE).exists():
    p = p / "export"
  if not (p / CONFIG_FILE).exists():
    raise cli.UserError(f"not an NDC checkpoint (no {CONFIG_FILE})", os.fspath(path),
                        "expected the `export/` folder written by `python -m muse_jax.finetune` or the "
                        "fine-tuning workdir")
  return p


def read_checkpoint_config(path: str | os.PathLike) -> tuple[epath.Path, dict[str, Any]]:
  """`(checkpoint dir, parsed ndc_config.json)` without loading the weights; `cli.UserError` when unreadable."""
  p = checkpoint_dir(path)
  try:
    cfg = json.loads((p / CONFIG_FILE).read_text())
  except (OSError, ValueError) as e:
    raise cli.UserError("unreadable checkpoint config", os.fspath(p / CONFIG_FILE), f"{type(e).__name__}: {e}"
                        ) from None
  missing = [k for k in ("model", "head", "class_names", "mpp") if k not in cfg]
  if not isinstance(cfg, dict) or missing:
    raise cli.UserError("not an NDC checkpoint config", os.fspath(p / CONFIG_FILE), f"missing {missing}")
  if not (p / VARIABLES_DIR).is_dir():
    raise cli.UserError(f"checkpoint without {VARIABLES_DIR}/", os.fspath(p), "the export was cut short; export "
                        "again")
  return p, cfg


def store_threshold(path: str | os.PathLike, score_threshold: float | None, source: str) -> epath.Path:
  """Attaches a score threshold chosen on val to an existing NDC checkpoint (rewrites `ndc_config.json`).

  `score_threshold` None (no threshold found anything on val, see `choose_threshold`) stores nothing.
  """
  p, cfg = read_checkpoint_config(path)
  if score_threshold is None:
    return p
  cfg["threshold"] = {"score_threshold": check_score_threshold(score_threshold), "source": str(source)}
  _write_config(p, cfg)
  return p


def threshold_from_sweep(sweep_json: str | os.PathLike) -> tuple[float, str]:
  """`(best_threshold, source text)` of a `python -m muse_jax.score --sweep ... --json` file."""
  try:
    res = json.loads(epath.Path(sweep_json).read_text())
    t = res["best_threshold"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise cli.UserError("not a readable `python -m muse_jax.score --sweep ... --json` file", os.fspath(sweep_json),
                        f"{type(e).__name__}: {e}") from None
  t = check_score_threshold(t, f"{sweep_json}: best_threshold")
  n = len(res.get("thresholds") or [])
  return t, f"score --sweep {os.path.abspath(os.fspath(sweep_json))}: best by {res.get('select')} of {n} thresholds"


SWEEP_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05, 0.10, ..., 0.95 (`score --sweep auto`)


def choose_threshold(predictor: "Predictor", samples: Sequence[Any], mode: str, radius_um: float,
                     thresholds: Sequence[float] = SWEEP_THRESHOLDS) -> dict[str, Any]:
  """The score threshold maximising detection F1 on `samples` (the validation split), as `score --sweep` does.

  Predicts every sample once at the lowest threshold and filters the points for the others (the same points as
  predicting at each threshold: the point NMS is greedy by descending score, so lower scores never remove higher
  ones). Ties go to the lower threshold.

  Args:
    predictor: the model; its `score_threshold` is restored afterwards.
    samples: objects with `image` (uint8 [H, W, 3]), `mpp`, `coords` ([N, 2] (x, y) px) and `classes` ([N]).
    mode: a `muse_jax.ndc.metrics` matching mode (e.g. 'mcspatnet').
    radius_um: matching radius in µm.
    thresholds: candidates in [0, 1].

  Returns:
    `{'score_threshold', 'f_det', 'source'}` (`source`: how it was chosen, for `save_predictor`);
    `score_threshold` is None when no threshold gives a detection F1 above 0 (nothing to choose from).
  """
  from muse_jax.ndc import metrics as metrics_lib  # pylint: disable=import-outside-toplevel

  ts = sorted(check_score_threshold(t, "thresholds") for t in thresholds)
  old = predictor.score_threshold
  predictor.score_threshold = ts[0]
  try:
    preds = [predictor.predict_image(s.image, s.mpp) for s in samples]
  finally:
    predictor.score_threshold = old
  gts = [{"points": s.coords, "classes": s.classes} for s in samples]
  best_t, best_f = ts[0], -math.inf
  for t in ts:
    kept = [{k: v[p["scores"] >= t] for k, v in p.items()} for p in preds]
    f = metrics_lib.evaluate(kept, gts, mode=mode, class_names=predictor.class_names, mpp=[s.mpp for s in samples],
                             radius_um=radius_um)["detection"]["f1"]
    f = -math.inf if f is None else float(f)
    if f > best_f:
      best_t, best_f = t, f
  f_det = None if best_f == -math.inf else best_f
  if not f_det:
    return {"score_threshold": None, "f_det": f_det,
            "source": f"val sweep at the export: no threshold of {len(ts)} found a nucleus on {len(samples)} images"}
  return {"score_threshold": best_t, "f_det": f_det,
          "source": f"val sweep at the export: best {mode}/f_det"
                    f"{'' if f_det is None else f' = {f_det:.4f}'} over {len(ts)} thresholds on {len(samples)} images"}


def variables_sha256(variables: Any) -> str:
  """SHA-256 of a variables pytree by content (leaf paths, dtypes, shapes and bytes): the model's identity."""
  h = hashlib.sha256()
  for kp, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(kp)}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def build_forward(module: Any, num_classes: int, max_detections: int, mesh: jax.sharding.Mesh | None = None):
  """The jitted inference forward of `Predictor`: ONE builder for `Predictor` and `abstract_forward` (AOT tool).

  `forward(variables, tiles uint8 [B, S, S, 3]) -> (points f32 [B, K, 2], classes i32 [B, K], scores f32 [B, K])`,
  K = min(max_detections, proposals per tile), top-K by max foreground probability. With `mesh`, the tiles are
  split over its `data` axis and the variables replicated; without, plain `jax.jit` (one device).
  """
  C = int(num_classes)

  def forward(variables, tiles):
    out = module.apply(variables, ops.normalize_images(tiles), train=False)
    probs = jax.nn.softmax(out["logits"].astype(jnp.float32), -1)[..., :C]
    scores = jnp.max(probs, -1)
    k = min(int(max_detections), scores.shape[1])
    top, idx = jax.lax.top_k(scores, k)
    pts = jnp.take_along_axis(out["points"], idx[..., None], 1)
    cls = jnp.take_along_axis(jnp.argmax(probs, -1), idx, 1)
    return pts, cls.astype(jnp.int32), top

  if mesh is None:
    return jax.jit(forward)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return jax.jit(forward, in_shardings=(repl, data), out_shardings=data)


def abstract_forward(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> dict[str, Any]:
  """`Predictor`'s jitted forward on abstract sharded arguments (for `muse_jax.tools.aot`; nothing is loaded).

  `config` is a `configs/finetune_ndc.py` config: the model from `config.init`'s model config and `config.head`,
  tiles of `config.infer.window` px, `config.infer.batch_size` tiles per call split over a data mesh of
  `devices` (the fine-tuning mesh rule: as many devices as divide the batch), variables replicated.

  Returns:
    dict(jitted=, args=(variables, tiles), mesh=, global_batch=, images_per_sample=1, description=).
  """
  from muse_jax.ndc import train as train_lib  # pylint: disable=import-outside-toplevel

  C = len(config.data.class_names)
  B = int(config.infer.batch_size)
  S = int(config.infer.window)
  model_cfg, module, variables = train_lib.abstract_model(config, C)
  multiple = math.lcm(head_lib.input_multiple(model_cfg), int(config.head.stride))
  if S % multiple:
    raise ValueError(f"config.infer.window: got {S}, expected a multiple of {multiple}")
  mesh = train_lib.make_mesh(B, int(config.get("num_devices", 0)), devices)
  jitted = build_forward(module, C, int(config.infer.max_detections), mesh)
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  args = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), variables),
          jax.ShapeDtypeStruct((B, S, S, 3), jnp.uint8, sharding=data))
  desc = (f"predict {config.variant}: model {model_cfg.name}, {S}px tiles, top-{int(config.infer.max_detections)} "
          f"proposals per tile; data mesh {mesh.shape['data']} (variables replicated)")
  return {"jitted": jitted, "args": args, "mesh": mesh, "global_batch": B, "images_per_sample": 1,
          "description": desc}


class Predictor:
  """Batched, jit-compiled NDC inference for tiles and whole images (see the module docstring).

  Attributes:
    class_names: names of the classes, index = class id.
    mpp: µm/px the model works at.
    window: tile side (px) `predict_image` feeds the model; `predict_tiles` expects tiles of this side.
    overlap: sliding-window overlap in px.
    batch_size: tiles per jit call (the batch is padded to this size so one compile serves all calls).
    score_threshold: minimum max-foreground probability of a kept point.
    nms_radius_um: point-NMS radius in µm.
    max_detections: proposals kept per tile before NMS (top-k on device).

  `mesh` (optional, a 1-D `('data',)` mesh whose size divides `batch_size`): split each batch of tiles over its
  devices (variables replicated); default: one device.
  """

  def __init__(self, model_cfg: Any, head_cfg: Any, variables: dict[str, Any], class_names: Sequence[str],
               mpp: float, *, window: int = 256, overlap: int = 32, batch_size: int = 8,
               score_threshold: float = DEFAULT_SCORE_THRESHOLD, nms_radius_um: float = 3.0, max_detections: int = 4096,
               mpp_tolerance: float = 0.1, mesh: jax.sharding.Mesh | None = None):
    self.model_cfg = model_cfg
    self.head_cfg = head_cfg
    self.class_names = [str(c) for c in class_names]
    if not self.class_names:
      raise cli.UserError("no class names", "class_names")
    self.mpp = check_mpp(mpp, "checkpoint mpp")
    self.module = head_lib.build_model(model_cfg, head_cfg, len(self.class_names))
    self.multiple = math.lcm(head_lib.input_multiple(model_cfg), int(head_cfg.stride))
    window = cli.positive_int(window, "window")
    if window % self.multiple:
      raise cli.UserError(f"must be a multiple of {self.multiple} (the model's patch size and head stride)",
                          "window", f"got {window}")
    overlap = cli.positive_int(overlap, "overlap", allow_zero=True)
    if overlap >= window:
      raise cli.UserError(f"must be < the window ({window} px)", "overlap", f"got {overlap}")
    self.window, self.overlap, self.batch_size = window, overlap, cli.positive_int(batch_size, "batch_size")
    self.score_threshold = check_score_threshold(score_threshold)
    self.nms_radius_um = cli.positive(nms_radius_um, "nms_radius_um", allow_zero=True, upper=100.0, unit="µm")
    self.max_detections = cli.positive_int(max_detections, "max_detections")
    self.mpp_tolerance = cli.positive(mpp_tolerance, "mpp_tolerance", allow_zero=True, upper=1.0)
    self.threshold_source = "given to Predictor"
    self.checkpoint: str | None = None
    self.fingerprint: dict[str, Any] | None = None
    self.variables = jax.device_put({k: v for k, v in dict(variables).items() if k in ("params", "batch_stats")})
    self._forward = build_forward(self.module, len(self.class_names), self.max_detections, mesh)

  # ------------------------------------------------------------------------------------------------ loading
  @classmethod
  def from_checkpoint(cls, path: str | os.PathLike, **overrides: Any) -> "Predictor":
    """Loads an NDC checkpoint directory (or a fine-tuning workdir holding `export/`).

    Args:
      path: directory with `ndc_config.json` and `variables/`, or a workdir with `export/` in it.
      **overrides: constructor arguments (window, overlap, batch_size, score_threshold, nms_radius_um, ...).
    """
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    p, cfg = read_checkpoint_config(path)
    from muse_jax import backbone_io  # pylint: disable=import-outside-toplevel

    try:
      model_cfg = backbone_io.config_from_json(cfg["model"])
      head_cfg = ml_collections.ConfigDict(cfg["head"])
    except (KeyError, TypeError, ValueError) as e:
      raise cli.UserError("incompatible checkpoint config", os.fspath(p / CONFIG_FILE),
                          f"{type(e).__name__}: {e}") from None
    try:
      variables = ocp.StandardCheckpointer().restore(p / VARIABLES_DIR)
    except Exception as e:  # noqa: BLE001  (Orbax raises many types for a cut-short or foreign directory)
      raise cli.UserError("cannot read the checkpoint's weights", os.fspath(p / VARIABLES_DIR),
                          f"{type(e).__name__}: {e}") from None
    kwargs = {k: v for k, v in (cfg.get("infer") or {}).items()
              if k in ("window", "overlap", "batch_size", "score_threshold", "nms_radius_um", "max_detections")}
    chosen = cfg.get("threshold") or {}
    if "score_threshold" in overrides and overrides["score_threshold"] is not None:
      source = "--score-threshold"
    elif chosen.get("score_threshold") is not None:
      kwargs["score_threshold"] = chosen["score_threshold"]
      source = f"the checkpoint, chosen on val: {chosen.get('source', 'no source recorded')}"
    elif "score_threshold" in kwargs:
      source = "the checkpoint's inference default infer.score_threshold (not chosen on val)"
    else:
      source = "the built-in default (the checkpoint has none)"
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    pred = cls(model_cfg, head_cfg, dict(variables), cfg["class_names"], cfg["mpp"], **kwargs)
    pred.threshold_source = source
    pred.checkpoint = os.fspath(p)
    pred.fingerprint = {"variables_sha256": variables_sha256(variables), "class_names": pred.class_names,
                        "model_mpp": pred.mpp}
    return pred

  def check_class_names(self, class_names: Sequence[str] | None) -> None:
    """Raises ValueError if `class_names` (when given) differ from the checkpoint's."""
    if class_names is None:
      return
    names = [str(c) for c in class_names]
    if names != self.class_names:
      raise cli.UserError(f"class names {names} do not match the checkpoint's {self.class_names}", "--class-names",
                          "same names in the same order expected; fine-tune a new head for other classes")

  # ---------------------------------------------------------------------------------------------- inference
  def _raw_tiles(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = tiles.shape[0]
    bs = self.batch_size
    outs = []
    for i in range(0, n, bs):
      chunk = tiles[i:i + bs]
      if len(chunk) < bs:
        chunk = np.concatenate([chunk, np.zeros((bs - len(chunk),) + chunk.shape[1:], np.uint8)])
      outs.append(jax.device_get(self._forward(self.variables, jnp.asarray(chunk))))
    pts = np.concatenate([o[0] for o in outs])[:n]
    cls = np.concatenate([o[1] for o in outs])[:n]
    sc = np.concatenate([o[2] for o in outs])[:n]
    return pts, cls, sc

  def _postprocess(self, pts, cls, sc, radius_px: float) -> dict[str, np.ndarray]:
    keep = sc >= self.score_threshold
    pts, cls, sc = pts[keep], cls[keep], sc[keep]
    k = point_nms(pts, sc, radius_px)
    return {"points": pts[k].astype(np.float32), "classes": cls[k].astype(np.int32), "scores": sc[k].astype(np.float32)}

  def predict_tiles(self, tiles: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Detects nuclei in a batch of tiles at `self.mpp`.

    Args:
      tiles: uint8 [B, S, S, 3]; S a multiple of `self.multiple` (normally `self.window`; other sides compile
        again).

    Returns:
      per tile `{'points': float32 [K, 2] (x, y) tile px, 'classes': int32 [K], 'scores': float32 [K]}` after the
      score threshold and point NMS (K may be 0).
    """
    tiles = np.asarray(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != np.uint8:
      raise ValueError(f"tiles: got {tiles.dtype} {tiles.shape}, expected uint8 [B, S, S, 3]")
    if tiles.shape[1] != tiles.shape[2] or tiles.shape[1] % self.multiple:
      raise ValueError(f"tiles: got {tiles.shape[1]}x{tiles.shape[2]} px, expected square tiles with a side that is "
                       f"a multiple of {self.multiple} (the window is {self.window}); use predict_image for "
                       "other sizes")
    if tiles.shape[0] == 0:
      return []
    pts, cls, sc = self._raw_tiles(tiles)
    r = self.nms_radius_um / self.mpp
    return [self._postprocess(pts[i], cls[i], sc[i], r) for i in range(len(tiles))]

  def predict_image(self, image: np.ndarray, mpp: float, *, class_names: Sequence[str] | None = None,
                    rescale: bool = True) -> dict[str, np.ndarray]:
    """Detects nuclei in an image of any size with sliding windows.

    Args:
      image: uint8 [H, W, 3].
      mpp: µm/px of `image`.
      class_names: optional; checked against the checkpoint's.
      rescale: resample images whose mpp differs from the model's (else raise).

    Returns:
      `{'points': [K, 2] (x, y) in `image` px, 'classes': [K], 'scores': [K]}`.
    """
    self.check_class_names(class_names)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"image: got {image.dtype} {image.shape}, expected uint8 [H, W, 3]")
    H0, W0 = image.shape[:2]
    if H0 == 0 or W0 == 0:
      return _empty()
    mpp = check_mpp(mpp)
    scale = mpp / self.mpp  # model px per input px
    if abs(scale - 1.0) > self.mpp_tolerance:
      if not rescale:
        raise cli.UserError(f"image is at {mpp} µm/px but the model works at {self.mpp} µm/px", "mpp",
                            "pass rescale=True (drop --no-rescale) to resample")
      W1, H1 = max(1, round(W0 * scale)), max(1, round(H0 * scale))
      image = _resize(image, W1, H1)
    H, W = image.shape[:2]
    S = self.window
    if H < S or W < S:  # pad small images up to the window
      mode = "reflect" if min(H, W) > 1 and S - min(H, W) < 8 * min(H, W) else "constant"
      pad = ((0, max(0, S - H)), (0, max(0, S - W)), (0, 0))
      image = np.pad(image, pad, mode=mode, **({"constant_values": 255} if mode == "constant" else {}))
    ys, xs = window_starts(image.shape[0], S, self.overlap), window_starts(image.shape[1], S, self.overlap)
    by, bx = ownership_bounds(ys, S), ownership_bounds(xs, S)
    tiles = np.stack([image[y:y + S, x:x + S] for y in ys for x in xs])
    pts, cls, sc = self._raw_tiles(tiles)
    r = self.nms_radius_um / self.mpp
    keep_p, keep_c, keep_s = [], [], []
    for t, ((y, (ylo, yhi)), (x, (xlo, xhi))) in enumerate((a, b) for a in zip(ys, by) for b in zip(xs, bx)):
      d = self._postprocess(pts[t], cls[t], sc[t], r)
      p = d["points"] + np.array([x, y], np.float32)
      own = (p[:, 0] >= xlo) & (p[:, 0] < xhi) & (p[:, 1] >= ylo) & (p[:, 1] < yhi)
      own &= (p[:, 0] >= -0.5) & (p[:, 0] < W - 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] < H - 0.5)  # not in padding
      keep_p.append(p[own]), keep_c.append(d["classes"][own]), keep_s.append(d["scores"][own])
    p, c, s = np.concatenate(keep_p), np.concatenate(keep_c), np.concatenate(keep_s)
    k = point_nms(p, s, r)
    p, c, s = p[k], c[k], s[k]
    if (H, W) != (H0, W0):  # back to the input's pixels (pixel centres at integers)
      p = (p + 0.5) * np.array([W0 / W, H0 / H], np.float32) - 0.5
    return {"points": p.astype(np.float32).reshape(-1, 2), "classes": c.astype(np.int32),
            "scores": s.astype(np.float32)}


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m muse_jax.ndc.infer --checkpoint CK (--threshold-from SWEEP.json | --score-threshold T)`."""
  ap = argparse.ArgumentParser(prog="python -m muse_jax.ndc.infer",
                               description="Attach a score threshold chosen on val to an NDC checkpoint "
                                           "(used by default by muse_jax.predict and muse_jax.predict_slide).")
  ap.add_argument("--checkpoint", required=True, help="NDC checkpoint directory (or the fine-tuning workdir)")
  g = ap.add_mutually_exclusive_group(required=True)
  g.add_argument("--threshold-from", help="a `python -m muse_jax.score --sweep ... --json` file of the val split")
  g.add_argument("--score-threshold", help="a threshold in [0, 1] you chose on val")
  ap.add_argument("--source", default=None, help="with --score-threshold: how it was chosen (stored with it)")
  args = ap.parse_args(argv)
  if args.threshold_from is not None:
    t, source = threshold_from_sweep(args.threshold_from)
  else:
    t = check_score_threshold(args.score_threshold, "--score-threshold")
    source = args.source or "--score-threshold of python -m muse_jax.ndc.infer"
  p = store_threshold(args.checkpoint, t, source)
  print(f"{p}: score threshold {t:g} stored ({source})")
  return cli.EXIT_OK


if __name__ == "__main__":
  sys.exit(cli.run(main))
