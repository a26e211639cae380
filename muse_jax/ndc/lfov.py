"""Large-field-of-view (LFoV) training samples for NDC fine-tuning (MUSE_SPEC §4).

A labelled tile (or a labelled window cut from it, `label_size`) is placed at a random offset inside a square field
of `field` px (1024 by default). The pixels around it come from a larger *context* image when the user has one
(a slide region or a context image, with the tile's top-left position in it); otherwise from the tile itself, and
beyond the available pixels from padding:

- `pad_mode='reflect'` (default): mirrored tissue. This is a **documented substitute** for real context (BRCA-M2C
  ships no surrounding slide): it keeps stain and texture statistics but creates mirrored nuclei that carry no
  labels. They only ever feed the unsupervised consistency loss, never the supervised ones.
- `pad_mode='constant'`: white (slide background) as a control.

The labelled region is returned as a box `[x0, y0, x1, y1)` in field pixels. The supervised losses use only
proposals whose anchor lies inside it; the consistency loss uses the proposals outside it.

Conventions: images uint8 [H, W, 3]; coords float32 (x, y) in px of the array they index; classes int32.
Everything here is NumPy on the host (the input pipeline), seeded by a `np.random.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PAD_MODES = ("reflect", "constant")


def crop_padded(image: np.ndarray, x0: int, y0: int, w: int, h: int, pad_mode: str = "reflect") -> np.ndarray:
  """Crops `image[y0:y0+h, x0:x0+w]`, padding (reflect or white) wherever the window leaves the image."""
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode: got {pad_mode!r}, expected one of {PAD_MODES}")
  H, W = image.shape[:2]
  ix0, iy0 = min(max(x0, 0), W - 1), min(max(y0, 0), H - 1)
  ix1, iy1 = max(min(x0 + w, W), ix0 + 1), max(min(y0 + h, H), iy0 + 1)
  part = image[iy0:iy1, ix0:ix1]
  pads = ((iy0 - y0, y0 + h - iy1), (ix0 - x0, x0 + w - ix1), (0, 0))
  if pad_mode == "constant":
    out = np.pad(part, pads, mode="constant", constant_values=255)
  else:
    mode = "reflect" if min(part.shape[:2]) > 1 else "edge"
    out = np.pad(part, pads, mode=mode)
  return out[:h, :w]


def make_lfov_sample(
  image: np.ndarray,
  coords: np.ndarray,
  classes: np.ndarray,
  *,
  field: int,
  rng: np.random.Generator,
  label_size: int | None = None,
  context: np.ndarray | None = None,
  tile_origin: tuple[int, int] | None = None,
  pad_mode: str = "reflect",
  center: bool = False,
) -> dict[str, np.ndarray]:
  """Builds one LFoV sample.

  Args:
    image: the labelled tile, uint8 [H, W, 3].
    coords: [N, 2] (x, y) of its nuclei in tile px; classes: [N] int.
    field: side of the output field in px.
    rng: random generator (window and offset choice).
    label_size: side of the labelled window cut from the tile (None: the whole tile). Each side is also clipped
      to the tile and to `field`; tile pixels outside the window become unlabelled context.
    context: optional larger image (uint8 [Hc, Wc, 3]) that contains the tile at `tile_origin` = (x, y).
    tile_origin: top-left of the tile in `context` (required with `context`).
    pad_mode: 'reflect' or 'constant' (white) for pixels beyond the available image.
    center: deterministic sample: the labelled window cut from the centre of the tile and put at the centre of
      the field (evaluation, overfitting checks); otherwise both positions are random.

  Returns:
    `{'image': uint8 [field, field, 3], 'coords': float32 [M, 2] (field px), 'classes': int32 [M],
      'region': float32 [4] = (x0, y0, x1, y1) of the labelled window in field px}`.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image: got shape {image.shape}, expected [H, W, 3]")
  H, W = image.shape[:2]
  if context is None:
    context, (ox, oy) = image, (0, 0)
  else:
    if tile_origin is None:
      raise ValueError("tile_origin: required with context (the tile's top-left (x, y) in the context image)")
    ox, oy = int(tile_origin[0]), int(tile_origin[1])
    Hc, Wc = context.shape[:2]
    if ox < 0 or oy < 0 or ox + W > Wc or oy + H > Hc:
      raise ValueError(f"tile_origin: tile of {W}x{H} at ({ox}, {oy}) does not fit in the context of {Wc}x{Hc}")
  ls = field if label_size is None else min(int(label_size), field)
  lw, lh = min(ls, W), min(ls, H)
  if center:
    tx, ty = (W - lw) // 2, (H - lh) // 2
    fx, fy = (field - lw) // 2, (field - lh) // 2
  else:
    tx, ty = int(rng.integers(0, W - lw + 1)), int(rng.integers(0, H - lh + 1))
    fx, fy = int(rng.integers(0, field - lw + 1)), int(rng.integers(0, field - lh + 1))
  out = crop_padded(context, ox + tx - fx, oy + ty - fy, field, field, pad_mode)
  coords = np.asarray(coords, np.float32).reshape(-1, 2)
  classes = np.asarray(classes, np.int32).reshape(-1)
  keep = (coords[:, 0] >= tx) & (coords[:, 0] < tx + lw) & (coords[:, 1] >= ty) & (coords[:, 1] < ty + lh)
  new = coords[keep] - np.array([tx - fx, ty - fy], np.float32)
  region = np.array([fx, fy, fx + lw, fy + lh], np.float32)
  return {"image": np.ascontiguousarray(out), "coords": new, "classes": classes[keep], "region": region}


def random_dihedral(sample: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random transpose / horizontal / vertical flip of a square sample (image, coords and region together)."""
  img, xy, reg = sample["image"], sample["coords"].copy(), sample["region"].copy()
  F = img.shape[0]
  if rng.random() < 0.5:
    img = img.transpose(1, 0, 2)
    xy = xy[:, ::-1].copy()
    reg = reg[[1, 0, 3, 2]]
  if rng.random() < 0.5:
    img = img[:, ::-1]
    xy[:, 0] = F - 1 - xy[:, 0]
    reg = np.array([F - reg[2], reg[1], F - reg[0], reg[3]], np.float32)
  if rng.random() < 0.5:
    img = img[::-1]
    xy[:, 1] = F - 1 - xy[:, 1]
    reg = np.array([reg[0], F - reg[3], reg[2], F - reg[1]], np.float32)
  return {**sample, "image": np.ascontiguousarray(img), "coords": xy, "region": reg}


def collate(samples: Sequence[dict[str, np.ndarray]], max_points: int) -> dict[str, np.ndarray]:
  """Stacks samples, padding nucleus lists to a static `max_points` with a boolean `mask`.

  Raises:
    ValueError: if a sample holds more than `max_points` nuclei (raise `max_points`; dropping labels would turn
      real nuclei into background targets).
  """
  B = len(samples)
  coords = np.zeros((B, max_points, 2), np.float32)
  classes = np.full((B, max_points), -1, np.int32)
  mask = np.zeros((B, max_points), bool)
  for i, s in enumerate(samples):
    n = len(s["coords"])
    if n > max_points:
      raise ValueError(f"a sample holds {n} nuclei, more than max_points={max_points}")
    coords[i, :n], classes[i, :n], mask[i, :n] = s["coords"], s["classes"], True
  return {"images": np.stack([s["image"] for s in samples]), "coords": coords, "classes": classes, "mask": mask,
          "region": np.stack([s["region"] for s in samples]).astype(np.float32)}


def in_region(points: Any, region: Any) -> Any:
  """Boolean: points [..., P, 2] inside boxes region [..., 4] = (x0, y0, x1, y1) (half-open). NumPy or JAX."""
  x, y = points[..., 0], points[..., 1]
  r = region[..., None, :]
  return (x >= r[..., 0]) & (x < r[..., 2]) & (y >= r[..., 1]) & (y < r[..., 3])
