"""Whole-slide nucleus detection: tissue tiles at the model's mpp, batched sharded inference, seam merging, exports.

`run(predictor, slide_path, out_dir, config)` does, in order:

1. open the slide (`reader.open_slide`; mpp from metadata or `config.mpp`), make a thumbnail at `mask_mpp` and a tissue
   mask (`tissue.tissue_mask`);
2. lay a tile grid at the predictor's mpp (`tiling.make_grid`, tile = `predictor.window`, `config.overlap`) and keep
   the tiles whose core touches tissue;
3. read tiles with a thread pool (`num_readers` threads, `prefetch_batches` batches ahead) into fixed-size batches,
   put each batch on a 1-D data mesh of all devices (`NamedSharding(mesh, P('data'))`) and dispatch the model; a
   writer thread collects each batch's points while the next batch computes, keeps each point only if it lies in
   the tile's core grown by the merge radius r (`TileGrid.in_core`), and flags it as a seam point when it is within
   2r of an inner core border (a duplicate pair, at most r apart with each point within r of its own core, always
   lies in that band);
4. every batch is streamed to `out_dir/parts/part_NNNNNN.npz` (level-0 points, classes, scores, tile, seam flag), then
   its tiles are appended to `parts/done.txt`. Memory stays flat: nothing but the batches in flight is held. A rerun
   with the same slide and settings skips the tiles listed there (resume after a crash or a `max_batches` stop; a
   crash loses at most the batches in flight). `parts/meta.json` holds everything that determines the result (slide
   path and size in bytes, mpp, model identity by content — `predictor.fingerprint`, e.g. the SHA-256 of the
   checkpoint's variables —, score threshold, NMS and merge radii, tile, overlap, tissue-mask settings, package
   version); a rerun with any of them different is refused with a `cli.UserError` naming each difference, unless
   `config.restart` (`--restart`) discards the parts and starts over;
5. seam pass: only the seam points (a band of 3r around each core border) are loaded together; a k-d tree merges
   pairs from different tiles within r of each other, keeping the higher score (greedy point-NMS);
6. exports, streamed part by part: `nuclei.csv` (x, y in level-0 px, class name, score), `nuclei.geojson` (QuPath
   classified points, `muse_jax.outputs` layout), `summary.json` (counts and densities per mm² of tissue per class,
   timings), `overlay.png` (thumbnail with nuclei drawn), `tissue.png` (the mask). Each is written under a temporary
   name and renamed when complete; an earlier `summary.json` is removed before the parts are touched and the new
   one is written last, so `summary.json` with `"complete": true` always describes the files beside it.

The predictor protocol: any object with `predict_tiles(uint8 [B, S, S, 3]) -> list of B dicts` with `points` float
[K, 2] (x, y in tile pixels), `classes` int [K], `scores` float [K]; attributes `class_names` (sequence of str), `mpp`
(µm/px the model runs at), `window` (S), and optionally `merge_radius_um` or `nms_radius_um` (µm; the seam-merge
radius unless `config.merge_radius_um` is set). `predict_tiles` receives a batch sharded over the mesh
(`jax.Array`); a predictor that wants numpy may call `np.asarray` on it. `muse_jax.ndc.infer.Predictor` is run
through its jitted forward directly, so its batch stays sharded (`_batch_predict_fns`).
"""
from __future__ import annotations

import collections
import concurrent.futures as futures
import csv
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any, Protocol, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image, ImageDraw
from scipy.spatial import cKDTree

import muse_jax
from muse_jax import cli, outputs
from muse_jax.slide import reader, tiling, tissue

PARTS_DIR = "parts"
DONE_FILE = "done.txt"
META_FILE = "meta.json"


class TilePredictor(Protocol):
  """What `run` needs from a model (see module docstring)."""
  class_names: Sequence[str]
  mpp: float
  window: int

  def predict_tiles(self, tiles: Any) -> list[dict[str, np.ndarray]]:
    ...


@dataclasses.dataclass
class SlideRunConfig:
  """Settings of a whole-slide run.

  Attributes:
    mpp: level-0 µm/px of the slide; None reads it from the metadata.
    batch_size: tiles per inference call (rounded up to a multiple of the device count).
    overlap: pixels (at the model mpp) shared by neighbouring tiles; each side of a core gets overlap/2 of context.
    num_readers: tile-reading threads.
    prefetch_batches: batches read ahead of the model.
    mask_mpp: µm/px of the thumbnail used for the tissue mask.
    min_tissue_area_um2: smaller tissue pieces are ignored.
    merge_radius_um: seam-merge radius; None uses `predictor.merge_radius_um` or 3 µm.
    overlay_max_side: longest side of `overlay.png` in pixels (its mpp is never finer than 2 µm/px).
    object_type: GeoJSON objectType, 'detection' (light, for many nuclei) or 'annotation' (editable).
    max_batches: stop after this many batches in this call (a test/ops hook; rerun to resume). None: run to the end.
    progress: show a tqdm progress bar with ETA.
    restart: discard parts from an earlier run with different settings instead of refusing to resume.
  """
  mpp: float | None = None
  batch_size: int = 16
  overlap: int = 64
  num_readers: int = 4
  prefetch_batches: int = 4
  mask_mpp: float = 8.0
  min_tissue_area_um2: float = 20_000.0
  merge_radius_um: float | None = None
  overlay_max_side: int = 2048
  object_type: str = "detection"
  max_batches: int | None = None
  progress: bool = True
  restart: bool = False


def validate_config(cfg: SlideRunConfig) -> None:
  """Checks every field (finite, positive, in range) before any work; raises `cli.UserError` naming the field.

  Field names are given as the CLI flag where there is one (`--batch` for `batch_size`, ...).
  """
  if cfg.mpp is not None:
    if isinstance(cfg.mpp, bool) or not reader.MPP_RANGE[0] <= cli.positive(cfg.mpp, "--mpp") <= reader.MPP_RANGE[1]:
      raise cli.UserError(f"µm/px must be in [{reader.MPP_RANGE[0]}, {reader.MPP_RANGE[1]}]", "--mpp",
                          f"got {cfg.mpp!r} (0.25 at 40x, 0.5 at 20x)")
  cli.positive_int(cfg.batch_size, "--batch")
  overlap = cli.positive_int(cfg.overlap, "--overlap", allow_zero=True)
  if overlap % 2:
    raise cli.UserError("must be even (each side of a tile core gets overlap/2 px of context)", "--overlap",
                        f"got {overlap}")
  cli.positive_int(cfg.num_readers, "--readers")
  cli.positive_int(cfg.prefetch_batches, "prefetch_batches")
  cli.positive(cfg.mask_mpp, "mask_mpp", upper=1000.0, unit="µm/px")
  cli.positive(cfg.min_tissue_area_um2, "min_tissue_area_um2", allow_zero=True, unit="µm²")
  if cfg.merge_radius_um is not None:
    cli.positive(cfg.merge_radius_um, "--merge-radius-um", upper=100.0, unit="µm")
  if cli.positive_int(cfg.overlay_max_side, "overlay_max_side") < 16:
    raise cli.UserError("must be >= 16", "overlay_max_side", f"got {cfg.overlay_max_side}")
  if cfg.object_type not in outputs.OBJECT_TYPES:
    raise cli.UserError(f"must be one of {outputs.OBJECT_TYPES}", "object_type", f"got {cfg.object_type!r}")
  if cfg.max_batches is not None:
    cli.positive_int(cfg.max_batches, "max_batches", allow_zero=True)


def model_identity(predictor: Any) -> dict[str, Any]:
  """What identifies the model's answers for the resume check: its fingerprint and post-processing settings.

  `predictor.fingerprint` (a dict; `muse_jax.ndc.infer.Predictor.from_checkpoint` sets the SHA-256 of the
  variables) when it has one, else its class; plus `score_threshold`, `nms_radius_um` and `max_detections` when
  present.
  """
  fp = getattr(predictor, "fingerprint", None)
  ident: dict[str, Any] = ({"fingerprint": dict(fp)} if fp else
                           {"predictor": f"{type(predictor).__module__}.{type(predictor).__qualname__}"})
  for k in ("score_threshold", "nms_radius_um", "max_detections"):
    v = getattr(predictor, k, None)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      ident[k] = v
  return ident


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh ('data',) over all (or the given) devices, with Auto axes."""
  devices = list(devices) if devices is not None else jax.devices()
  return Mesh(np.array(devices), ("data",))


def _batch_predict_fns(predictor: TilePredictor, mesh: Mesh):
  """How one sharded batch is run: `(dispatch, collect)`, `collect(dispatch(tiles)) -> list of B dicts`.

  `dispatch` starts the work on the devices and returns at once where it can (JAX's asynchronous dispatch); `collect`
  waits for it and post-processes on the host. `run` collects a batch on a writer thread while the main thread
  dispatches the next one.

  For `muse_jax.ndc.infer.Predictor` (it has a jitted `_forward(variables, tiles)` and `_postprocess`), the forward
  runs directly on the sharded batch with the variables replicated over the mesh, so each device computes its slice
  of the batch; its `predict_tiles` would copy the batch to the host first. Any other predictor gets the sharded
  batch through `predict_tiles` (synchronous).
  """
  forward, post = getattr(predictor, "_forward", None), getattr(predictor, "_postprocess", None)
  variables = getattr(predictor, "variables", None)
  if not (callable(forward) and callable(post) and variables is not None):
    return predictor.predict_tiles, lambda preds: preds
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  radius_px = float(getattr(predictor, "nms_radius_um", 3.0)) / float(predictor.mpp)

  def dispatch(tiles: jax.Array) -> Any:
    return forward(replicated, tiles)

  def collect(handle: Any) -> list[dict[str, np.ndarray]]:
    pts, cls, sc = jax.device_get(handle)
    return [post(pts[i], cls[i], sc[i], radius_px) for i in range(len(pts))]

  return dispatch, collect


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
  outputs.write_text_atomic(path, text)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _short(v: Any) -> str:
  text = "absent" if v is None else v if isinstance(v, str) else json.dumps(v)
  return text[:12] + "…" if len(text) > 40 else text


def _read_done(parts: pathlib.Path) -> list[tuple[str, list[int]]]:
  done_path = parts / DONE_FILE
  if not done_path.exists():
    return []
  entries = []
  lines = done_path.read_text().split("\n")[:-1]  # a last line without its newline was cut short: not done
  for line in lines:
    fields = line.split()
    if fields and (parts / fields[0]).exists():
      entries.append((fields[0], [int(t) for t in fields[1:]]))
  return entries


def check_resume(out_dir: pathlib.Path, meta: dict[str, Any], restart: bool) -> bool:
  """Whether `out_dir/parts` holds results of a run with exactly `meta` (compared key by key, `info` excluded).

  Returns False when there is nothing to resume or (with `restart`) the parts are of another run. Raises
  `cli.UserError` naming every difference when the parts are of another run and `restart` is False. Changes
  nothing on disk.
  """
  meta_path = out_dir / PARTS_DIR / META_FILE
  if not meta_path.exists():
    if (out_dir / PARTS_DIR).exists() and any((out_dir / PARTS_DIR).glob("part_*.npz")) and not restart:
      raise cli.UserError("holds parts of a run without its meta.json", os.fspath(out_dir / PARTS_DIR),
                          "use another --out or pass --restart to discard them")
    return False
  try:
    old = json.loads(meta_path.read_text())
    if not isinstance(old, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    if restart:
      return False
    raise cli.UserError("unreadable resume state", os.fspath(meta_path),
                        f"{type(e).__name__}: {e}; pass --restart to discard the partial results") from None
  a = _flat({k: v for k, v in old.items() if k != "info"})
  b = _flat({k: v for k, v in meta.items() if k != "info"})
  diffs = [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  if not diffs:
    return True
  if restart:
    return False
  raise cli.UserError("holds partial results of a different run", os.fspath(out_dir),
                      f"{'; '.join(diffs)} (was -> now). Rerun with the earlier settings to resume, use another "
                      "--out, or pass --restart to discard them")


def _prepare_parts(out_dir: pathlib.Path, meta: dict[str, Any], restart: bool) -> list[tuple[str, list[int]]]:
  """Creates or validates `out_dir/parts`; returns the finished parts (name, tiles) of an earlier run.

  Removes `out_dir/summary.json` first: the outputs beside it are about to change.
  """
  parts = out_dir / PARTS_DIR
  meta_path = parts / META_FILE
  resume = check_resume(out_dir, meta, restart)
  summary = out_dir / "summary.json"
  if summary.exists():
    summary.unlink()
  if not resume and parts.exists():
    shutil.rmtree(parts)
  parts.mkdir(parents=True, exist_ok=True)
  if not meta_path.exists():
    _atomic_write_text(meta_path, json.dumps(meta, indent=1))
    (parts / DONE_FILE).write_text("")
  entries = _read_done(parts)
  listed = {name for name, _ in entries}
  for f in parts.glob("part_*.npz"):  # written but never listed: the run died between the two steps
    if f.name not in listed:
      f.unlink()
  for f in list(parts.glob("*.tmp*")) + list(out_dir.glob(".*.tmp")):
    f.unlink()
  # rewrite done.txt without lines whose part file is missing
  _atomic_write_text(parts / DONE_FILE, "".join(f"{n} {' '.join(map(str, t))}\n" for n, t in entries))
  return entries


def check_geometry(window: int, overlap: int, model_mpp: float, merge_um: float) -> None:
  """Tile, overlap and merge radius fit together (before any work); raises `cli.UserError` naming the flags."""
  if overlap >= window:
    raise cli.UserError(f"must be < the tile ({window} px, the checkpoint's window)", "--overlap", f"got {overlap}")
  seam_px = merge_um / model_mpp
  if not 0 < seam_px <= overlap / 2:
    raise cli.UserError("merge radius does not fit in the overlap", "--overlap/--merge-radius-um",
                        f"merge radius {merge_um} µm = {seam_px:.1f} px at {model_mpp} µm/px, expected > 0 and at "
                        f"most overlap/2 = {overlap / 2} px; raise --overlap or lower --merge-radius-um")


def _model_to_level0(xy: np.ndarray, ratio: float) -> np.ndarray:
  """Pixel-centre coordinates at the model mpp -> level-0 pixel-centre coordinates (ratio = model_mpp/slide_mpp)."""
  return (xy + 0.5) * ratio - 0.5


def _seam_merge(parts: pathlib.Path, names: list[str], radius_px: float) -> dict[str, np.ndarray]:
  """Suppressed row indices per part, from a k-d tree over seam-flagged points only.

  Greedy by descending score: a point suppresses the seam points of *other* tiles within `radius_px` (level-0 px).
  """
  pts, scores, tiles, part_ids, rows = [], [], [], [], []
  for k, name in enumerate(names):
    with np.load(parts / name) as z:
      b = z["border"]
      if b.any():
        idx = np.nonzero(b)[0]
        pts.append(z["points"][idx])
        scores.append(z["scores"][idx])
        tiles.append(z["tiles"][idx])
        part_ids.append(np.full(len(idx), k))
        rows.append(idx)
  if not pts:
    return {}
  pts, scores, tiles = np.concatenate(pts), np.concatenate(scores), np.concatenate(tiles)
  part_ids, rows = np.concatenate(part_ids), np.concatenate(rows)
  pairs = cKDTree(pts).query_pairs(radius_px, output_type="ndarray")
  if len(pairs) == 0:
    return {}
  pairs = pairs[tiles[pairs[:, 0]] != tiles[pairs[:, 1]]]
  neighbours = collections.defaultdict(list)
  for i, j in pairs:
    neighbours[i].append(j)
    neighbours[j].append(i)
  suppressed = np.zeros(len(pts), bool)
  for i in sorted(neighbours, key=lambda i: (-scores[i], i)):
    if not suppressed[i]:
      for j in neighbours[i]:
        if tiles[j] != tiles[i]:
          suppressed[j] = True
  out: dict[str, list[int]] = collections.defaultdict(list)
  for i in np.nonzero(suppressed)[0]:
    out[names[part_ids[i]]].append(int(rows[i]))
  return {k: np.asarray(v, np.int64) for k, v in out.items()}


class _GeoJSONStream:
  """Writes a FeatureCollection feature by feature (`muse_jax.outputs.points_to_geojson` layout)."""

  def __init__(self, path: pathlib.Path):
    self._f = open(path, "w")  # noqa: SIM115
    self._f.write('{"type": "FeatureCollection", "features": [')
    self._first = True

  def write(self, features: list[dict[str, Any]]) -> None:
    for feat in features:
      self._f.write(("\n" if self._first else ",\n") + json.dumps(feat))
      self._first = False

  def close(self) -> None:
    self._f.write("\n]}\n")
    self._f.close()


def run(predictor: TilePredictor, slide_path: str | os.PathLike, out_dir: str | os.PathLike,
        config: SlideRunConfig | None = None, *, mesh: Mesh | None = None) -> dict[str, Any]:
  """Detects and classifies the nuclei of a whole slide; see the module docstring.

  Args:
    predictor: the model (protocol in the module docstring).
    slide_path: SVS / pyramidal TIFF / plain image.
    out_dir: output directory (created); holds `parts/` while running and the exports at the end.
    config: settings (default `SlideRunConfig()`).
    mesh: device mesh with a 'data' axis (default all devices).

  Returns:
    the summary dict (also written to `out_dir/summary.json` once complete); `complete` is False when
    `config.max_batches` stopped the run early (then no exports are written).

  Raises:
    FileNotFoundError, reader.SlideError, reader.MissingMppError: bad slide input.
    cli.UserError (a ValueError): bad settings, or `out_dir` holds parts of a different run (without `restart`).
  """
  cfg = config or SlideRunConfig()
  validate_config(cfg)
  t_start = time.perf_counter()
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  mesh = mesh or data_mesh()
  n_dev = mesh.shape["data"]
  batch = -(-max(int(cfg.batch_size), 1) // n_dev) * n_dev
  sharding = NamedSharding(mesh, P("data"))
  class_names = [str(c) for c in predictor.class_names]
  colors = outputs.class_colors(class_names)
  model_mpp, window = float(predictor.mpp), int(predictor.window)
  merge_um = cfg.merge_radius_um
  if merge_um is None:
    merge_um = float(getattr(predictor, "merge_radius_um", getattr(predictor, "nms_radius_um", 3.0)))
  dispatch, collect = _batch_predict_fns(predictor, mesh)

  check_geometry(window, int(cfg.overlap), model_mpp, float(merge_um))
  with reader.open_slide(slide_path, mpp=cfg.mpp) as slide:
    if slide.pixel_note:
      print(f"note: {slide.pixel_note}", file=sys.stderr, flush=True)
    ratio = model_mpp / slide.mpp
    width, height = slide.size_at_mpp(model_mpp)
    grid = tiling.make_grid(width, height, window, cfg.overlap)
    seam_px = merge_um / model_mpp  # model px
    thumb = slide.thumbnail(cfg.mask_mpp)
    mask = tissue.tissue_mask(thumb, cfg.mask_mpp, min_area_um2=cfg.min_tissue_area_um2)
    area_mm2 = tissue.tissue_area_mm2(mask, cfg.mask_mpp)
    selected = tiling.tissue_tiles(grid, mask, model_mpp / cfg.mask_mpp)
    slide_file = pathlib.Path(slide_path).resolve()
    meta = dict(slide=str(slide_file), slide_bytes=slide_file.stat().st_size, slide_size=list(slide.dimensions),
                slide_mpp=slide.mpp, pixel_note=slide.pixel_note, model_mpp=model_mpp, window=window,
                overlap=grid.overlap, grid=[grid.nx, grid.ny], class_names=class_names,
                merge_radius_um=float(merge_um), tissue_tiles=int(len(selected)), mask_mpp=cfg.mask_mpp,
                min_tissue_area_um2=float(cfg.min_tissue_area_um2), model=model_identity(predictor),
                package_version=muse_jax.__version__,
                info=dict(checkpoint=getattr(predictor, "checkpoint", None)))
    entries = _prepare_parts(out, meta, cfg.restart)
    with outputs.atomic_path(out / "tissue.png") as tmp:
      Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    done = {t for _, ts in entries for t in ts}
    todo = [int(t) for t in selected if int(t) not in done]

    def read_tile(index: int) -> np.ndarray:
      ox, oy = grid.origin(index)
      return slide.read_at_mpp(float(ox), float(oy), window, window, model_mpp)

    batches = [todo[i:i + batch] for i in range(0, len(todo), batch)]
    if cfg.max_batches is not None:
      batches = batches[:max(int(cfg.max_batches), 0)]
    bar = None
    if cfg.progress:
      from tqdm.auto import tqdm  # noqa: PLC0415
      bar = tqdm(total=len(selected), initial=len(done), unit="tile", desc=pathlib.Path(slide_path).name,
                 dynamic_ncols=True)
    parts = out / PARTS_DIR
    next_part = 1 + max((int(n[5:-4]) for n, _ in entries), default=-1)
    timing = dict(infer=0.0, tiles=0)

    def finish(tiles_idx: list[int], handle: Any, name: str, t_dispatch: float) -> None:
      """Collects one batch, keeps the points each tile owns, writes the part, then marks its tiles done."""
      t0 = time.perf_counter()
      preds = collect(handle)
      timing["infer"] += t_dispatch + time.perf_counter() - t0
      rec = collections.defaultdict(list)
      for k, index in enumerate(tiles_idx):
        p = preds[k]
        xy = np.asarray(p["points"], np.float64).reshape(-1, 2) + grid.origin(index)
        keep = grid.in_core(index, xy, seam_px) & (xy[:, 0] > -0.5) & (xy[:, 1] > -0.5)
        keep &= (xy[:, 0] < width - 0.5) & (xy[:, 1] < height - 0.5)
        xy = xy[keep]
        rec["points"].append(_model_to_level0(xy, ratio).astype(np.float32))
        rec["classes"].append(np.asarray(p["classes"], np.int32).reshape(-1)[keep])
        rec["scores"].append(np.asarray(p["scores"], np.float32).reshape(-1)[keep])
        rec["tiles"].append(np.full(len(xy), index, np.int64))
        rec["border"].append(~grid.in_core(index, xy, -2 * seam_px))
      tmp = parts / (name + ".tmp.npz")
      np.savez(tmp, **{k: np.concatenate(v) for k, v in rec.items()})
      os.replace(tmp, parts / name)
      with open(parts / DONE_FILE, "a") as f:
        f.write(f"{name} {' '.join(map(str, tiles_idx))}\n")
      entries.append((name, tiles_idx))
      timing["tiles"] += len(tiles_idx)
      if bar is not None:
        bar.update(len(tiles_idx))

    pool = futures.ThreadPoolExecutor(max(int(cfg.num_readers), 1), thread_name_prefix="slide-reader")
    writer = futures.ThreadPoolExecutor(1, thread_name_prefix="slide-writer")
    writes: collections.deque = collections.deque()
    try:
      pending: collections.deque = collections.deque()
      it = iter(batches)

      def submit_next() -> None:
        b = next(it, None)
        if b is not None:
          pending.append((b, [pool.submit(read_tile, t) for t in b]))

      for _ in range(max(int(cfg.prefetch_batches), 1)):
        submit_next()
      while pending:
        tiles_idx, futs = pending.popleft()
        imgs = np.full((batch, window, window, 3), reader.PAD_VALUE, np.uint8)
        for k, f in enumerate(futs):
          imgs[k] = f.result()
        submit_next()
        t0 = time.perf_counter()
        handle = dispatch(jax.device_put(imgs, sharding))
        t_dispatch = time.perf_counter() - t0
        writes.append(writer.submit(finish, tiles_idx, handle, f"part_{next_part:06d}.npz", t_dispatch))
        next_part += 1
        while len(writes) > 1:  # at most one batch being collected while the next one computes
          writes.popleft().result()
      while writes:
        writes.popleft().result()
    finally:
      writer.shutdown(wait=True)  # batches already dispatched are still written (and marked done)
      pool.shutdown(wait=True, cancel_futures=True)
      if bar is not None:
        bar.close()
    t_infer, n_run = timing["infer"], timing["tiles"]
    n_done = len({t for _, ts in entries for t in ts})
    summary: dict[str, Any] = dict(
        slide=str(slide_path), slide_size=list(slide.dimensions), slide_mpp=slide.mpp, mpp_source=slide.mpp_source,
        vendor=slide.vendor, pixel_note=slide.pixel_note, model_mpp=model_mpp, window=window,
        overlap=grid.overlap, model=meta["model"], checkpoint=meta["info"]["checkpoint"],
        score_threshold=getattr(predictor, "score_threshold", None),
        score_threshold_source=getattr(predictor, "threshold_source", None), devices=n_dev,
        batch_size=batch, tiles_total=grid.num_tiles, tiles_tissue=int(len(selected)), tiles_done=n_done,
        tiles_this_call=n_run, tissue_area_mm2=area_mm2, complete=n_done == len(selected))
    if not summary["complete"]:
      summary["seconds"] = time.perf_counter() - t_start
      return summary

    # seam pass and exports
    names = [n for n, _ in entries]
    suppressed = _seam_merge(parts, names, merge_um / slide.mpp)
    overlay_mpp = max(2.0, slide.mpp, max(slide.dimensions) * slide.mpp / max(cfg.overlay_max_side, 16))
    overlay = Image.fromarray(slide.thumbnail(overlay_mpp))
  draw = ImageDraw.Draw(overlay)
  dot = max(1.0, 3.0 / overlay_mpp)
  counts = np.zeros(len(class_names), np.int64)
  tmp_csv, tmp_geo, tmp_png = (out / f".{n}.{os.getpid()}.tmp" for n in ("nuclei.csv", "nuclei.geojson",
                                                                          "overlay.png"))
  geo = _GeoJSONStream(tmp_geo)
  with open(tmp_csv, "w", newline="") as fcsv:
    w = csv.writer(fcsv)
    w.writerow(["x", "y", "class", "score"])
    for name in names:
      with np.load(parts / name) as z:
        keep = np.ones(len(z["scores"]), bool)
        keep[suppressed.get(name, np.zeros(0, np.int64))] = False
        pts, cls, sc = z["points"][keep], z["classes"][keep], z["scores"][keep]
      if len(cls) and (cls.min() < 0 or cls.max() >= len(class_names)):
        raise ValueError(f"predictor returned classes in [{cls.min()}, {cls.max()}], expected [0, "
                         f"{len(class_names)}) for class_names {class_names}")
      counts += np.bincount(cls, minlength=len(class_names))
      w.writerows([f"{x:.2f}", f"{y:.2f}", class_names[c], f"{s:.4f}"] for (x, y), c, s in zip(pts, cls, sc))
      geo.write(outputs.points_to_geojson(pts, cls, sc, class_names, colors=colors,
                                          object_type=cfg.object_type)["features"])
      scale = slide.mpp / overlay_mpp
      for (x, y), c in zip(pts, cls):
        cx, cy = (x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5
        draw.ellipse([cx - dot, cy - dot, cx + dot, cy + dot], fill=tuple(colors[c]))
  geo.close()
  overlay.save(tmp_png, format="PNG")
  for tmp, name in ((tmp_csv, "nuclei.csv"), (tmp_geo, "nuclei.geojson"), (tmp_png, "overlay.png")):
    os.replace(tmp, out / name)
  n_total = int(counts.sum())
  elapsed = time.perf_counter() - t_start
  summary.update(
      nuclei=n_total,
      counts={c: int(n) for c, n in zip(class_names, counts)},
      density_per_mm2=({c: float(n / area_mm2) for c, n in zip(class_names, counts)} if area_mm2 > 0 else None),
      total_density_per_mm2=float(n_total / area_mm2) if area_mm2 > 0 else None,
      seam_merged=int(sum(len(v) for v in suppressed.values())), merge_radius_um=float(merge_um),
      seconds=elapsed, inference_seconds=t_infer,
      tiles_per_s=(n_run / elapsed) if n_run else None,
      s_per_mm2=(elapsed / area_mm2) if area_mm2 > 0 and n_run == len(selected) else None,
      overlay_mpp=overlay_mpp, coordinates="level-0 pixels (x = column, y = row)",
      outputs=dict(csv="nuclei.csv", geojson="nuclei.geojson", overlay="overlay.png", tissue="tissue.png"))
  _atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
  return summary
