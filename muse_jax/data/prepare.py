"""Prepares ArrayRecord datasets (no TensorFlow needed).

    python -m muse_jax.data.prepare --dataset brca_m2c --source /path/to/BRCA-M2C --out DATA_DIR
    python -m muse_jax.data.prepare --dataset regions --source /path/to/BRCA-M2C --out DATA_DIR   # train+val, GT points
    python -m muse_jax.data.prepare --dataset regions --source IMAGES_DIR --mpp 0.5 --out DATA_DIR  # detector/sidecars
    python -m muse_jax.data.prepare --dataset brca_m2c --source bundled --out DATA_DIR   # the bundled sample

Then read with `tfds.data_source('<dataset>', data_dir=DATA_DIR, split=...)`, `load_labelled('brca_m2c', DATA_DIR,
split)`, or pretraining `source='tfds:regions@DATA_DIR'`. Bad files are reported and skipped; the summary says how
many.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys

from muse_jax.data import builders, detect

DATASETS = ('brca_m2c', 'regions')


def run(dataset: str, source: str, out: str, *, mpp: float | None = None, sigma_um: float = 3.0,
        min_distance_um: float = 3.0, min_nuclei: int = 1) -> dict:
  """Builds `dataset` from `source` into the TFDS data dir `out`.

  Returns:
    `{'dataset', 'data_dir', 'splits': {split: n_records}, 'skipped': [(path, message), ...]}`.
  """
  if source == 'bundled':
    from muse_jax.data import bundled_sample_dir  # pylint: disable=g-import-not-at-top
    source = str(bundled_sample_dir())
  if not pathlib.Path(source).is_dir():
    raise ValueError(f'--source {source}: not a folder.')
  if dataset == 'brca_m2c':
    kw = {'mpp': mpp} if mpp is not None else {}
    builder = builders.BrcaM2c(source=source, data_dir=out, **kw)
  elif dataset == 'regions':
    detector = functools.partial(_detect, sigma_um=sigma_um, min_distance_um=min_distance_um)
    builder = builders.Regions(source=source, mpp=mpp, detector=detector, min_nuclei=min_nuclei, data_dir=out)
  else:
    raise ValueError(f'--dataset {dataset!r}: expected one of {DATASETS}.')
  builder.download_and_prepare()
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  return {'dataset': dataset, 'data_dir': str(out), 'splits': splits, 'skipped': list(builder.errors)}


def _detect(image, mpp, *, sigma_um, min_distance_um):
  return detect.detect_nuclei(image, mpp, sigma_um=sigma_um, min_distance_um=min_distance_um)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dataset', required=True, choices=DATASETS)
  p.add_argument('--source', required=True, help='input folder, or "bundled"')
  p.add_argument('--out', required=True, help='TFDS data dir to write')
  p.add_argument('--mpp', type=float, default=None, help='µm/px of the images (BRCA-M2C: 0.5)')
  p.add_argument('--sigma_um', type=float, default=3.0, help='detector scale, µm')
  p.add_argument('--min_distance_um', type=float, default=3.0, help='detector minimum peak distance, µm')
  p.add_argument('--min_nuclei', type=int, default=1, help='regions with fewer nuclei are skipped')
  a = p.parse_args(argv)
  res = run(a.dataset, a.source, a.out, mpp=a.mpp, sigma_um=a.sigma_um, min_distance_um=a.min_distance_um,
            min_nuclei=a.min_nuclei)
  for path, msg in res['skipped']:
    print(f'SKIPPED {path}: {msg}', file=sys.stderr)
  print(f'{res["dataset"]} -> {res["data_dir"]}: ' + ', '.join(f'{k} {v}' for k, v in res['splits'].items())
        + f'; {len(res["skipped"])} file(s) skipped')
  return 0


if __name__ == '__main__':
  sys.exit(main())
