"""Data layer: readers, nucleus detection, ArrayRecord builders, pretraining views and evaluation tiles.

Entry points:
* `bundled_sample_dir()`: a small BRCA-M2C subset shipped inside the package (BRCA-M2C layout, with its LICENSE);
* `load_labelled(dataset, data_dir, split)`: labelled `readers.Sample`s from prepared records or a raw folder;
* `pipeline.make_pretrain_dataset(...)`: the Grain pretraining pipeline (MPP-based multi-view cropping);
* `build_corpus.build(...)` / `python -m muse_jax.data.build_corpus`: a pretraining corpus cut from whole slides
  (Apache Beam; nucleus-annotated ROIs as ArrayRecord, read back with the `tfds:DATA_DIR` source);
* `eval_tiles.make_eval_tiles(...)`: fixed evaluation tiles (spec §5.1).
"""

from __future__ import annotations

import pathlib

from muse_jax.data import readers
from muse_jax.data.readers import BRCA_CLASSES, Sample

__all__ = ['BRCA_CLASSES', 'Sample', 'bundled_sample_dir', 'load_labelled', 'readers']


def bundled_sample_dir() -> pathlib.Path:
  """Folder of the bundled BRCA-M2C subset (6 train, 2 val, 3 test tiles; BRCA-M2C layout; BSD-3 LICENSE)."""
  return pathlib.Path(__file__).resolve().parent / 'sample'


def _records_to_samples(src, split: str, mpp_default: float) -> list[Sample]:
  out = []
  for i in range(len(src)):
    r = src[i]
    name = r.get('name', f'{split}_{i}')
    name = name.decode() if isinstance(name, bytes) else str(name)
    coords = r['coords']
    classes = r.get('classes', None)
    if classes is None:
      classes = [-1] * len(coords)
    out.append(Sample(r['image'], coords, classes, float(r.get('mpp', mpp_default)), name, split))
  return out


def load_labelled(dataset: str, data_dir: str | pathlib.Path | None, split: str, **kwargs) -> list[Sample]:
  """Loads labelled samples of one split.

  Args:
    dataset: 'brca_m2c' (BRCA-M2C layout or prepared `brca_m2c` records) or 'folder' (a generic labelled folder;
      `kwargs` go to `readers.read_labelled_folder`, `mpp=` is required).
    data_dir: None or 'bundled' (the bundled sample); a raw BRCA-M2C folder (has `brca_ds_<split>.txt`); or a
      TFDS data dir holding records prepared by `python -m muse_jax.data.prepare` (`<data_dir>/<dataset>/...`).
    split: 'train', 'val', 'test' (or 'all' for raw folders).

  Returns:
    `Sample`s with classes 0..K-1 (-1 unknown).
  """
  if dataset == 'folder':
    if data_dir is None:
      raise ValueError('load_labelled("folder", ...): data_dir (the image folder) is required.')
    return readers.read_labelled_folder(data_dir, split=split, **kwargs)
  if data_dir is None or str(data_dir) == 'bundled':
    data_dir = bundled_sample_dir()
  data_dir = pathlib.Path(data_dir)
  if dataset == 'brca_m2c' and (data_dir / 'brca_ds_train.txt').exists():
    return readers.read_brca_m2c(data_dir, split, **kwargs)
  if (data_dir / dataset).is_dir():
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    src = tfds.data_source(dataset, data_dir=str(data_dir), split=split)
    return _records_to_samples(src, split, readers.BRCA_MPP)
  raise ValueError(f'load_labelled: {data_dir} is neither a raw {dataset} folder nor a TFDS data dir with '
                   f'{dataset}/ in it.')
