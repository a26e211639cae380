"""The pretraining corpus from whole slides, on Apache Beam: slides -> sharded nucleus-annotated ROIs (ArrayRecord).

    python -m muse_jax.data.build_corpus --slides SLIDES_DIR --out DATA_DIR                      # DirectRunner
    python -m muse_jax.data.build_corpus --slides 'wsis/*.svs' --out DATA_DIR --mpp 0.5 --roi_size 1024 \\
        --min_tissue 0.5 --detector classical --direct_num_workers 8
    python -m muse_jax.data.build_corpus --slides SLIDES --out DATA_DIR --detector ndc:runs/ndc/export
    python -m muse_jax.main --config configs/pretrain.py:vit_s16 --config.data.source=tfds:DATA_DIR ...

One Beam pipeline (`CorpusTransform`) runs on the DirectRunner locally and on Dataflow, Flink or Spark with the
standard Beam pipeline options (every flag this command does not know is one: `--runner`, `--direct_num_workers`,
`--direct_running_mode`, `--project`, `--flink_master`, ...). Its stages:

1. list the slides (on the launching machine: files, folders (their slide files, sorted) and globs);
2. hash each slide's bytes (SHA-256, streamed) and keep one path per content: duplicate slides are read once;
3. per slide: open it (`muse_jax.slide`), compute the tissue mask on a thumbnail at `THUMB_MPP` µm/px, lay a grid of
   `roi_size` px ROIs at `mpp` µm/px (non-overlapping, whole ROIs inside the slide) and keep the ROIs whose tissue
   fraction is at least `min_tissue`; the kept ROIs are cut into tasks of `rois_per_task` ROIs;
4. per task (spread over the workers, so one large slide is read by many of them): read each ROI at `mpp`, detect
   the nucleus centroids (the classical detector, `muse_jax.data.detect`, or a trained NDC checkpoint), serialize
   the record (TFDS's example format) into the task's spill file and emit a small reference to it;
5. assign the references to shards by the hash of their key (`shard_mb` MiB per shard), group them, and write each
   shard's ArrayRecord file in key-hash order, reading the records back one at a time; then TFDS's metadata
   (`tfds.folder_dataset.write_metadata`) makes `DATA_DIR/wsi_corpus/1.0.0/` readable by `tfds.data_source` and
   by the pretraining source `tfds:DATA_DIR` with no conversion step.

Only references travel through the shuffle (TFDS's own Beam writer groups the encoded images themselves, which on
the DirectRunner holds the whole corpus in memory): memory stays flat as the corpus grows, on any runner. The spill
files live in `DATA_DIR/.build_corpus_parts/` (a folder every worker can write: on a cluster, shared storage) and
are removed at the end; the disk needs room for the corpus twice while it is written.

Records (split `train`): `image` uint8 [roi_size, roi_size, 3]; `coords` float32 [N, 2] (x, y) nucleus centroids in
pixels of `image`; `mpp` float32 (µm/px of `image`); `name` `<slide stem>_x<X>_y<Y>`; `slide_sha256`; `origin` int32
[2] = (X, Y), the ROI's top-left corner in pixels of the slide resampled to `mpp`; `tissue` float32, the ROI's tissue
fraction.

Determinism: a record's key is derived from its content (the slide's SHA-256 and the ROI's grid position) and the
records are ordered (and sharded) by a hash of the key, so the records (content and order, and the shard files) do
not depend on the runner, the number of workers or the order in which the slides were listed.

Dead letters: a slide that cannot be read, has no resolution in its metadata, has no tissue, has no ROI with enough
tissue, or is coarser than `mpp` (beyond 10 %) does not stop the corpus: it is written to `DATA_DIR/failed.jsonl`
(one JSON object per line: `slide`, `stage`, `reason`, and `roi` for a ROI that could not be read) and the other
slides go on. Exit codes: 0 every slide contributed, 3 (`cli.EXIT_PARTIAL`) some slides are in `failed.jsonl`, 2 a
user error (bad flag, missing input, existing records without `--overwrite`, or no ROI at all).

Summary: `DATA_DIR/summary.json` (slides, ROIs, nuclei per ROI and per mm² of tissue, per slide and in total,
duplicates, failures, options) and `DATA_DIR/summary.png` (histograms of nuclei per ROI and per mm² of tissue). A
progress bar (ROIs done / planned) is shown on the DirectRunner.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import glob
import hashlib
import json
import logging
import math
import os
import pathlib
import sys
import threading
import time
import uuid
from typing import Any, Iterable, Sequence

import numpy as np
from etils import epath

from muse_jax import cli
from muse_jax.cli import UserError


class _NoApitoolsWarning(logging.Filter):
  """Drops the one warning `import apache_beam` logs without the GCP extra ("apitools not found ..."): it is about
  BigQuery, which this pipeline does not use."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'apitools not found' not in record.getMessage()


logging.getLogger().addFilter(_NoApitoolsWarning())
import apache_beam as beam  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from apache_beam.options.pipeline_options import TypeOptions  # noqa: E402  pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

DATASET = 'wsi_corpus'
VERSION = '1.0.0'
SHARD_BYTES = 512 << 20  # target size of one ArrayRecord shard
FAILED_FILE = 'failed.jsonl'
SUMMARY_FILE = 'summary.json'
HISTOGRAM_FILE = 'summary.png'
PROVENANCE_FILE = 'provenance.json'
BEAM_LOG_FILE = 'beam.log'  # on the DirectRunner: what Beam's local workers logged (kept out of the terminal)
PARTS_DIR = '.build_corpus_parts'  # spill files and side outputs of the pipeline, removed at the end
THUMB_MPP = 8.0  # µm/px of the thumbnail the tissue mask is computed on
MPP_TOLERANCE = 0.1  # a slide may be at most 10 % coarser than the target mpp (no upsampling beyond that)
SLIDE_SUFFIXES = ('.svs', '.tif', '.tiff', '.ndpi', '.scn', '.bif', '.svslide', '.qptiff')
MAX_ROI_SIZE = 8192
DETECTOR_FORMS = '"classical" or "ndc:CHECKPOINT"'


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """What the pipeline builds (picklable; travels to the workers).

  Attributes:
    mpp: µm/px of the ROIs.
    roi_size: ROI side in pixels at `mpp`.
    min_tissue: minimum tissue fraction of a kept ROI, in [0, 1].
    detector: 'classical' or 'ndc:CHECKPOINT'.
    min_nuclei: ROIs with fewer detected nuclei are dropped (counted in the summary).
    rois_per_task: ROIs read by one work item (one slide open per task).
    shard_bytes: target size of one ArrayRecord shard, bytes.
    sigma_um, min_distance_um: classical detector scales, µm.
    parts_dir: where the pipeline writes its side outputs (a folder the workers can write).
    progress_dir: where workers write their progress counts (None: no progress files).
  """
  mpp: float = 0.5
  roi_size: int = 1024
  min_tissue: float = 0.5
  detector: str = 'classical'
  min_nuclei: int = 1
  rois_per_task: int = 16
  sigma_um: float = 3.0
  min_distance_um: float = 3.0
  shard_bytes: int = SHARD_BYTES
  parts_dir: str = ''
  progress_dir: str | None = None

  def options(self) -> dict:
    """The options that determine the records (for the provenance and the summary)."""
    return {'mpp': self.mpp, 'roi_size': self.roi_size, 'min_tissue': self.min_tissue, 'detector': self.detector,
            'min_nuclei': self.min_nuclei, 'sigma_um': self.sigma_um, 'min_distance_um': self.min_distance_um,
            'thumb_mpp': THUMB_MPP}


# ------------------------------------------------------------------------------------------------ listing


def list_slides(specs: Sequence[str]) -> list[str]:
  """The slide files named by `specs`, each once, sorted.

  Args:
    specs: files (taken as they are), folders (their files with a slide suffix, `SLIDE_SUFFIXES`, not recursive)
      and globs (every matching file; `**` recurses).

  Raises:
    UserError: a spec that names nothing, or no slide at all.
  """
  out = set()
  for s in specs:
    p = pathlib.Path(s)
    if glob.has_magic(s):
      found = [f for f in glob.glob(s, recursive=True) if pathlib.Path(f).is_file()]
      if not found:
        raise UserError('no file matches the pattern', '--slides', repr(s))
    elif p.is_dir():
      found = [str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES
               and not f.name.startswith('.')]
      if not found:
        raise UserError('no slide files in the folder', '--slides', f'{s} has no {", ".join(SLIDE_SUFFIXES)} files')
    elif p.is_file():
      found = [s]
    else:
      raise UserError('no such file or folder', '--slides', repr(s))
    out.update(os.path.abspath(f) for f in found)
  return sorted(out)


# ------------------------------------------------------------------------------------------------ per-slide work


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
  """SHA-256 of a file's bytes, read in `chunk`-byte pieces (memory stays flat)."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(chunk), b''):
      h.update(block)
  return h.hexdigest()


def roi_grid(width: int, height: int, roi_size: int) -> tuple[int, int]:
  """(columns, rows) of whole `roi_size` ROIs in a `width` x `height` image (pixels at the target mpp)."""
  return max(width // roi_size, 0), max(height // roi_size, 0)


def tissue_fractions(mask: np.ndarray, nx: int, ny: int, roi_size: int, mask_scale: float) -> np.ndarray:
  """Tissue fraction of every ROI of the grid.

  Args:
    mask: bool [h, w] tissue mask of the whole slide (thumbnail pixels).
    nx, ny: ROI columns and rows.
    roi_size: ROI side in target pixels.
    mask_scale: mask pixels per target pixel (target mpp / mask mpp).

  Returns:
    float64 [ny, nx] in [0, 1]: the mean of the mask over each ROI's footprint (thumbnail pixels it touches).
  """
  h, w = mask.shape
  integral = np.zeros((h + 1, w + 1), np.int64)
  integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1)
  edges_x = np.arange(nx + 1) * roi_size * mask_scale
  edges_y = np.arange(ny + 1) * roi_size * mask_scale
  x0 = np.clip(np.floor(edges_x[:-1]).astype(np.int64), 0, w)
  x1 = np.clip(np.maximum(np.ceil(edges_x[1:]).astype(np.int64), x0 + 1), 0, w)
  y0 = np.clip(np.floor(edges_y[:-1]).astype(np.int64), 0, h)
  y1 = np.clip(np.maximum(np.ceil(edges_y[1:]).astype(np.int64), y0 + 1), 0, h)
  total = (integral[y1[:, None], x1[None, :]] - integral[y0[:, None], x1[None, :]]
           - integral[y1[:, None], x0[None, :]] + integral[y0[:, None], x0[None, :]])
  area = np.maximum((y1 - y0)[:, None] * (x1 - x0)[None, :], 1)
  return total / area


def _failure(slide: str, stage: str, reason: str, **extra) -> dict:
  return dict(slide=slide, stage=stage, reason=' '.join(str(reason).split()), **extra)


def dead_letter(parts_dir: str, failure: dict) -> beam.pvalue.TaggedOutput:
  """Records a failure where it happens: `parts_dir/failed/<hash>.json` (named by its content, so a retried bundle
  rewrites the same file), and returns it as the `failed` output. Written at once, not gathered later, so that the
  report exists even when the pipeline then stops (no ROI at all)."""
  text = json.dumps(failure, sort_keys=True)
  path = epath.Path(parts_dir) / 'failed' / f'{hashlib.sha256(text.encode()).hexdigest()[:24]}.json'
  path.write_text(text)
  return beam.pvalue.TaggedOutput('failed', failure)


def _describe_error(e: BaseException) -> str:
  msg = ' '.join(str(e).split())
  return f'{type(e).__name__}: {msg}' if msg else type(e).__name__


class _Progress:
  """A worker-side counter written to `progress_dir/<kind>-<uuid>` (the driver sums the files; DirectRunner)."""

  def __init__(self, progress_dir: str | None, kind: str):
    self.path = (pathlib.Path(progress_dir) / f'{kind}-{uuid.uuid4().hex}') if progress_dir else None
    self.count = 0

  def add(self, n: int) -> None:
    if self.path is None:
      return
    self.count += n
    tmp = self.path.with_suffix('.tmp')
    try:
      tmp.write_text(str(self.count))
      tmp.replace(self.path)
    except OSError:  # progress is cosmetic: never fail a slide for it
      pass


class HashSlide(beam.DoFn):
  """path -> (sha256, path); an unreadable file -> `failed`."""

  def __init__(self, parts_dir: str):
    self.parts_dir = parts_dir

  def process(self, path: str):
    try:
      yield file_sha256(path), path
    except OSError as e:
      yield dead_letter(self.parts_dir, _failure(path, 'read', _describe_error(e)))


class KeepOne(beam.DoFn):
  """(sha256, [paths]) -> (sha256, first path by name); the others -> `duplicate` (read once)."""

  def process(self, item):
    sha, paths = item
    paths = sorted(paths)
    yield sha, paths[0]
    for p in paths[1:]:
      yield beam.pvalue.TaggedOutput('duplicate', dict(slide=p, same_as=paths[0], sha256=sha))


class PlanSlide(beam.DoFn):
  """(sha256, path) -> ROI tasks `(sha256, path, [(ix, iy, tissue), ...])`; facts -> `slide`; failures -> `failed`."""

  def __init__(self, cfg: CorpusConfig):
    self.cfg = cfg

  def setup(self):
    self._progress = _Progress(self.cfg.progress_dir, 'planned')

  def process(self, item):
    from muse_jax.slide import reader, tissue  # pylint: disable=g-import-not-at-top
    sha, path = item
    cfg = self.cfg
    try:
      with reader.open_slide(path) as s:
        facts = dict(slide=path, sha256=sha, slide_mpp=round(float(s.mpp), 6), vendor=s.vendor,
                     width=int(s.dimensions[0]), height=int(s.dimensions[1]))
        if s.mpp > cfg.mpp * (1 + MPP_TOLERANCE):
          yield dead_letter(cfg.parts_dir, _failure(
              path, 'resolution', f'level-0 resolution {s.mpp:.4g} µm/px is coarser than the ROIs\' {cfg.mpp:g} '
              f'µm/px (more than {MPP_TOLERANCE:.0%}): its ROIs would be upsampled'))
          return
        thumb = s.thumbnail(THUMB_MPP)
        mask = tissue.tissue_mask(thumb, THUMB_MPP)
        width, height = s.size_at_mpp(cfg.mpp)
    except reader.MissingMppError:  # (its own advice, pass --mpp, is for the commands where --mpp is the slide's)
      yield dead_letter(cfg.parts_dir, _failure(
          path, 'mpp', 'no resolution in the metadata (no Aperio MPP, no usable TIFF resolution tags): write the '
          'level-0 µm/px into the file, or leave the slide out'))
      return
    except Exception as e:  # noqa: BLE001  (a slide that cannot be read, for whatever reason, is a dead letter)
      yield dead_letter(cfg.parts_dir, _failure(path, 'open', _describe_error(e)))
      return
    facts['tissue_mm2'] = tissue.tissue_area_mm2(mask, THUMB_MPP)
    if not mask.any():
      yield dead_letter(cfg.parts_dir, _failure(path, 'tissue', 'no tissue found on the thumbnail'))
      return
    nx, ny = roi_grid(width, height, cfg.roi_size)
    frac = tissue_fractions(mask, nx, ny, cfg.roi_size, cfg.mpp / THUMB_MPP)
    iy, ix = np.nonzero(frac >= cfg.min_tissue)
    if len(ix) == 0:
      yield dead_letter(cfg.parts_dir, _failure(
          path, 'tissue', f'no {cfg.roi_size} px ROI at {cfg.mpp:g} µm/px has >= {cfg.min_tissue:g} tissue '
          f'({facts["tissue_mm2"]:.3g} mm² of tissue, {nx} x {ny} ROI grid)'))
      return
    facts.update(grid=[int(nx), int(ny)], rois_planned=int(len(ix)))
    yield beam.pvalue.TaggedOutput('slide', facts)
    rois = [(int(x), int(y), float(frac[y, x])) for y, x in zip(iy, ix)]
    for i in range(0, len(rois), cfg.rois_per_task):
      yield sha, path, rois[i:i + cfg.rois_per_task]
    self._progress.add(len(rois))


def _stem(path: str) -> str:
  name = os.path.basename(path)
  return name.split('.')[0] if not name.startswith('.') else name


def corpus_features() -> tfds.features.FeaturesDict:
  """The record layout (module docstring); images as ZLIB uint8 tensors (writing `Image` features needs
  TensorFlow)."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB),
      'coords': tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
      'mpp': tfds.features.Tensor(shape=(), dtype=np.float32),
      'name': tfds.features.Tensor(shape=(), dtype=np.object_),
      'slide_sha256': tfds.features.Tensor(shape=(), dtype=np.object_),
      'origin': tfds.features.Tensor(shape=(2,), dtype=np.int32),
      'tissue': tfds.features.Tensor(shape=(), dtype=np.float32),
  })


def record_key(sha256: str, ix: int, iy: int) -> str:
  """A ROI's key: its slide's content and grid position (the same whoever reads it, wherever)."""
  return f'{sha256[:32]}:{iy:06d}:{ix:06d}'


def key_hash(key: str) -> int:
  """The 64-bit hash that orders the records (and assigns them to shards): a deterministic shuffle."""
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], 'big')


class ReadAndDetect(beam.DoFn):
  """ROI task -> one reference `(key_hash, (spill file, offset, length))` per record; per-task counts -> `stats`
  `(sha256, counts)`; failures -> `failed`.

  The serialized records of a task go to one spill file under `parts_dir/spill/` (named by the task, so a retried
  task rewrites it) and only their small references travel through the shuffle: memory stays flat whatever the
  corpus size, on any runner.
  """

  def __init__(self, cfg: CorpusConfig):
    self.cfg = cfg

  def setup(self):
    self._progress = _Progress(self.cfg.progress_dir, 'done')
    self._features = corpus_features()
    self._predictor = None
    if self.cfg.detector.startswith('ndc:'):
      from muse_jax.ndc import infer  # pylint: disable=g-import-not-at-top
      self._predictor = infer.Predictor.from_checkpoint(self.cfg.detector[4:])

  def detect(self, image: np.ndarray) -> np.ndarray:
    """Nucleus centroids float32 [N, 2] (x, y) in pixels of `image` (uint8 [S, S, 3] at the target mpp)."""
    if self._predictor is not None:
      pts = self._predictor.predict_image(image, self.cfg.mpp)['points']
    else:
      from muse_jax.data import detect  # pylint: disable=g-import-not-at-top
      pts = detect.detect_nuclei(image, self.cfg.mpp, sigma_um=self.cfg.sigma_um,
                                 min_distance_um=self.cfg.min_distance_um)
    pts = np.asarray(pts, np.float32).reshape(-1, 2)
    s = self.cfg.roi_size
    inside = (pts[:, 0] >= 0) & (pts[:, 0] <= s - 1) & (pts[:, 1] >= 0) & (pts[:, 1] <= s - 1)
    return pts[inside]

  def process(self, task):
    from muse_jax.slide import reader  # pylint: disable=g-import-not-at-top
    sha, path, rois = task
    cfg = self.cfg
    s = cfg.roi_size
    counts = dict(rois=0, dropped=0, nuclei=0, tissue_px=0.0, hist={}, density_hist={})
    try:
      slide = reader.open_slide(path)
    except Exception as e:  # noqa: BLE001  (changed or vanished since it was planned)
      yield dead_letter(cfg.parts_dir, _failure(path, 'read', _describe_error(e)))
      return
    spill = epath.Path(cfg.parts_dir) / 'spill' / f'{sha[:32]}-{rois[0][1]:06d}-{rois[0][0]:06d}.bin'
    refs = []
    with slide, spill.open('wb') as f:
      for ix, iy, frac in rois:
        x, y = ix * s, iy * s
        try:
          image = slide.read_at_mpp(x, y, s, s, cfg.mpp)
          coords = self.detect(image)
        except Exception as e:  # noqa: BLE001  (a damaged tile loses its ROI, not the slide)
          yield dead_letter(cfg.parts_dir, _failure(path, 'roi', _describe_error(e), roi=[x, y]))
          continue
        n = int(len(coords))
        if n < cfg.min_nuclei:
          counts['dropped'] += 1
          continue
        counts['rois'] += 1
        counts['nuclei'] += n
        tissue_mm2 = frac * (s * cfg.mpp / 1000.0) ** 2
        counts['tissue_px'] += frac * s * s
        counts['hist'][n] = counts['hist'].get(n, 0) + 1
        if tissue_mm2 > 0:
          d = int(round(n / tissue_mm2, -2))  # nuclei / mm² of tissue, to the nearest 100
          counts['density_hist'][d] = counts['density_hist'].get(d, 0) + 1
        data = self._features.serialize_example({
            'image': image, 'coords': coords, 'mpp': np.float32(cfg.mpp), 'name': f'{_stem(path)}_x{x}_y{y}',
            'slide_sha256': sha, 'origin': np.array([x, y], np.int32), 'tissue': np.float32(frac)})
        refs.append((key_hash(record_key(sha, ix, iy)), (os.fspath(spill), f.tell(), len(data))))
        f.write(data)
    yield from refs
    self._progress.add(len(rois))
    yield beam.pvalue.TaggedOutput('stats', (sha, counts))


def merge_counts(items: Iterable[dict]) -> dict:
  """Sums per-task counts (`rois`, `dropped`, `nuclei`, `tissue_px`, histograms)."""
  out = dict(rois=0, dropped=0, nuclei=0, tissue_px=0.0, hist={}, density_hist={})
  for c in items:
    for k in ('rois', 'dropped', 'nuclei', 'tissue_px'):
      out[k] += c[k]
    for h in ('hist', 'density_hist'):
      for v, n in c[h].items():
        out[h][v] = out[h].get(v, 0) + n
  return out


def _write_json(items: list, path: str) -> None:
  epath.Path(path).write_text(json.dumps(items, sort_keys=True, default=str))


def num_shards(count: int, total_bytes: int, shard_bytes: int = SHARD_BYTES) -> int:
  """Shards for `count` records of `total_bytes` in all: about `shard_bytes` each, at least one record each."""
  return max(1, min(count, math.ceil(total_bytes / shard_bytes)))


def shard_of(hkey: int, shards: int) -> int:
  """The shard of a record: contiguous ranges of the key hash, so the shards in order hold the records in order."""
  return hkey * shards >> 64


def shard_path(data_dir: str, index: int, count: int) -> str:
  """TFDS's file name for shard `index` of `count` of the train split."""
  return f'{data_dir}/{DATASET}-train.array_record-{index:05d}-of-{count:05d}'


class WriteShard(beam.DoFn):
  """(shard id, [(key_hash, ref)]) -> the ArrayRecord shard, records in key-hash order, read back from the spill
  files one at a time; yields (index, records, bytes)."""

  def __init__(self, data_dir: str):
    self.data_dir = data_dir

  def process(self, item, non_empty):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    shard, refs = item
    refs = sorted(refs)
    index = non_empty.index(shard)  # empty shards are skipped: the files are numbered without gaps
    path = epath.Path(shard_path(self.data_dir, index, len(non_empty)))
    tmp = path.with_name(f'incomplete.{path.name}')
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), 'group_size:1')
    handles: dict = {}
    size = 0
    try:
      for _, (spill, offset, length) in refs:
        if spill not in handles:
          if len(handles) >= 32:
            handles.pop(next(iter(handles))).close()
          handles[spill] = epath.Path(spill).open('rb')
        f = handles[spill]
        f.seek(offset)
        data = f.read(length)
        writer.write(data)
        size += len(data)
    finally:
      writer.close()
      for f in handles.values():
        f.close()
    tmp.rename(path)
    yield index, len(refs), size


class CorpusTransform(beam.PTransform):
  """The pipeline: slide paths -> the ArrayRecord shards in `data_dir`; side outputs under `cfg.parts_dir`."""

  def __init__(self, slides: Sequence[str], cfg: CorpusConfig, data_dir: str):
    super().__init__()
    self.slides = list(slides)
    self.cfg = cfg
    self.data_dir = data_dir

  def expand(self, pbegin):
    cfg = self.cfg
    parts = cfg.parts_dir
    hashed = (pbegin
              | 'ListSlides' >> beam.Create(self.slides)
              | 'SpreadSlides' >> beam.Reshuffle()
              | 'HashSlides' >> beam.ParDo(HashSlide(parts)).with_outputs('failed', main='ok'))
    unique = (hashed.ok
              | 'GroupByContent' >> beam.GroupByKey()
              | 'KeepOnePerContent' >> beam.ParDo(KeepOne()).with_outputs('duplicate', main='kept'))
    planned = unique.kept | 'PlanROIs' >> beam.ParDo(PlanSlide(cfg)).with_outputs('failed', 'slide', main='task')
    read = (planned.task
            | 'SpreadTasks' >> beam.Reshuffle()
            | 'ReadAndDetect' >> beam.ParDo(ReadAndDetect(cfg)).with_outputs('failed', 'stats', main='ref'))
    refs = read.ref  # (key hash, (spill file, offset, length))
    count = refs | 'CountRecords' >> beam.combiners.Count.Globally()
    total = refs | 'RecordBytes' >> beam.Map(lambda r: r[1][2]) | 'TotalBytes' >> beam.CombineGlobally(sum)
    shards = count | 'NumShards' >> beam.Map(num_shards, beam.pvalue.AsSingleton(total), cfg.shard_bytes)
    grouped = (refs
               | 'AssignShards' >> beam.Map(lambda r, n: (shard_of(r[0], n), r), n=beam.pvalue.AsSingleton(shards))
               | 'GroupShards' >> beam.GroupByKey())
    non_empty = grouped | 'ShardIds' >> beam.Keys() | 'ShardIdList' >> beam.combiners.ToList()
    (grouped
     | 'WriteShards' >> beam.ParDo(WriteShard(self.data_dir),
                                   non_empty=beam.pvalue.AsSingleton(non_empty | 'SortShardIds' >> beam.Map(sorted)))
     | 'ShardsToList' >> beam.combiners.ToList()
     | 'WriteShardInfo' >> beam.Map(_write_json, path=f'{parts}/shards.json'))
    # Side outputs for the report: failures are written where they happen (`dead_letter`, the `failed` outputs are
    # not consumed further); the rest is small and gathered on one worker each.
    (unique.duplicate
     | 'DuplicatesToList' >> beam.combiners.ToList()
     | 'WriteDuplicates' >> beam.Map(_write_json, path=f'{parts}/duplicates.json'))
    (planned.slide
     | 'SlidesToList' >> beam.combiners.ToList()
     | 'WriteSlides' >> beam.Map(_write_json, path=f'{parts}/slides.json'))
    (read.stats
     | 'CountsPerSlide' >> beam.CombinePerKey(merge_counts)
     | 'CountsToList' >> beam.combiners.ToList()
     | 'WriteCounts' >> beam.Map(_write_json, path=f'{parts}/counts.json'))
    return pbegin.pipeline


# ------------------------------------------------------------------------------------------------ report


def _hist_stats(hist: dict) -> dict:
  """mean / median / p10 / p90 of a {value: count} histogram."""
  if not hist:
    return dict(mean=None, median=None, p10=None, p90=None)
  vals = np.array(sorted(float(v) for v in hist), np.float64)
  cnt = np.array([hist[k] for k in sorted(hist, key=float)], np.float64)
  cum = np.cumsum(cnt) / cnt.sum()

  def q(p):
    return float(vals[min(int(np.searchsorted(cum, p)), len(vals) - 1)])

  return dict(mean=round(float((vals * cnt).sum() / cnt.sum()), 2), median=q(0.5), p10=q(0.1), p90=q(0.9))


def make_summary(parts: dict, cfg: CorpusConfig, listed: int, seconds: float, splits: dict) -> dict:
  """The summary (per slide and in total) from the pipeline's side outputs."""
  counts = {sha: c for sha, c in parts['counts']}
  roi_mm2 = (cfg.roi_size * cfg.mpp / 1000.0) ** 2
  px_mm2 = (cfg.mpp / 1000.0) ** 2
  per_slide = []
  for f in sorted(parts['slides'], key=lambda r: r['slide']):
    c = counts.get(f['sha256'], merge_counts([]))
    tissue_mm2 = c['tissue_px'] * px_mm2
    per_slide.append(dict(
        f, rois=c['rois'], rois_dropped_few_nuclei=c['dropped'], nuclei=c['nuclei'],
        roi_tissue_mm2=round(tissue_mm2, 4), tissue_mm2=round(f['tissue_mm2'], 4),
        nuclei_per_roi=_hist_stats({int(k): v for k, v in c['hist'].items()}),
        nuclei_per_mm2_tissue=round(c['nuclei'] / tissue_mm2, 1) if tissue_mm2 else None))
  total = merge_counts(counts.values())
  tissue_mm2 = total['tissue_px'] * px_mm2
  failed_slides = sorted({f['slide'] for f in parts['failed'] if f['stage'] != 'roi'})
  return dict(
      dataset=DATASET, version=VERSION, options=cfg.options(), splits=splits,
      totals=dict(slides_listed=listed, slides_duplicate=len(parts['duplicates']),
                  slides_used=sum(1 for s in per_slide if s['rois']), slides_failed=len(failed_slides),
                  rois_failed=sum(1 for f in parts['failed'] if f['stage'] == 'roi'),
                  rois=total['rois'], rois_dropped_few_nuclei=total['dropped'], nuclei=total['nuclei'],
                  roi_area_mm2=round(total['rois'] * roi_mm2, 4), roi_tissue_mm2=round(tissue_mm2, 4),
                  nuclei_per_roi=_hist_stats({int(k): v for k, v in total['hist'].items()}),
                  nuclei_per_mm2_tissue=round(total['nuclei'] / tissue_mm2, 1) if tissue_mm2 else None,
                  seconds=round(seconds, 2)),
      histograms=dict(nuclei_per_roi={str(k): v for k, v in sorted(total['hist'].items(), key=lambda kv: int(kv[0]))},
                      nuclei_per_mm2_tissue={str(k): v for k, v in sorted(total['density_hist'].items(),
                                                                            key=lambda kv: int(kv[0]))}),
      slides=per_slide, duplicates=sorted(parts['duplicates'], key=lambda d: d['slide']),
      failed=sorted(parts['failed'], key=lambda f: (f['slide'], f['stage'], f.get('roi') or [])))


def plot_summary(summary: dict, path: str | os.PathLike) -> None:
  """Writes the PNG: histograms of nuclei per ROI and nuclei per mm² of tissue (all ROIs)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  t = summary['totals']
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, key, label in ((axes[0], 'nuclei_per_roi', 'nuclei per ROI'),
                         (axes[1], 'nuclei_per_mm2_tissue', 'nuclei per mm² of tissue')):
    h = summary['histograms'][key]
    vals = np.array([float(k) for k in h], np.float64)
    cnt = np.array(list(h.values()), np.float64)
    if len(vals):
      bins = min(40, max(len(vals), 1))
      ax.hist(vals, bins=bins, weights=cnt, color='#7b3f9e')
    ax.set_xlabel(label)
    ax.set_ylabel('ROIs')
  o = summary['options']
  fig.suptitle(f"{t['rois']} ROIs ({o['roi_size']} px at {o['mpp']:g} µm/px) from {t['slides_used']} slide(s), "
               f"{t['nuclei']} nuclei; median {t['nuclei_per_roi']['median']} per ROI, "
               f"{t['nuclei_per_mm2_tissue']} per mm² of tissue", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------ driver


@contextlib.contextmanager
def _beam_log_to_file(log_path: str | None):
  """Sends file descriptor 2 (where Beam's local workers and job service log) to `log_path` while the pipeline
  runs; yields a stream on the original stderr for the progress bar. None: leaves stderr alone."""
  if log_path is None:
    yield sys.stderr
    return
  sys.stderr.flush()
  saved = os.dup(2)
  log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(log_fd, 2)
  os.close(log_fd)
  stream = os.fdopen(os.dup(saved), 'w', buffering=1)
  try:
    yield stream
  finally:
    sys.stderr.flush()
    stream.close()
    os.dup2(saved, 2)
    os.close(saved)


def _progress_thread(progress_dir: pathlib.Path, stop: threading.Event, stream) -> threading.Thread:
  """Shows ROIs done / planned on `stream` from the workers' progress files until `stop` is set."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  def total(kind):
    n = 0
    for p in progress_dir.glob(f'{kind}-*'):
      if p.suffix != '.tmp':
        try:
          n += int(p.read_text() or 0)
        except (OSError, ValueError):
          pass
    return n

  def loop():
    bar = tqdm(total=0, unit=' ROIs', desc='ROIs read and detected', file=stream, mininterval=1.0,
               dynamic_ncols=True)
    while True:
      done = stop.wait(0.5)
      planned, n = total('planned'), total('done')
      if planned != bar.total:
        bar.total = planned
        bar.refresh()
      bar.update(n - bar.n)
      if done:
        break
    bar.close()

  t = threading.Thread(target=loop, daemon=True)
  t.start()
  return t


def _is_direct(options) -> bool:
  from apache_beam.options.pipeline_options import StandardOptions  # pylint: disable=g-import-not-at-top
  runner = options.view_as(StandardOptions).runner
  return runner is None or 'direct' in str(runner).lower()


def pipeline_options(beam_args: Sequence[str]):
  """Beam `PipelineOptions` from the command's leftover flags; DirectRunner on all cores unless told otherwise.

  Raises:
    UserError: a flag that is no Beam pipeline option.
  """
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top
  args = list(beam_args)
  known = PipelineOptions(args).get_all_options(retain_unknown_options=False)
  unknown = [a for a in args if a.startswith('--')
             and a[2:].split('=')[0] not in known]
  if unknown:
    raise UserError('unknown flag (neither this command\'s nor a Beam pipeline option)', 'command line',
                    f'{" ".join(unknown)}; see python -m muse_jax.data.build_corpus --help')
  names = {a[2:].split('=')[0] for a in args if a.startswith('--')}
  if 'direct_running_mode' not in names and 'runner' not in names:
    args += ['--direct_running_mode=multi_processing']
  if 'direct_num_workers' not in names and 'runner' not in names:
    args += [f'--direct_num_workers={os.cpu_count() or 1}']
  if 'default_sdk_harness_log_level' not in names:
    args += ['--default_sdk_harness_log_level=WARNING']  # workers: warnings and errors only
  return PipelineOptions(args)


def validate(slides: Sequence[str], out: str, *, mpp: float, roi_size: int, min_tissue: float, detector: str,
             min_nuclei: int, rois_per_task: int, sigma_um: float, min_distance_um: float,
             shard_mb: float = SHARD_BYTES / 2**20) -> tuple[list[str], dict]:
  """Checks every argument before any slide is read. Returns (slide paths, CorpusConfig keyword arguments).

  Raises:
    UserError naming the flag.
  """
  mpp = cli.mpp(mpp, '--mpp')
  roi_size = cli.positive_int(roi_size, '--roi_size')
  if not 16 <= roi_size <= MAX_ROI_SIZE:
    raise UserError(f'must be in [16, {MAX_ROI_SIZE}] px', '--roi_size', f'got {roi_size}')
  min_tissue = cli.in_range(min_tissue, '--min_tissue', 0.0, 1.0)
  min_nuclei = cli.positive_int(min_nuclei, '--min_nuclei', allow_zero=True)
  rois_per_task = cli.positive_int(rois_per_task, '--rois_per_task')
  shard_bytes = int(cli.positive(shard_mb, '--shard_mb', upper=16384, unit='MiB') * 2**20)
  sigma_um = cli.positive(sigma_um, '--sigma_um', upper=50.0, unit='µm')
  min_distance_um = cli.positive(min_distance_um, '--min_distance_um', allow_zero=True, upper=50.0, unit='µm')
  if detector != 'classical':
    kind, _, ckpt = detector.partition(':')
    if kind != 'ndc' or not ckpt:
      raise UserError('unknown detector', '--detector', f'got {detector!r}, expected {DETECTOR_FORMS}')
    from muse_jax.ndc import infer  # pylint: disable=g-import-not-at-top
    p, _ = infer.read_checkpoint_config(ckpt)  # UserError for a missing or foreign checkpoint
    detector = f'ndc:{os.path.abspath(os.fspath(p))}'
  o = epath.Path(out)
  if o.exists() and not o.is_dir():
    raise UserError('not a folder', '--out', f'{o} is a file')
  paths = list_slides(slides)
  return paths, dict(mpp=mpp, roi_size=roi_size, min_tissue=min_tissue, detector=detector, min_nuclei=min_nuclei,
                     rois_per_task=rois_per_task, sigma_um=sigma_um, min_distance_um=min_distance_um,
                     shard_bytes=max(shard_bytes, 1))


def _read_parts(parts: epath.Path) -> dict:
  out = {}
  for name in ('duplicates', 'slides', 'counts', 'shards'):
    p = parts / f'{name}.json'
    out[name] = json.loads(p.read_text()) if p.exists() else []
  failed = parts / 'failed'
  out['failed'] = [json.loads(p.read_text()) for p in failed.glob('*.json')] if failed.exists() else []
  return out


def build(slides: Sequence[str], out: str, *, mpp: float = 0.5, roi_size: int = 1024, min_tissue: float = 0.5,
          detector: str = 'classical', min_nuclei: int = 1, rois_per_task: int = 16, sigma_um: float = 3.0,
          min_distance_um: float = 3.0, shard_mb: float = SHARD_BYTES / 2**20, overwrite: bool = False,
          beam_args: Sequence[str] = (), progress: bool | None = None) -> dict:
  """Builds the corpus into the TFDS data dir `out` (see the module docstring).

  Args:
    slides: files, folders or globs (`list_slides`).
    out: TFDS data dir; the records go to `out/wsi_corpus/1.0.0/`, the report to `out/`.
    mpp, roi_size, min_tissue, detector, min_nuclei, rois_per_task, sigma_um, min_distance_um: `CorpusConfig`.
    shard_mb: target size of one ArrayRecord shard, MiB.
    overwrite: rebuild when `out` already holds a corpus (else a UserError).
    beam_args: Beam pipeline options (`--runner=...`, `--direct_num_workers=...`, ...).
    progress: show a progress bar (None: on the DirectRunner).

  Returns:
    The summary (also `out/summary.json`); `summary['failed']` lists the dead letters.

  Raises:
    UserError: a bad argument, an existing corpus without `overwrite`, or no ROI at all.
  """
  import muse_jax  # pylint: disable=g-import-not-at-top
  paths, kw = validate(slides, out, mpp=mpp, roi_size=roi_size, min_tissue=min_tissue, detector=detector,
                       min_nuclei=min_nuclei, rois_per_task=rois_per_task, sigma_um=sigma_um,
                       min_distance_um=min_distance_um, shard_mb=shard_mb)
  options = pipeline_options(beam_args)
  root = epath.Path(out)
  data_root = root / DATASET
  final_dir = data_root / VERSION
  if final_dir.exists() and not overwrite:
    raise UserError('a corpus already exists', str(data_root), 'pass --overwrite to rebuild it, or another --out')
  if data_root.exists():  # an older corpus (--overwrite) or what a stopped build left
    data_root.rmtree()
  for name in (FAILED_FILE, SUMMARY_FILE, HISTOGRAM_FILE, BEAM_LOG_FILE):
    if (root / name).exists():
      (root / name).unlink()
  root.mkdir(parents=True, exist_ok=True)
  parts = root / PARTS_DIR
  if parts.exists():
    parts.rmtree()
  parts.mkdir()
  (parts / 'failed').mkdir()
  (parts / 'spill').mkdir()
  work_dir = data_root / f'incomplete.{VERSION}'  # renamed to VERSION once the metadata is written
  work_dir.mkdir(parents=True)
  show = _is_direct(options) and '://' not in str(root) if progress is None else progress
  progress_dir = parts / 'progress'
  if show:
    progress_dir.mkdir()
  cfg = CorpusConfig(**kw, parts_dir=os.fspath(parts), progress_dir=os.fspath(progress_dir) if show else None)
  t0 = time.perf_counter()
  stop = threading.Event()
  log = os.fspath(root / BEAM_LOG_FILE) if _is_direct(options) and '://' not in str(root) else None
  options.view_as(TypeOptions).pipeline_type_check = False  # tagged outputs of several types
  with _beam_log_to_file(log) as stream:
    bar = _progress_thread(pathlib.Path(progress_dir), stop, stream) if show else None
    try:
      with beam.Pipeline(options=options) as p:
        _ = p | 'BuildCorpus' >> CorpusTransform(paths, cfg, os.fspath(work_dir))
    finally:
      stop.set()
      if bar is not None:
        bar.join()
  seconds = time.perf_counter() - t0
  got = _read_parts(parts)
  if not got['shards']:
    _write_failed(root, got['failed'])
    data_root.rmtree()
    parts.rmtree()
    raise UserError('no ROI in any slide', '--slides', f'{len(paths)} slide(s) listed, {len(got["failed"])} '
                    f'failure(s) written to {root / FAILED_FILE}')
  # TFDS metadata (dataset_info.json, features.json) for the shards: readable by tfds.data_source / tfds:DATA_DIR
  shards = sorted(got['shards'])  # (index, records, bytes)
  split = tfds.core.SplitInfo(name='train', shard_lengths=[n for _, n, _ in shards],
                              num_bytes=sum(b for _, _, b in shards))
  tfds.folder_dataset.write_metadata(
      data_dir=work_dir, features=corpus_features(), split_infos=[split], version=VERSION, check_data=False,
      description=('Pretraining ROIs cut from whole slides over their tissue, with nucleus centroids (x, y) from an '
                   'offline detector (python -m muse_jax.data.build_corpus).'))
  work_dir.rename(final_dir)
  splits = {'train': sum(n for _, n, _ in got['shards'])}
  summary = make_summary(got, cfg, len(paths), seconds, splits)
  _write_failed(root, summary['failed'])
  (root / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + '\n')
  if '://' not in str(root):  # matplotlib writes local files
    plot_summary(summary, os.fspath(root / HISTOGRAM_FILE))
  prov = dict(dataset=DATASET, slides=paths, options=cfg.options(), muse_jax_version=muse_jax.__version__,
              created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
  (final_dir / PROVENANCE_FILE).write_text(json.dumps(prov, indent=1) + '\n')
  parts.rmtree()
  return summary


def _write_failed(root: epath.Path, failed: list) -> None:
  rows = sorted(failed, key=lambda f: (f['slide'], f['stage'], f.get('roi') or []))
  (root / FAILED_FILE).write_text(''.join(json.dumps(f, sort_keys=True) + '\n' for f in rows))


def _main(argv: list[str] | None) -> int:
  p = cli.ArgumentParser(prog='python -m muse_jax.data.build_corpus', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog='Any other --flag is passed to Beam as a pipeline option.')
  p.add_argument('--slides', required=True, nargs='+', help='slide files, folders or globs (a bucket: mount it)')
  p.add_argument('--out', required=True, help='TFDS data dir to write (records, failed.jsonl, summary.json/png)')
  p.add_argument('--mpp', type=float, default=0.5, help='µm/px of the ROIs (default 0.5)')
  p.add_argument('--roi_size', type=int, default=1024, help='ROI side in px at --mpp (default 1024)')
  p.add_argument('--min_tissue', type=float, default=0.5, help='minimum tissue fraction of a ROI (default 0.5)')
  p.add_argument('--detector', default='classical', help=f'{DETECTOR_FORMS} (default classical)')
  p.add_argument('--min_nuclei', type=int, default=1, help='ROIs with fewer nuclei are dropped (default 1)')
  p.add_argument('--rois_per_task', type=int, default=16, help='ROIs per Beam work item (default 16)')
  p.add_argument('--sigma_um', type=float, default=3.0, help='classical detector scale, µm')
  p.add_argument('--min_distance_um', type=float, default=3.0, help='classical detector minimum peak distance, µm')
  p.add_argument('--shard_mb', type=float, default=SHARD_BYTES / 2**20,
                 help=f'target size of one ArrayRecord shard, MiB (default {SHARD_BYTES >> 20})')
  p.add_argument('--overwrite', action='store_true', help='rebuild a corpus that exists in --out')
  p.add_argument('--no_progress', action='store_true', help='no progress bar on the DirectRunner')
  a, beam_args = p.parse_known_args(argv)
  summary = build(a.slides, a.out, mpp=a.mpp, roi_size=a.roi_size, min_tissue=a.min_tissue, detector=a.detector,
                  min_nuclei=a.min_nuclei, rois_per_task=a.rois_per_task, sigma_um=a.sigma_um,
                  min_distance_um=a.min_distance_um, shard_mb=a.shard_mb, overwrite=a.overwrite, beam_args=beam_args,
                  progress=False if a.no_progress else None)
  t = summary['totals']
  for f in summary['failed']:
    where = f' roi {f["roi"]}' if f.get('roi') else ''
    print(f'FAILED {f["slide"]}{where} ({f["stage"]}): {f["reason"]}', file=sys.stderr)
  print(f'{DATASET} -> {a.out}: {t["rois"]} ROIs, {t["nuclei"]} nuclei (median {t["nuclei_per_roi"]["median"]} per '
        f'ROI, {t["nuclei_per_mm2_tissue"]} per mm² of tissue) from {t["slides_used"]} of {t["slides_listed"]} '
        f'slides ({t["slides_duplicate"]} duplicate, {t["slides_failed"]} failed: {FAILED_FILE}) in '
        f'{t["seconds"]:.1f} s; pretrain with --config.data.source=tfds:{a.out}')
  return cli.EXIT_PARTIAL if summary['failed'] else cli.EXIT_OK


def main(argv: list[str] | None = None) -> int:
  """The CLI; a user error is one line on stderr and exit code 2 (`cli.run`)."""
  logging.getLogger('apache_beam').setLevel(logging.WARNING)
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
