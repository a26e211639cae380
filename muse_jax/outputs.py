"""Writers for nucleus predictions: CSV, QuPath GeoJSON (classified points) and overlay PNGs.

Points are `(x, y)` = (column, row) in pixels of the image they were predicted on, `classes` are integer indices
into `class_names`, `scores` are confidences in [0, 1].

QuPath (0.4, 0.5, 0.6) imports the GeoJSON of `write_points_geojson` with File > Import objects (or by dragging
the file onto the image): a FeatureCollection with one `Point` feature per nucleus, `properties.objectType`
'annotation' (default; editable point annotations) or 'detection' (lighter for hundreds of thousands of nuclei),
`properties.classification = {'name', 'color': [r, g, b]}` and `properties.measurements = {'score': ...}`.

Every writer writes to a temporary name beside the target and renames it when complete (`atomic_path`), so a killed
run never leaves a truncated CSV or an invalid GeoJSON under the final name.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pathlib
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# Colours (RGB) for the class names used in this project; other names get a colour from `_PALETTE`.
KNOWN_COLORS = {
  "lymphocyte": (30, 144, 255),
  "tumor": (220, 20, 60),
  "stromal": (34, 160, 34),
  "other": (34, 160, 34),
  "bc": (34, 160, 34),
  "tc": (220, 20, 60),
  "nucleus": (255, 200, 0),
}
_PALETTE = [(255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34),
            (23, 190, 207), (31, 119, 180)]
OBJECT_TYPES = ("annotation", "detection")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `path`; renames it to `path` when the block ends without an error.

  On an error the temporary file is removed and `path` keeps its old content (or stays absent).
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
  """Writes `text` to `path` through a temporary file and a rename. Returns the path."""
  with atomic_path(path) as tmp:
    tmp.write_text(text)
  return os.fspath(path)


def class_colors(class_names: Sequence[str]) -> list[tuple[int, int, int]]:
  """One RGB colour per class name (known names get fixed colours, others a palette colour)."""
  out = []
  for i, name in enumerate(class_names):
    out.append(KNOWN_COLORS.get(str(name).lower(), _PALETTE[i % len(_PALETTE)]))
  return out


def _check(points: Any, classes: Any, scores: Any, class_names: Sequence[str]):
  pts = np.asarray(points, np.float64).reshape(-1, 2)
  cls = np.asarray(classes, np.int64).reshape(-1)
  sc = np.ones(len(pts)) if scores is None else np.asarray(scores, np.float64).reshape(-1)
  if not (len(pts) == len(cls) == len(sc)):
    raise ValueError(f"points/classes/scores: lengths {len(pts)}/{len(cls)}/{len(sc)} differ")
  if len(cls) and (cls.min() < 0 or cls.max() >= len(class_names)):
    raise ValueError(f"classes: values in [{cls.min()}, {cls.max()}], expected [0, {len(class_names)}) "
                     f"for class_names {list(class_names)}")
  return pts, cls, sc


def write_points_csv(path: str | os.PathLike, points: Any, classes: Any, scores: Any,
                     class_names: Sequence[str]) -> str:
  """Writes `x,y,class,score` rows (class as its name; x, y in px with 2 decimals). Returns the path."""
  pts, cls, sc = _check(points, classes, scores, class_names)
  with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["x", "y", "class", "score"])
    for (x, y), c, s in zip(pts, cls, sc):
      w.writerow([f"{x:.2f}", f"{y:.2f}", class_names[c], f"{s:.4f}"])
  return os.fspath(path)


def read_points_csv(path: str | os.PathLike, class_names: Sequence[str]) -> dict[str, np.ndarray]:
  """Reads a CSV with columns x, y, class (a name in `class_names` or an integer index) and optional score."""
  pts, cls, sc = [], [], []
  lookup = {str(n).lower(): i for i, n in enumerate(class_names)}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = {"x", "y", "class"} - set(reader.fieldnames or [])
    if missing:
      raise ValueError(f"{path}: missing columns {sorted(missing)}; expected header x,y,class[,score]")
    for row in reader:
      c = row["class"].strip()
      if c.lower() in lookup:
        ci = lookup[c.lower()]
      else:
        try:
          ci = int(c)
        except ValueError:
          raise ValueError(f"{path}: class {c!r} is not one of {list(class_names)}") from None
      pts.append((float(row["x"]), float(row["y"])))
      cls.append(ci)
      sc.append(float(row["score"]) if row.get("score") not in (None, "") else 1.0)
  return {"points": np.asarray(pts, np.float32).reshape(-1, 2), "classes": np.asarray(cls, np.int32),
          "scores": np.asarray(sc, np.float32)}


def points_to_geojson(points: Any, classes: Any, scores: Any, class_names: Sequence[str], *,
                      colors: Sequence[Sequence[int]] | None = None, object_type: str = "annotation",
                      offset: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
  """A GeoJSON FeatureCollection of classified points in the layout QuPath imports.

  Args:
    points, classes, scores, class_names: the predictions (see module docstring).
    colors: RGB per class (default `class_colors(class_names)`).
    object_type: 'annotation' or 'detection'.
    offset: (dx, dy) added to every point (e.g. the tile's position in the slide, in level-0 px).
  """
  if object_type not in OBJECT_TYPES:
    raise ValueError(f"object_type: got {object_type!r}, expected one of {OBJECT_TYPES}")
  pts, cls, sc = _check(points, classes, scores, class_names)
  colors = list(colors) if colors is not None else class_colors(class_names)
  if len(colors) != len(class_names):
    raise ValueError(f"colors: got {len(colors)}, expected one per class ({len(class_names)})")
  feats = []
  for (x, y), c, s in zip(pts, cls, sc):
    feats.append({
      "type": "Feature",
      "id": str(uuid.uuid4()),
      "geometry": {"type": "Point", "coordinates": [float(x) + offset[0], float(y) + offset[1]]},
      "properties": {
        "objectType": object_type,
        "classification": {"name": str(class_names[c]), "color": [int(v) for v in colors[c]]},
        "measurements": {"score": float(s)},
        "isLocked": False,
      },
    })
  return {"type": "FeatureCollection", "features": feats}


def write_points_geojson(path: str | os.PathLike, points: Any, classes: Any, scores: Any,
                         class_names: Sequence[str], **kwargs: Any) -> str:
  """Writes `points_to_geojson(...)` to `path` (kwargs: colors, object_type, offset). Returns the path."""
  collection = points_to_geojson(points, classes, scores, class_names, **kwargs)
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(collection, f)
  return os.fspath(path)


def draw_overlay(image: np.ndarray, points: Any, classes: Any, class_names: Sequence[str], *,
                 colors: Sequence[Sequence[int]] | None = None, radius: int = 4,
                 path: str | os.PathLike | None = None) -> np.ndarray:
  """Draws a coloured ring per point on a copy of `image` (uint8 [H, W, 3]); writes a PNG if `path` is given.

  Returns:
    the overlay, uint8 [H, W, 3].
  """
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"image: got {image.dtype} {image.shape}, expected uint8 [H, W, 3]")
  pts, cls, _ = _check(points, classes, None, class_names)
  colors = list(colors) if colors is not None else class_colors(class_names)
  im = Image.fromarray(image)
  draw = ImageDraw.Draw(im)
  for (x, y), c in zip(pts, cls):
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=tuple(int(v) for v in colors[c]),
                 width=max(1, radius // 3))
  out = np.asarray(im)
  if path is not None:
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}.get(pathlib.Path(path).suffix.lower(),
                                                                                "PNG")
    with atomic_path(path) as tmp:
      im.save(tmp, format=fmt)
  return out
