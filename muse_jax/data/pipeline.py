"""Grain pretraining pipeline: region records -> MUSE multi-view batches (spec §3.1 to §3.3).

    cfg = pipeline.default_data_config()            # every data knob lives here
    source = pipeline.open_pretrain_source(cfg)     # from cfg.source
    ds = pipeline.make_pretrain_dataset(source, cfg, seed=0, batch_size=8)
    it = iter(ds); batch = next(it)                 # host-local numpy batch; it.get_state() / it.set_state(s)

Batch layout (host-local, numpy; `B` = per-host batch):
`{'global': {'images': uint8 [B,Vg,G,G,3], 'coords': f32 [B,Vg,Mg,2], 'ids': i32 [B,Vg,Mg] (-1 = pad),
'mask': bool [B,Vg,Mg], 'mpp': f32 [B,Vg]}, 'local': {same with Vl, L, Ml}}`. With `cfg.augment_on = 'device'`
`images` is replaced by the unresized `crops` uint8 [B,V,S,S,3], `box` f32 [B,V,3] and `geom` i32 [B,V,3], which the
jitted step renders (`muse_jax.pretrain.augment`); `batch_layout` gives the shapes. `ids` identify a nucleus within its
region (same nucleus, same id in every view of that region). `to_global_arrays` turns it into global `jax.Array`s
sharded over a mesh axis.

Determinism: records are shuffled with `seed`, every record gets its own generator from Grain's `random_map`
(derived from the seed and the record's position), so the same seed gives the same batches for any
`num_workers`; the iterator state (`get_state`/`set_state`) restores the exact position.
Multi-host: host `process_index` reads records `process_index::process_count` only.
Scripts that use `num_workers > 0` need an `if __name__ == '__main__':` guard (workers re-import `__main__`);
absl flags are marked parsed here if nobody parsed them (Grain workers read them).

Sources (`cfg.source`):
* `'bundled'`: the bundled BRCA-M2C sample's train + val tiles (never test) with their labelled points as nucleus
  positions, at 0.5 µm/px;
* `'brca:PATH'`: the same from a full BRCA-M2C folder (train + val);
* `'tfds:DATA_DIR'` or `'tfds:NAME@DATA_DIR'`: records prepared by `python -m muse_jax.data.prepare` (`regions` or
  `brca_m2c`) or built from whole slides by `python -m muse_jax.data.build_corpus` (`wsi_corpus`; its extra fields
  `slide_sha256`, `origin`, `tissue` are not read); without NAME, DATA_DIR must hold exactly one prepared dataset;
  `split` from `cfg.split`; read with `tfds.data_source`;
* `'folder:PATH'`: image files (mpp `cfg.region_mpp`, required) with nucleus points from sidecar CSV/GeoJSON files
  or, without them, from the classical detector (`muse_jax.data.detect`; run per read, so prepare records for speed);
* a **union** of the above, joined with `|`, e.g. `'brca:/data/BRCA-M2C|folder:/data/slide_regions'`: the records of
  every part, one after the other (`UnionSource`), shuffled together. In a union every record carries its own `mpp`
  (BRCA-M2C 0.5, tfds records theirs, folder parts `cfg.region_mpp`), so `cfg.region_mpp` only names the folder
  parts' resolution and does not override the other parts' records. A part may appear once per union.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from muse_jax import cli
from muse_jax.data import readers, views


def default_data_config(variant: str = 'default') -> ml_collections.ConfigDict:
  """The pretraining data config.

  Args:
    variant: 'default' (2 x 224 global, 8 x 96 local) or 'lfov' (2 x 512, 8 x 208; large field of view).
  """
  c = ml_collections.ConfigDict()
  c.source = 'bundled'          # see the module docstring
  c.split = 'train'             # split of tfds records
  c.global_size = 224           # px
  c.local_size = 96             # px
  c.n_global = 2
  c.n_local = 8
  c.mpp_range = (0.25, 0.5)     # µm/px, for every view
  c.mpp_dist = 'uniform'        # 'uniform' | 'loguniform' | 'discrete'
  c.mpp_choices = (0.25, 0.5)   # for 'discrete'
  c.region_mpp = ml_collections.FieldReference(None, field_type=float)  # None: the record's own 'mpp'
  c.local_in_global = True      # centre local views inside a random global view (shared nuclei)
  c.global_in_global = False    # centre global views 2.. inside the first global view (shared nuclei)
  c.pad_mode = 'reflect'        # fill for views larger than the region: 'reflect' | 'constant' (white)
  c.max_nuclei_global = 256
  c.max_nuclei_local = 64
  # Geometric.
  c.flips = True                # random horizontal and vertical flips
  c.rot90 = True                # random multiples of 90 degrees
  # Photometric. color_aug: 'rgb' (DINO colour jitter), 'hed' (H&E stain jitter of strength stain_jitter) or
  # 'none'; either is applied with probability color_jitter_p.
  c.color_aug = 'rgb'
  c.color_jitter_p = 0.8
  c.brightness = 0.4
  c.contrast = 0.4
  c.saturation = 0.2
  c.hue = 0.1
  c.grayscale_p = 0.2
  c.blur_p = (1.0, 0.1, 0.5)    # global view 1, global view 2, local views
  c.blur_sigma = (0.1, 2.0)      # px of the view (DINO), used when blur_sigma_um is None
  c.blur_sigma_um = ml_collections.FieldReference(None, field_type=tuple)  # (lo, hi) µm: sigma_px = U / view mpp
  c.solarize_p = 0.2            # second global view only
  c.stain_jitter = 0.0          # H&E stain jitter strength (color_aug 'hed'; with 'rgb', > 0 adds it before)
  # Where the resize and the photometric augmentations run: 'host' (Grain workers, numpy + PIL) or 'device' (in
  # the jitted step, keyed by the step's RNG; the host only crops and packs; see muse_jax.data.views).
  c.augment_on = 'host'
  # 'device' mode: crop buffer side = ceil(view size * factor) + 5 px; None = max view mpp / region_mpp (2.0 when
  # the records carry their own mpp). Views with a wider field of view are reduced on the host first.
  c.device_crop_factor = ml_collections.FieldReference(None, field_type=float)
  # Loading.
  c.num_workers = 0             # Grain worker processes (mp_prefetch); 0 = in-process
  c.prefetch_buffer = 2         # batches buffered per worker process
  c.read_threads = 4            # threads computing batches (in-process, and inside each worker)
  c.read_buffer = 4             # batches those threads may compute ahead
  c.detector = ml_collections.ConfigDict({'min_distance_um': 3.0, 'sigma_um': 3.0, 'threshold_scale': 1.0})
  if variant == 'lfov':
    c.global_size, c.local_size = 512, 208
    c.max_nuclei_global, c.max_nuclei_local = 1024, 256
  elif variant != 'default':
    raise ValueError(f'data config variant {variant!r}: expected "default" or "lfov".')
  return c


@dataclasses.dataclass
class RegionList:
  """An in-memory random-access source of region records (`image`, `coords`, `mpp`, `name`)."""
  records: list

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> dict:
    return self.records[i]


@dataclasses.dataclass
class FolderRegions:
  """Lazy source over image files: points from a sidecar file, else from the classical detector."""
  paths: Sequence[str]
  mpp: float
  detector_kwargs: dict

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    from muse_jax.data import detect  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(self.paths[i])
    image = readers.read_image(path)
    pts = readers.find_points_file(path)
    if pts is not None:
      coords, _ = readers.read_points(pts, None, unknown_class='ignore')
    else:
      coords = detect.detect_nuclei(image, self.mpp, **self.detector_kwargs)
    coords, _ = readers.drop_outside(coords, np.full(len(coords), -1), image.shape[:2], str(path))
    return {'image': image, 'coords': coords, 'mpp': np.float32(self.mpp), 'name': path.stem}


@dataclasses.dataclass
class UnionSource:
  """Random-access concatenation of region sources; record `i` of the union is record `i - offset` of one part.

  Every record keeps its own `mpp` (`make_pretrain_dataset` then ignores `region_mpp` for the views).
  """
  parts: Sequence[Any]
  names: Sequence[str]

  def __post_init__(self):
    self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f'UnionSource: index {i} outside [0, {len(self)}).')
    k = int(np.searchsorted(self.offsets, i, side='right')) - 1
    rec = dict(self.parts[k][i - self.offsets[k]])
    if 'mpp' not in rec:
      raise ValueError(f'UnionSource: record {i} of part {self.names[k]!r} has no "mpp" (each record of a union '
                       'must carry its own).')
    return rec


def samples_to_regions(samples: Sequence[readers.Sample]) -> RegionList:
  """Wraps `Sample`s as region records (classes dropped)."""
  return RegionList([{'image': s.image, 'coords': s.coords, 'mpp': np.float32(s.mpp), 'name': s.name}
                     for s in samples])


SOURCE_FORMS = '"bundled", "brca:PATH", "tfds:DATA_DIR", "tfds:NAME@DATA_DIR" or "folder:PATH" (or a union a|b)'
_WHERE = 'config.data.source'


def parse_source(src: str) -> list[tuple[str, str]]:
  """Splits a source string into `(kind, arg)` parts (`('bundled', '')`, `('brca', PATH)`, `('tfds', ARG)`,
  `('folder', PATH)`); raises `cli.UserError` naming `config.data.source` on a malformed one. Reads nothing."""
  src = str(src)
  if not src.strip():
    raise cli.UserError('not set', _WHERE, f"pass --config.data.source=... ({SOURCE_FORMS}); 'bundled' is the "
                        '11-tile sample inside the package, used only when named')
  names = [p.strip() for p in src.split('|')]
  if any(not p for p in names) or len(set(names)) != len(names):
    raise cli.UserError('a union needs non-empty, distinct parts joined by "|"', _WHERE, f'got {src!r}')
  out = []
  for name in names:
    kind, sep, arg = name.partition(':')
    if name == 'bundled':
      out.append(('bundled', ''))
    elif sep and kind in ('brca', 'tfds', 'folder') and arg.strip():
      out.append((kind, arg.strip()))
    else:
      raise cli.UserError(f'unknown data source {name!r}', _WHERE, f'expected {SOURCE_FORMS}')
  return out


def prepared_datasets(data_dir: str) -> list[str]:
  """Names of the datasets prepared in the TFDS data dir `data_dir` (`<data_dir>/<name>/<version>/
  dataset_info.json`), sorted."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  root = epath.Path(data_dir)
  out = []
  for d in root.iterdir() if root.is_dir() else []:
    if d.is_dir() and any((v / 'dataset_info.json').exists() for v in d.iterdir() if v.is_dir()):
      out.append(d.name)
  return sorted(out)


def resolve_tfds(arg: str) -> tuple[str, str]:
  """`'NAME@DATA_DIR'` or `'DATA_DIR'` -> `(name, data_dir)`.

  Without a name, `DATA_DIR` must hold exactly one prepared dataset (`python -m muse_jax.data.prepare`), which is
  used. Raises `cli.UserError` (one line, listing the prepared datasets) for a missing folder, an unknown name, or
  an ambiguous or empty `DATA_DIR`.
  """
  name, _, data_dir = arg.rpartition('@') if '@' in arg else ('', '', arg)
  local = '://' not in data_dir
  if local and not pathlib.Path(data_dir).is_dir():
    raise cli.UserError('tfds data dir not found', _WHERE, f'{data_dir!r} is not a folder')
  have = prepared_datasets(data_dir)
  hint = ('prepare one with `python -m muse_jax.data.prepare --dataset regions|brca_m2c --source ... --out DATA_DIR` '
          'or build one from whole slides with `python -m muse_jax.data.build_corpus --slides ... --out DATA_DIR`')
  if not name:
    if len(have) == 1:
      return have[0], data_dir
    if not have:
      raise cli.UserError('no prepared dataset in the tfds data dir', _WHERE, f'{data_dir!r}; {hint}')
    raise cli.UserError('the tfds data dir holds several prepared datasets; name one', _WHERE,
                        f'{data_dir!r} holds {", ".join(have)}: use tfds:NAME@{data_dir}')
  if name not in have and (have or local):  # (an unlistable remote dir is left to tfds)
    raise cli.UserError(f'no prepared dataset {name!r} in the tfds data dir', _WHERE,
                        f'{data_dir!r} holds {", ".join(have) if have else "none"}' + ('' if have else f'; {hint}'))
  return name, data_dir


def check_source(data_cfg: ml_collections.ConfigDict) -> None:
  """Checks `data_cfg.source` without reading records: its form, that its local paths exist, that a tfds part
  names (or implies) a prepared dataset, and that folder parts have `region_mpp`. Raises `cli.UserError`."""
  for kind, arg in parse_source(data_cfg.source):
    if kind in ('brca', 'folder') and '://' not in arg and not pathlib.Path(arg).is_dir():
      raise cli.UserError(f'{kind} folder not found', _WHERE, f'{arg!r} is not a folder')
    if kind == 'tfds':
      resolve_tfds(arg)
    if kind == 'folder' and data_cfg.region_mpp is None:
      raise cli.UserError('a folder source needs the images\' µm/px', 'config.data.region_mpp',
                          f'set it for {kind}:{arg}')


def open_pretrain_source(data_cfg: ml_collections.ConfigDict):
  """Opens the random-access region source named by `data_cfg.source` (see the module docstring)."""
  src = str(data_cfg.source)
  parsed = parse_source(src)
  if len(parsed) > 1:
    names = [p.strip() for p in src.split('|')]
    parts = []
    for name in names:
      sub = ml_collections.ConfigDict(data_cfg.to_dict())
      sub.source = name
      part = open_pretrain_source(sub)
      if len(part) == 0:
        raise cli.UserError(f'part {name!r} has no records', _WHERE, f'got {src!r}')
      parts.append(part)
    return UnionSource(parts, names)
  kind, arg = parsed[0]
  if kind in ('bundled', 'brca'):
    from muse_jax.data import bundled_sample_dir  # pylint: disable=g-import-not-at-top
    root = bundled_sample_dir() if kind == 'bundled' else pathlib.Path(arg)
    return samples_to_regions(readers.read_brca_m2c(root, 'train') + readers.read_brca_m2c(root, 'val'))
  if kind == 'tfds':
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, data_dir = resolve_tfds(arg)
    return tfds.data_source(name, data_dir=data_dir, split=str(data_cfg.split))
  if data_cfg.region_mpp is None:
    raise cli.UserError("a folder source needs the images' µm/px", 'config.data.region_mpp', f'set it for {src!r}')
  paths = [str(p) for p in readers.list_images(arg)]
  if not paths:
    raise cli.UserError('no image files found', _WHERE, f'in {arg!r}')
  return FolderRegions(paths, float(data_cfg.region_mpp), dict(data_cfg.detector))


class _MakeViews(grain.transforms.RandomMap):
  """Grain transform: one region record -> one multi-view example (per-record generator from Grain)."""

  def __init__(self, cfg: dict):
    self.cfg = cfg

  def random_map(self, element: Any, rng: np.random.Generator) -> dict:
    return views.make_views(element, rng, self.cfg)


def _plain_cfg(data_cfg) -> dict:
  d = data_cfg.to_dict() if hasattr(data_cfg, 'to_dict') else dict(data_cfg)
  return d


def make_pretrain_dataset(source, data_cfg: ml_collections.ConfigDict, *, seed: int, batch_size: int,
                          process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The pretraining dataset: shuffled, repeated, multi-view, batched; a checkpointable Grain IterDataset.

  Args:
    source: random-access records (`open_pretrain_source`), each `image` uint8 [H,W,3], `coords` f32 [N,2],
      `mpp` (unless `data_cfg.region_mpp` is set).
    data_cfg: `default_data_config()`.
    seed: shuffling and augmentation seed.
    batch_size: per-host batch size (global batch / process_count).
    process_index, process_count: this host's shard of the records.

  Returns:
    An IterDataset of host-local batches (module docstring), infinite; `iter(ds)` has `get_state`/`set_state`.
  """
  if len(source) == 0:
    raise ValueError('make_pretrain_dataset: the source has no records.')
  if process_count > len(source):
    raise ValueError(f'{process_count} processes but only {len(source)} records.')
  cfg = _plain_cfg(data_cfg)
  if isinstance(source, UnionSource):
    cfg['region_mpp'] = None  # every union record carries its own mpp
  ds = grain.MapDataset.source(source)[process_index::process_count]
  ds = ds.seed(seed).shuffle().repeat()
  ds = ds.random_map(_MakeViews(cfg))
  ds = ds.batch(batch_size, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(cfg['read_threads']),
                                            prefetch_buffer_size=int(cfg['read_buffer'])))
  if cfg['num_workers'] > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags (ENV.md gotcha 2); harmless under absl.app.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg['num_workers']),
                                                     per_worker_buffer_size=int(cfg['prefetch_buffer'])))
  return it


def batch_layout(data_cfg, batch_size: int) -> dict[str, dict[str, tuple[tuple[int, ...], Any]]]:
  """`{group: {field: (shape, numpy dtype)}}` of a host batch of `batch_size` regions (the module docstring's
  layout; with `augment_on='device'`, `crops` [B, V, S, S, 3] uint8, `box` f32 [B, V, 3] and `geom` i32 [B, V, 3]
  instead of `images`). Used for abstract batches (`muse_jax.tools.aot`) and synthetic data."""
  d = data_cfg
  groups = [('global', d['n_global'], d['global_size'], d['max_nuclei_global'])]
  if d['n_local'] > 0:
    groups.append(('local', d['n_local'], d['local_size'], d['max_nuclei_local']))
  device = views.augment_on(d) == 'device'
  out = {}
  for name, v, s, m in groups:
    g = {'coords': ((batch_size, v, m, 2), np.float32), 'ids': ((batch_size, v, m), np.int32),
         'mask': ((batch_size, v, m), np.bool_), 'mpp': ((batch_size, v), np.float32)}
    if device:
      buf = views.crop_buffer_size(s, d)
      g.update(crops=((batch_size, v, buf, buf, 3), np.uint8), box=((batch_size, v, 3), np.float32),
               geom=((batch_size, v, 3), np.int32))
    else:
      g['images'] = ((batch_size, v, s, s, 3), np.uint8)
    out[name] = g
  return out


def to_global_arrays(batch: dict, mesh, axis: str | tuple[str, ...] = 'data') -> dict:
  """Host-local numpy batch -> global `jax.Array`s sharded over `axis` of `mesh` (leading batch dimension)."""
  import jax  # pylint: disable=g-import-not-at-top
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
