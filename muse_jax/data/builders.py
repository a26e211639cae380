"""TFDS builders that write ArrayRecord without TensorFlow: `brca_m2c` and `regions`.

Images are stored as `tfds.features.Tensor(uint8, [H, W, 3], encoding=ZLIB)` because writing `Image` features
needs TensorFlow. Records are read back with `tfds.data_source(name, data_dir=..., split=...)` (no builder import
needed) and fed to Grain.

Features:
* `brca_m2c` (splits train / val / test): `image` uint8 [H,W,3]; `coords` float32 [N,2] (x, y) pixels; `classes`
  int32 [N] (0 lymphocyte, 1 tumor, 2 stromal); `mpp` float32; `name` string.
* `regions` (split train): `image`, `coords` (nucleus positions: labels, sidecar detections or the classical
  detector), `mpp`, `name`.

Bad files are reported and skipped (`builder.errors`, a list of `(path, message)`); `prepare` prints a summary.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds

from muse_jax.data import readers

_CITATION = """@inproceedings{abousamra2021MCSpatNet,
  author = {Shahira Abousamra and others}, title = {Multi-Class Cell Detection Using Spatial Context
  Representation}, booktitle = {ICCV}, year = {2021}}"""


def _image_feature():
  return tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB)


def _string_feature():
  return tfds.features.Tensor(shape=(), dtype=np.object_)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder from local files: no "Downloading and preparing dataset ..." line (nothing is downloaded; `prepare`
  says what it built or reused)."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


class BrcaM2c(_LocalBuilder):
  """BRCA-M2C (TCGA breast, 3 nucleus classes, points) from its published folder layout."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Images as ZLIB uint8 tensors; coords (x, y); classes 0..2; mpp 0.5.'}
  code_path = None  # no checksums/metadata files next to the code (tfds would probe package resources)

  def __init__(self, *, source: str | pathlib.Path | None = None, mpp: float = readers.BRCA_MPP, **kwargs):
    self._source = pathlib.Path(source) if source is not None else None
    self._mpp = float(mpp)
    self.errors: list = []
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=('BRCA-M2C: H&E tiles from TCGA-BRCA with nucleus points; classes 0 lymphocyte, 1 tumor, '
                     '2 stromal. BSD-3-Clause (c) 2022 TopoXLab.'),
        features=tfds.features.FeaturesDict({
            'image': _image_feature(),
            'coords': tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
            'classes': tfds.features.Tensor(shape=(None,), dtype=np.int32),
            'mpp': tfds.features.Tensor(shape=(), dtype=np.float32),
            'name': _string_feature(),
        }),
        homepage='https://github.com/TopoXLab/Dataset-BRCA-M2C',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._source is None:
      raise ValueError('BrcaM2c: pass source=<BRCA-M2C folder> to prepare it.')
    return {s: self._generate_examples(s) for s in ('train', 'val', 'test')}

  def _generate_examples(self, split: str):
    errors = []
    for s in readers.read_brca_m2c(self._source, split, mpp=self._mpp, errors=errors):
      yield s.name, {'image': s.image, 'coords': s.coords, 'classes': s.classes, 'mpp': np.float32(s.mpp),
                     'name': s.name}
    self.errors += errors


class Regions(_LocalBuilder):
  """Unlabelled pretraining regions with nucleus coordinates (for MUSE's NuLo)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Images as ZLIB uint8 tensors; coords (x, y); mpp per record.'}
  code_path = None

  def __init__(self, *, source: str | pathlib.Path | None = None, mpp: float | None = None,
               detector: Callable[[np.ndarray, float], np.ndarray] | None = None, min_nuclei: int = 1, **kwargs):
    self._source = pathlib.Path(source) if source is not None else None
    self._mpp = mpp
    self._detector = detector
    self._min_nuclei = int(min_nuclei)
    self.errors: list = []
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Pretraining regions: H&E images with nucleus coordinates (x, y) and their mpp.',
        features=tfds.features.FeaturesDict({
            'image': _image_feature(),
            'coords': tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
            'mpp': tfds.features.Tensor(shape=(), dtype=np.float32),
            'name': _string_feature(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._source is None:
      raise ValueError('Regions: pass source=<folder> to prepare it.')
    return {'train': self._generate_examples()}

  def _samples(self, errors: list):
    src = self._source
    if (src / 'brca_ds_train.txt').exists():
      # A BRCA-M2C folder: train + val tiles (never test), labelled points as nucleus positions.
      for split in ('train', 'val'):
        yield from readers.read_brca_m2c(src, split, mpp=self._mpp or readers.BRCA_MPP, errors=errors)
      return
    if self._mpp is None:
      raise ValueError(f'{src}: an image folder needs --mpp (µm/px of its images).')
    for path in readers.list_images(src):
      got = readers.read_regions_folder_one(path, mpp=self._mpp, detector=self._detector, errors=errors)
      if got is not None:
        yield got

  def _generate_examples(self):
    errors = []
    for s in self._samples(errors):
      if len(s.coords) < self._min_nuclei:
        msg = f'{len(s.coords)} nuclei < min_nuclei={self._min_nuclei}'
        logging.warning('skipping %s: %s', s.name, msg)
        errors.append((s.name, msg))
        continue
      yield s.name, {'image': s.image, 'coords': s.coords, 'mpp': np.float32(s.mpp), 'name': s.name}
    self.errors += errors
