"""Readers for labelled and unlabelled H&E images with nucleus points.

Three kinds of input, each returning `Sample`s that carry their resolution (`mpp`, µm/px):

* BRCA-M2C in its published layout (`images/*.png`, `labels/<stem>_gt_class_coords.txt` with rows `y x class`,
  classes 1..3, and the split lists `brca_ds_{train,val,test}.txt`), at 0.5 µm/px: `read_brca_m2c`.
* A generic labelled folder for users' own data: images plus nucleus points as CSV or GeoJSON (QuPath point or
  polygon exports; polygons become their centroids) and a class-name map: `read_labelled_folder`.
* Unlabelled regions for pretraining: image files plus nucleus coordinates from a sidecar file or from a detector
  (`muse_jax.data.detect`): `read_regions_folder`.

Conventions: images are uint8 `[H, W, 3]`; coordinates are float32 `[N, 2]` `(x, y)` = (column, row) in pixels of
that image, where integer values are pixel centres; classes are int32 `[N]`, -1 = unknown / unlabelled.

Bad input handling (documented, tested):
* corrupt or truncated image file: `ValueError` naming the file;
* grayscale images are replicated to 3 channels; RGBA / LA images are composited over white and the alpha dropped;
  16-bit images are rejected with a `ValueError`;
* a label row that is not the expected numbers: `ValueError` naming `file:line`;
* points outside the image: dropped, and the count is logged (`logging.warning`) with the file name;
* an image with no nuclei: allowed (empty arrays) for labelled data; callers decide whether to skip it;
* an unknown class name: `ValueError` naming `file:line` and the known names (or -1 with `unknown_class='ignore'`).
Folder readers take `errors`: when a list is given, a bad file is appended to it as `(path, message)` and skipped
instead of raising, so that one bad file never kills a long preparation run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

BRCA_CLASSES: tuple[str, ...] = ('lymphocyte', 'tumor', 'stromal')
"""BRCA-M2C class names for ids 0, 1, 2 (upstream ids 1, 2, 3 minus one)."""

BRCA_MPP = 0.5
"""Resolution of the BRCA-M2C PNG tiles in µm/px (see the dataset README)."""

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')
POINT_SUFFIXES = ('.csv', '.tsv', '.geojson', '.json')

PathLike = str | pathlib.Path


@dataclasses.dataclass
class Sample:
  """One image with its nucleus points.

  Attributes:
    image: uint8 `[H, W, 3]`.
    coords: float32 `[N, 2]`, `(x, y)` pixels of `image` (integer = pixel centre).
    classes: int32 `[N]`, -1 = unknown.
    mpp: µm per pixel of `image`.
    name: image identifier (file stem).
    split: 'train' | 'val' | 'test' | 'all' | 'unlabelled'.
  """
  image: np.ndarray
  coords: np.ndarray
  classes: np.ndarray
  mpp: float
  name: str
  split: str

  def __post_init__(self):
    self.coords = np.asarray(self.coords, np.float32).reshape(-1, 2)
    self.classes = np.asarray(self.classes, np.int32).reshape(-1)
    if self.coords.shape[0] != self.classes.shape[0]:
      raise ValueError(f'Sample {self.name!r}: {self.coords.shape[0]} coords but {self.classes.shape[0]} classes.')


# ----------------------------------------------------------------------------------------------------- images


def read_image(path: PathLike) -> np.ndarray:
  """Reads an image file as uint8 RGB `[H, W, 3]`.

  Grayscale is replicated to RGB; RGBA/LA are composited over white (slide background) and alpha is dropped.

  Raises:
    ValueError: the file is missing, corrupt, truncated, or not 8-bit.
  """
  path = pathlib.Path(path)
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      if mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        raise ValueError(f'{path}: image mode {mode!r} (16/32-bit) is not supported; expected 8-bit RGB, RGBA or L.')
      if mode in ('RGBA', 'LA', 'PA') or (mode == 'P' and 'transparency' in im.info):
        rgba = im.convert('RGBA')
        white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert('RGB')
      elif mode != 'RGB':
        im = im.convert('RGB')
      arr = np.asarray(im, dtype=np.uint8)
  except ValueError:
    raise
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise ValueError(f'{path}: cannot decode image ({type(e).__name__}: {e}); the file is corrupt or truncated.') from e
  if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise ValueError(f'{path}: decoded to shape {arr.shape}, expected [H, W, 3].')
  return np.ascontiguousarray(arr)


def drop_outside(coords: np.ndarray, classes: np.ndarray, hw: tuple[int, int],
                 source: str = '') -> tuple[np.ndarray, np.ndarray]:
  """Drops points whose pixel lies outside an image of size `hw` = (H, W); logs how many.

  A point (x, y) is inside when `-0.5 <= x < W - 0.5` and `-0.5 <= y < H - 0.5` (its nearest pixel exists).
  """
  coords = np.asarray(coords, np.float32).reshape(-1, 2)
  classes = np.asarray(classes, np.int32).reshape(-1)
  h, w = hw
  keep = ((coords[:, 0] >= -0.5) & (coords[:, 0] < w - 0.5) & (coords[:, 1] >= -0.5) & (coords[:, 1] < h - 0.5)
          & np.isfinite(coords).all(axis=1))
  n_out = int((~keep).sum())
  if n_out:
    logging.warning('%s: dropped %d of %d points outside the %dx%d image.', source or '<points>', n_out,
                    len(keep), w, h)
  return coords[keep], classes[keep]


# ----------------------------------------------------------------------------------------------------- BRCA-M2C


def read_brca_labels(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads a BRCA-M2C label file (rows `y x class`, class 1..3).

  Returns:
    coords float32 `[N, 2]` (x, y), classes int32 `[N]` in 0..2.

  Raises:
    ValueError: naming `file:line` for a row that is not three integers or a class outside 1..3.
  """
  path = pathlib.Path(path)
  coords, classes = [], []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      s = line.strip()
      if not s or s.startswith('#'):
        continue
      parts = s.replace(',', ' ').split()
      try:
        if len(parts) != 3:
          raise ValueError
        y, x, c = (float(p) for p in parts)
      except ValueError:
        raise ValueError(f'{path}:{lineno}: expected three numbers "y x class", got {s!r}.') from None
      if c != int(c) or not 1 <= c <= len(BRCA_CLASSES):
        raise ValueError(f'{path}:{lineno}: class {parts[2]!r} is not one of 1..{len(BRCA_CLASSES)} '
                         f'({", ".join(BRCA_CLASSES)}).')
      coords.append((x, y))
      classes.append(int(c) - 1)
  return np.asarray(coords, np.float32).reshape(-1, 2), np.asarray(classes, np.int32)


def brca_split_names(root: PathLike, split: str) -> list[str]:
  """Image file names listed in `brca_ds_<split>.txt` ('all' = train + val + test)."""
  root = pathlib.Path(root)
  splits = ('train', 'val', 'test') if split == 'all' else (split,)
  names = []
  for s in splits:
    if s not in ('train', 'val', 'test'):
      raise ValueError(f'split {split!r}: expected one of train, val, test, all.')
    lst = root / f'brca_ds_{s}.txt'
    if not lst.exists():
      raise ValueError(f'{lst}: split list not found; is {root} a BRCA-M2C folder (images/, labels/, brca_ds_*.txt)?')
    names += [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
  return names


def read_brca_m2c(root: PathLike, split: str, *, mpp: float = BRCA_MPP,
                  errors: list | None = None) -> list[Sample]:
  """Reads one BRCA-M2C split ('train', 'val', 'test' or 'all') from the published layout.

  Args:
    root: folder with `images/`, `labels/` and `brca_ds_*.txt`.
    split: split name.
    mpp: resolution of the tiles (0.5 µm/px).
    errors: if a list, bad files are appended as `(path, message)` and skipped; otherwise they raise.

  Returns:
    `Sample`s in split-list order, classes 0 lymphocyte, 1 tumor, 2 stromal.
  """
  root = pathlib.Path(root)
  out = []
  for s in (('train', 'val', 'test') if split == 'all' else (split,)):
    for fname in brca_split_names(root, s):
      stem = pathlib.Path(fname).stem
      img_path = root / 'images' / fname
      lbl_path = root / 'labels' / f'{stem}_gt_class_coords.txt'
      try:
        image = read_image(img_path)
        if not lbl_path.exists():
          raise ValueError(f'{lbl_path}: label file not found for image {img_path.name}.')
        coords, classes = read_brca_labels(lbl_path)
        coords, classes = drop_outside(coords, classes, image.shape[:2], str(lbl_path))
      except ValueError as e:
        if errors is None:
          raise
        errors.append((str(img_path), str(e)))
        logging.error('skipping %s: %s', img_path, e)
        continue
      out.append(Sample(image, coords, classes, float(mpp), stem, s))
  return out


# ----------------------------------------------------------------------------------------------------- points


def _class_id(name, class_map: Mapping[str, int] | None, where: str, unknown_class: str) -> int:
  if name is None or (isinstance(name, str) and not name.strip()):
    return -1
  if class_map is None:
    try:
      return int(name)
    except (TypeError, ValueError):
      if unknown_class == 'ignore':
        return -1
      raise ValueError(f'{where}: class {name!r} is not an integer and no class-name map was given.') from None
  key = str(name).strip()
  if key in class_map:
    return int(class_map[key])
  low = {k.lower(): v for k, v in class_map.items()}
  if key.lower() in low:
    return int(low[key.lower()])
  if unknown_class == 'ignore':
    return -1
  raise ValueError(f'{where}: unknown class name {key!r}; known: {sorted(class_map)}.')


def read_points_csv(path: PathLike, class_map: Mapping[str, int] | None = None, *,
                    unknown_class: str = 'error') -> tuple[np.ndarray, np.ndarray]:
  """Reads nucleus points from CSV/TSV.

  With a header: columns `x`, `y` in pixels (µm columns such as QuPath's `Centroid X µm` are not converted) and an
  optional `class`/`label`/`classification`/`class_name`/`name`/`type` column. Without a header: `x,y[,class]`.

  Args:
    path: the file.
    class_map: class name -> id; when None, classes must be integers.
    unknown_class: 'error' (raise) or 'ignore' (class -1) for names not in `class_map`.

  Raises:
    ValueError: naming `file:line` for a malformed row or an unknown class.
  """
  path = pathlib.Path(path)
  text = path.read_text(encoding='utf-8-sig')
  delim = '\t' if path.suffix == '.tsv' or ('\t' in text.splitlines()[0] if text.strip() else False) else ','
  rows = list(csv.reader(text.splitlines(), delimiter=delim))
  coords, classes = [], []
  ix, iy, ic, start = 0, 1, 2, 0
  if rows:
    head = [h.strip().lower() for h in rows[0]]
    def _is_num(v):
      try:
        float(v)
        return True
      except ValueError:
        return False
    if head and not all(_is_num(h) for h in head[:2]):
      if 'x' not in head or 'y' not in head:
        raise ValueError(f'{path}:1: header {rows[0]} has no "x" and "y" columns.')
      ix, iy = head.index('x'), head.index('y')
      ic = next((head.index(k) for k in ('class', 'label', 'classification', 'class_name', 'name', 'type')
                 if k in head), None)
      start = 1
  for lineno, row in enumerate(rows[start:], start + 1):
    if not row or not ''.join(row).strip() or row[0].lstrip().startswith('#'):
      continue
    try:
      x, y = float(row[ix]), float(row[iy])
    except (ValueError, IndexError):
      raise ValueError(f'{path}:{lineno}: expected numbers in columns x, y; got {row}.') from None
    name = row[ic] if ic is not None and ic < len(row) else None
    coords.append((x, y))
    classes.append(_class_id(name, class_map, f'{path}:{lineno}', unknown_class))
  return np.asarray(coords, np.float32).reshape(-1, 2), np.asarray(classes, np.int32)


def _polygon_centroid(ring: Sequence[Sequence[float]]) -> tuple[float, float]:
  pts = np.asarray(ring, np.float64)[:, :2]
  if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
    pts = pts[:-1]
  x, y = pts[:, 0], pts[:, 1]
  xn, yn = np.roll(x, -1), np.roll(y, -1)
  cross = x * yn - xn * y
  area = cross.sum() / 2
  if abs(area) < 1e-9:
    return float(x.mean()), float(y.mean())
  return float(((x + xn) * cross).sum() / (6 * area)), float(((y + yn) * cross).sum() / (6 * area))


def _feature_class(props: Mapping) -> str | None:
  props = props or {}
  c = props.get('classification')
  if isinstance(c, Mapping):
    return c.get('name')
  if isinstance(c, str):
    return c
  for k in ('class_name', 'class', 'label', 'name'):
    if k in props and props[k] is not None:
      return str(props[k])
  return None


def read_points_geojson(path: PathLike, class_map: Mapping[str, int] | None = None, *,
                        unknown_class: str = 'error') -> tuple[np.ndarray, np.ndarray]:
  """Reads nucleus points from GeoJSON (QuPath exports: a FeatureCollection or a list of features).

  Point and MultiPoint geometries give their points; Polygon / MultiPolygon give the centroid of the (largest)
  outer ring. The class is `properties.classification.name` (QuPath) or `class_name`/`class`/`label`.
  Coordinates are taken as image pixels (QuPath's export unit).

  Raises:
    ValueError: naming `file:feature index` for unsupported geometry or an unknown class name.
  """
  path = pathlib.Path(path)
  try:
    data = json.loads(path.read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}:{e.lineno}: invalid JSON ({e.msg}).') from e
  feats = data.get('features', [data]) if isinstance(data, Mapping) else data
  coords, classes = [], []
  for i, f in enumerate(feats):
    where = f'{path}:feature {i}'
    geom = (f or {}).get('geometry') or {}
    gtype, gc = geom.get('type'), geom.get('coordinates')
    try:
      if gtype == 'Point':
        pts = [gc[:2]]
      elif gtype == 'MultiPoint':
        pts = [p[:2] for p in gc]
      elif gtype == 'Polygon':
        pts = [_polygon_centroid(gc[0])]
      elif gtype == 'MultiPolygon':
        big = max(gc, key=lambda poly: len(poly[0]))
        pts = [_polygon_centroid(big[0])]
      else:
        raise ValueError(f'{where}: geometry type {gtype!r} not supported (Point, MultiPoint, Polygon, MultiPolygon).')
      pts = [(float(p[0]), float(p[1])) for p in pts]
    except (TypeError, IndexError, KeyError):
      raise ValueError(f'{where}: malformed {gtype} coordinates.') from None
    cid = _class_id(_feature_class(f.get('properties')), class_map, where, unknown_class)
    coords += pts
    classes += [cid] * len(pts)
  return np.asarray(coords, np.float32).reshape(-1, 2), np.asarray(classes, np.int32)


def read_points(path: PathLike, class_map: Mapping[str, int] | None = None, *,
                unknown_class: str = 'error') -> tuple[np.ndarray, np.ndarray]:
  """Reads points from `.csv`/`.tsv` or `.geojson`/`.json` (by suffix). Returns (coords [N,2] f32, classes [N] i32)."""
  path = pathlib.Path(path)
  if path.suffix.lower() in ('.geojson', '.json'):
    return read_points_geojson(path, class_map, unknown_class=unknown_class)
  if path.suffix.lower() in ('.csv', '.tsv', '.txt'):
    return read_points_csv(path, class_map, unknown_class=unknown_class)
  raise ValueError(f'{path}: unsupported points file suffix {path.suffix!r}; expected .csv, .tsv, .geojson, .json.')


def find_points_file(image_path: PathLike, labels_dir: PathLike | None = None) -> pathlib.Path | None:
  """The points file for an image: `<stem>.{csv,tsv,geojson,json}` in `labels_dir` (or next to the image)."""
  image_path = pathlib.Path(image_path)
  folders = [pathlib.Path(labels_dir)] if labels_dir else []
  folders += [image_path.parent, image_path.parent.parent / 'labels', image_path.parent.parent / 'points']
  for d in folders:
    for suf in POINT_SUFFIXES:
      p = d / f'{image_path.stem}{suf}'
      if p.exists():
        return p
  return None


def list_images(folder: PathLike) -> list[pathlib.Path]:
  """Image files in `folder` (or `folder/images` when it exists), sorted by name."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise ValueError(f'{folder}: not a folder.')
  if (folder / 'images').is_dir():
    folder = folder / 'images'
  return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_class_map(spec: str | PathLike | Mapping[str, int] | None) -> dict[str, int] | None:
  """A class-name map from a dict, a JSON file (`{"name": id}` or `["name0", "name1", ...]`), or 'a,b,c'."""
  if spec is None or isinstance(spec, Mapping):
    return dict(spec) if spec is not None else None
  p = pathlib.Path(spec)
  if p.suffix == '.json' and p.exists():
    data = json.loads(p.read_text())
  else:
    data = [s.strip() for s in str(spec).split(',') if s.strip()]
  if isinstance(data, list):
    return {name: i for i, name in enumerate(data)}
  return {str(k): int(v) for k, v in data.items()}


def read_labelled_folder(root: PathLike, *, mpp: float, class_map: Mapping[str, int] | None = None,
                         labels_dir: PathLike | None = None, split: str = 'all', unknown_class: str = 'error',
                         errors: list | None = None) -> list[Sample]:
  """Reads a folder of images with per-image point files (CSV or GeoJSON, same stem).

  Args:
    root: folder of images (or with an `images/` sub-folder).
    mpp: resolution of the images, µm/px.
    class_map: class name -> id (None: classes must be integers in the files).
    labels_dir: where the point files are (default: next to the images, `../labels`, `../points`).
    split: the split name to record.
    unknown_class: 'error' or 'ignore' (-1).
    errors: if a list, bad files are appended as `(path, message)` and skipped; otherwise they raise.
  """
  out = []
  for img_path in list_images(root):
    try:
      image = read_image(img_path)
      pts = find_points_file(img_path, labels_dir)
      if pts is None:
        raise ValueError(f'{img_path}: no points file {img_path.stem}.csv/.geojson found.')
      coords, classes = read_points(pts, class_map, unknown_class=unknown_class)
      coords, classes = drop_outside(coords, classes, image.shape[:2], str(pts))
    except ValueError as e:
      if errors is None:
        raise
      errors.append((str(img_path), str(e)))
      logging.error('skipping %s: %s', img_path, e)
      continue
    out.append(Sample(image, coords, classes, float(mpp), img_path.stem, split))
  return out


def read_regions_folder_one(img_path: PathLike, *, mpp: float, detector=None, labels_dir: PathLike | None = None,
                            errors: list | None = None) -> Sample | None:
  """One unlabelled region (see `read_regions_folder`); None when skipped into `errors`."""
  img_path = pathlib.Path(img_path)
  try:
    image = read_image(img_path)
    pts = find_points_file(img_path, labels_dir)
    if pts is not None:
      coords, _ = read_points(pts, None, unknown_class='ignore')
    elif detector is not None:
      coords = detector(image, mpp)
    else:
      raise ValueError(f'{img_path}: no points file and no detector given.')
    coords, classes = drop_outside(coords, np.full(len(coords), -1, np.int32), image.shape[:2], str(img_path))
  except ValueError as e:
    if errors is None:
      raise
    errors.append((str(img_path), str(e)))
    logging.error('skipping %s: %s', img_path, e)
    return None
  return Sample(image, coords, classes, float(mpp), img_path.stem, 'unlabelled')


def read_regions_folder(root: PathLike, *, mpp: float, detector=None, labels_dir: PathLike | None = None,
                        errors: list | None = None) -> list[Sample]:
  """Reads unlabelled pretraining regions: images plus nucleus coordinates.

  Coordinates come from a sidecar points file when one exists (detections from another tool), otherwise from
  `detector(image, mpp) -> coords [N, 2]` (e.g. `muse_jax.data.detect.detect_nuclei`). Classes are all -1.

  Raises:
    ValueError: no sidecar and no detector, or a bad file (unless `errors` is a list: then it is skipped).
  """
  out = [read_regions_folder_one(p, mpp=mpp, detector=detector, labels_dir=labels_dir, errors=errors)
         for p in list_images(root)]
  return [s for s in out if s is not None]
