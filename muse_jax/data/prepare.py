"""Prepares ArrayRecord datasets (no TensorFlow needed).

    python -m muse_jax.data.prepare --dataset brca_m2c --source /path/to/BRCA-M2C --out DATA_DIR
    python -m muse_jax.data.prepare --dataset regions --source /path/to/BRCA-M2C --out DATA_DIR   # train+val, GT points
    python -m muse_jax.data.prepare --dataset regions --source IMAGES_DIR --mpp 0.5 --out DATA_DIR  # detector/sidecars
    python -m muse_jax.data.prepare --dataset brca_m2c --source bundled --out DATA_DIR   # the bundled sample

Then read with `tfds.data_source('<dataset>', data_dir=DATA_DIR, split=...)`, `load_labelled('brca_m2c', DATA_DIR,
split)`, or pretraining `source='tfds:regions@DATA_DIR'`. Bad files are reported and skipped; the summary says how
many.

Provenance: beside the records (`DATA_DIR/<dataset>/<version>/provenance.json`) prepare writes what they were built
from: the dataset, the source folder, the options (mpp, detector settings), a fingerprint of the source files it
reads (their names, sizes and modification times, and a SHA-256 of their bytes) and the muse_jax version. A rerun
with the same inputs reuses the records and says so; a rerun with another source folder, other files or other
options stops with an error naming both (exit 2), because the records would silently be the old ones;
`--overwrite` rebuilds them. Records without a provenance file (written by an older muse_jax) are refused the same
way. A folder that was copied (new modification times, same bytes) is recognised by the SHA-256 and reused.

Every flag is checked before any file is read (`--mpp` in [0.01, 10] µm/px, detector scales > 0 and <= 50 µm,
`--min_nuclei` >= 0, an existing source folder); a user error is one line `error: <what> (<where>): <why>` on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import os
import pathlib
import sys
import tempfile

from etils import epath

from muse_jax import cli
from muse_jax.cli import UserError

DATASETS = ('brca_m2c', 'regions')
PROVENANCE_FILE = 'provenance.json'
MAX_DETECTOR_UM = 50.0  # detector scales above this are not nucleus scales (a nucleus is ~5-15 µm across)


# ------------------------------------------------------------------------------------------------ source fingerprint


def source_files(source: str | os.PathLike) -> list[pathlib.Path]:
  """The files `prepare` reads from `source`: its top-level files and those of its `images/` and `labels/` folders
  (hidden files excluded), sorted."""
  root = pathlib.Path(source)
  out = []
  for d in (root, root / 'images', root / 'labels'):
    if d.is_dir():
      out += [p for p in d.iterdir() if p.is_file() and not p.name.startswith('.')]
  return sorted(out)


def fingerprint(source: str | os.PathLike, *, content: bool = True) -> dict:
  """A fingerprint of the files `prepare` reads from `source`.

  Returns:
    {'files': count, 'bytes': total size, 'stat_sha256': hash of (relative path, size, mtime in ns) of every file,
    'content_sha256': hash of (relative path, size, bytes) of every file (only with `content`)}. The stat hash is
    cheap (no file is read); the content hash reads every byte once (~1 GB/s) and survives a copy of the folder.
  """
  root = pathlib.Path(source)
  files = source_files(root)
  stat_h, total = hashlib.sha256(), 0
  rows = []
  for p in files:
    st = p.stat()
    rel = p.relative_to(root).as_posix()
    rows.append((p, rel, st.st_size))
    total += st.st_size
    stat_h.update(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  out = {'files': len(files), 'bytes': total, 'stat_sha256': stat_h.hexdigest()}
  if content:
    h = hashlib.sha256()
    for p, rel, size in rows:
      h.update(f'{rel}\0{size}\n'.encode())
      with open(p, 'rb') as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b''):
          h.update(chunk)
    out['content_sha256'] = h.hexdigest()
  return out


def _describe(prov: dict) -> str:
  """'<source path> (<n> files, <bytes> bytes, sha256 <12 hex>; <options>)' of a provenance record."""
  fp = prov.get('fingerprint')
  opts = ', '.join(f'{k}={v}' for k, v in sorted(prov.get('options', {}).items()))
  files = (f"{fp.get('files')} files, {fp.get('bytes')} bytes, sha256 {str(fp.get('content_sha256'))[:12]}; "
           if fp else '')
  return f"{prov.get('source_path')} ({files}{opts})"


# ------------------------------------------------------------------------------------------------ validation


def _is_brca_folder(source: pathlib.Path) -> bool:
  return (source / 'brca_ds_train.txt').exists()


def validate(dataset: str, source: str, out: str, *, mpp: float | None, sigma_um: float, min_distance_um: float,
             min_nuclei: int) -> tuple[pathlib.Path, dict]:
  """Checks every argument before any file is read (one place). Returns (source folder, builder options).

  Raises:
    UserError naming the flag.
  """
  if dataset not in DATASETS:
    raise UserError('unknown dataset', '--dataset', f'got {dataset!r}, expected one of {DATASETS}')
  if source == 'bundled':
    from muse_jax.data import bundled_sample_dir  # pylint: disable=g-import-not-at-top
    src = bundled_sample_dir()
  else:
    src = pathlib.Path(source)
  if not src.exists():
    raise UserError('no such folder', '--source', str(src))
  if not src.is_dir():
    raise UserError('not a folder', '--source', str(src))
  o = epath.Path(out)  # local or a cloud bucket (gs://...)
  if o.exists() and not o.is_dir():
    raise UserError('not a folder', '--out', f'{o} is a file')
  if mpp is not None:
    mpp = cli.mpp(mpp, '--mpp')
  brca = _is_brca_folder(src)
  if dataset == 'brca_m2c':
    missing = [n for n in ('brca_ds_train.txt', 'brca_ds_val.txt', 'brca_ds_test.txt', 'images', 'labels')
               if not (src / n).exists()]
    if missing:
      raise UserError('not a BRCA-M2C folder', '--source', f'{src} has no {", ".join(missing)}')
    from muse_jax.data import readers  # pylint: disable=g-import-not-at-top
    return src, {'mpp': mpp if mpp is not None else readers.BRCA_MPP}
  min_nuclei = cli.positive_int(min_nuclei, '--min_nuclei', allow_zero=True)
  if brca:
    from muse_jax.data import readers  # pylint: disable=g-import-not-at-top
    return src, {'mpp': mpp if mpp is not None else readers.BRCA_MPP, 'min_nuclei': min_nuclei}
  from muse_jax.data import readers  # pylint: disable=g-import-not-at-top
  if not readers.list_images(src):
    raise UserError('no images', '--source', f'{src} has no {", ".join(readers.IMAGE_SUFFIXES)} files (nor images/)')
  if mpp is None:
    raise UserError('an image folder needs --mpp', '--mpp', f'give the µm/px of the images in {src}')
  sigma_um = cli.positive(sigma_um, '--sigma_um', upper=MAX_DETECTOR_UM, unit='µm')
  min_distance_um = cli.positive(min_distance_um, '--min_distance_um', allow_zero=True, upper=MAX_DETECTOR_UM,
                                 unit='µm')
  return src, {'mpp': mpp, 'min_nuclei': min_nuclei, 'sigma_um': sigma_um, 'min_distance_um': min_distance_um}


# ------------------------------------------------------------------------------------------------ build or reuse


def _check_reuse(prov_path: epath.Path, want: dict, src: pathlib.Path, data_path: epath.Path) -> str:
  """Why the existing records at `data_path` may be reused for `want`; UserError when they may not."""
  fix = 'pass --overwrite to rebuild them, or another --out'
  if not prov_path.exists():
    raise UserError('records exist without a provenance file', str(data_path),
                    f'they were written by an older muse_jax or by hand and may come from another source; {fix}')
  try:
    have = json.loads(prov_path.read_text())
  except (OSError, ValueError) as e:
    raise UserError('unreadable provenance file', str(prov_path), f'{e}; {fix}') from None
  if have.get('options') != want['options']:
    raise UserError('records were built with other options', str(data_path),
                    f'built from {_describe(have)}; asked for {_describe(want)}; {fix}')
  fp_have = have.get('fingerprint', {})
  fp_now = fingerprint(src, content=False)
  if fp_now['stat_sha256'] == fp_have.get('stat_sha256'):
    how = 'same files, sizes and modification times'
  else:
    fp_now = fingerprint(src)
    if fp_now['content_sha256'] != fp_have.get('content_sha256'):
      raise UserError('records were built from other source files', str(data_path),
                      f'built from {_describe(have)}; asked for {_describe(dict(want, fingerprint=fp_now))}; {fix}')
    how = 'same file names, sizes and bytes'
  moved = '' if have.get('source_path') == want['source_path'] else f' as {have.get("source_path")}'
  return (f"reusing the records built on {have.get('created', '?')} by muse_jax {have.get('muse_jax_version', '?')} "
          f"from {want['source_path']} ({how}{moved}); --overwrite rebuilds them")


def run(dataset: str, source: str, out: str, *, mpp: float | None = None, sigma_um: float = 3.0,
        min_distance_um: float = 3.0, min_nuclei: int = 1, overwrite: bool = False) -> dict:
  """Builds `dataset` from `source` into the TFDS data dir `out`, or reuses the records already there when they were
  built from the same source files with the same options (see the module docstring).

  Returns:
    `{'dataset', 'data_dir', 'splits': {split: n_records}, 'skipped': [(path, message), ...], 'reused': bool,
    'message': what was done, 'provenance': the provenance record}`.

  Raises:
    UserError: a bad argument, or records in `out` built from other inputs (without `overwrite`).
  """
  import muse_jax  # pylint: disable=g-import-not-at-top
  from muse_jax.data import builders  # pylint: disable=g-import-not-at-top

  src, options = validate(dataset, source, out, mpp=mpp, sigma_um=sigma_um, min_distance_um=min_distance_um,
                          min_nuclei=min_nuclei)
  want = {'dataset': dataset, 'source': source, 'source_path': str(src.resolve()), 'options': options,
          'muse_jax_version': muse_jax.__version__}
  if dataset == 'brca_m2c':
    builder = builders.BrcaM2c(source=src, mpp=options['mpp'], data_dir=out)
  else:
    detector = None
    if 'sigma_um' in options:
      detector = functools.partial(_detect, sigma_um=options['sigma_um'],
                                   min_distance_um=options['min_distance_um'])
    builder = builders.Regions(source=src, mpp=options['mpp'], detector=detector, min_nuclei=options['min_nuclei'],
                               data_dir=out)
  data_path = epath.Path(builder.data_dir)
  prov_path = data_path / PROVENANCE_FILE
  if data_path.exists() and not overwrite:
    message = _check_reuse(prov_path, want, src, data_path)
    prov = json.loads(prov_path.read_text())
    skipped = [tuple(s) for s in prov.get('skipped', [])]
    reused = True
  else:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    want['fingerprint'] = fingerprint(src)
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite else None
    config = tfds.download.DownloadConfig(download_mode=mode) if mode else None
    with tempfile.TemporaryDirectory(prefix='muse_prepare_') as tmp:  # nothing is downloaded; keep `out` clean
      builder.download_and_prepare(download_dir=tmp, download_config=config)
    skipped = list(builder.errors)
    prov = dict(want, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                skipped=[list(s) for s in skipped])
    tmp_path = data_path / (PROVENANCE_FILE + '.tmp')
    tmp_path.write_text(json.dumps(prov, indent=2) + '\n')
    tmp_path.replace(prov_path)
    message = (f"{'rebuilt' if overwrite else 'built'} from {want['source_path']} "
               f"({prov['fingerprint']['files']} files)")
    reused = False
  splits = {name: info.num_examples for name, info in builder.info.splits.items()}
  return {'dataset': dataset, 'data_dir': str(out), 'splits': splits, 'skipped': skipped, 'reused': reused,
          'message': message, 'provenance': prov}


def _detect(image, mpp, *, sigma_um, min_distance_um):
  from muse_jax.data import detect  # pylint: disable=g-import-not-at-top
  return detect.detect_nuclei(image, mpp, sigma_um=sigma_um, min_distance_um=min_distance_um)


def _main(argv: list[str] | None) -> int:
  p = cli.ArgumentParser(prog='python -m muse_jax.data.prepare', description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--dataset', required=True, choices=DATASETS)
  p.add_argument('--source', required=True, help='input folder, or "bundled"')
  p.add_argument('--out', required=True, help='TFDS data dir to write')
  p.add_argument('--mpp', type=float, default=None, help='µm/px of the images (BRCA-M2C: 0.5)')
  p.add_argument('--sigma_um', type=float, default=3.0, help='detector scale, µm')
  p.add_argument('--min_distance_um', type=float, default=3.0, help='detector minimum peak distance, µm')
  p.add_argument('--min_nuclei', type=int, default=1, help='regions with fewer nuclei are skipped')
  p.add_argument('--overwrite', action='store_true',
                 help='rebuild the records in --out even when they exist (built from other inputs or the same)')
  a = p.parse_args(argv)
  res = run(a.dataset, a.source, a.out, mpp=a.mpp, sigma_um=a.sigma_um, min_distance_um=a.min_distance_um,
            min_nuclei=a.min_nuclei, overwrite=a.overwrite)
  for path, msg in res['skipped']:
    print(f'SKIPPED {path}: {msg}', file=sys.stderr)
  print(f'{res["dataset"]} -> {res["data_dir"]}: {res["message"]}')
  print(f'{res["dataset"]} -> {res["data_dir"]}: ' + ', '.join(f'{k} {v}' for k, v in res['splits'].items())
        + f'; {len(res["skipped"])} file(s) skipped')
  return 0


def main(argv: list[str] | None = None) -> int:
  """The CLI; a user error is one line on stderr and exit code 2 (`cli.run`)."""
  return cli.run(_main, argv)


if __name__ == '__main__':
  sys.exit(main())
