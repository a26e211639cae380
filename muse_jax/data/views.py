"""MPP-based multi-view cropping and augmentations for MUSE pretraining (spec §3.2, §3.3), in numpy + PIL.

A *region* is an image `[H, W, 3]` uint8 at `region_mpp` µm/px with nucleus coordinates `[N, 2]` (x, y); nucleus
`i` has id `i` (its row), and that id follows it into every view.

Geometry (all in the PIL/edge convention internally, pixel centres at integers for coordinates):
* A view of `size` px at `mpp` µm/px covers `size * mpp` µm, i.e. `fov = size * mpp / region_mpp` region pixels.
* Its top-left corner `(x0, y0)` (region pixel edges, float) is drawn so that the view lies inside the region. If the
  region is smaller than `fov` along an axis, the view is centred on the region along that axis and the missing
  pixels are filled with `pad_mode` ('reflect' by default, 'constant' = white slide background). No view is ever
  stretched: the aspect ratio and the mpp are exact. Padded (mirrored) tissue carries no nucleus coordinates.
* Region coordinates map to view coordinates as `x_view = (x + 0.5 - x0) * region_mpp / mpp - 0.5`
  (so coordinates scale by `region_mpp / mpp`). A nucleus is kept when its nearest view pixel exists:
  `-0.5 <= x_view < size - 0.5` (same for y).
* Local views are centred on a point drawn uniformly inside one randomly chosen global view (then clipped to the
  region), so that local and global views share nuclei (spec §3.2, "making views overlap"). With
  `global_in_global`, global views after the first are likewise centred inside the first one, so the teacher's two
  global views share nuclei too (small regions or small views; off in the spec configs).
* Geometric augmentation per view: horizontal flip `x -> size - 1 - x`, vertical flip `y -> size - 1 - y`,
  90° rotation counter-clockwise (`np.rot90`) `(x, y) -> (y, size - 1 - x)`.
* Photometric augmentation per view: the colour augmentation `color_aug` ('rgb': DINO's colour jitter of
  brightness, contrast, saturation, hue in random order, composed into one affine colour map, hue a YIQ chroma
  rotation; 'hed': H&E stain jitter, a scale/shift of the haematoxylin/eosin/DAB optical densities through
  skimage `rgb2hed`/`hed2rgb`; 'none'), grayscale, Gaussian blur (PIL; sigma in view px from `blur_sigma`, or in
  µm from `blur_sigma_um`, divided by the view's mpp), solarisation (x >= 128 -> 255 - x).

Two places to augment (`cfg['augment_on']`, issue #23):
* 'host' (the default of the CPU-scale recipes): everything above runs here, in numpy + PIL; a view leaves the
  host as uint8 `images` [V, size, size, 3].
* 'device' (the accelerator recipes): the host only crops and packs. A view leaves as `crops` uint8 [V, S, S, 3]
  (the window around its field of view, unresized, `S = crop_buffer_size(size, cfg)`), `box` f32 [V, 3]
  (`ox, oy, fov`: the field of view inside the crop, edge coordinates in crop pixels) and `geom` i32 [V, 3]
  (`hflip, vflip, k`); its nucleus coordinates are already in the final (resized, flipped, rotated) view, exactly
  as in 'host' mode. The jitted step (`muse_jax.pretrain.augment.render`) resizes, flips, rotates and applies the
  photometric augmentations on the accelerator, keyed by the step's RNG.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageFilter, ImageOps

# ----------------------------------------------------------------------------------------------------- geometry


def sample_mpp(rng: np.random.Generator, dist: str, mpp_range=(0.25, 0.5), choices=(0.25, 0.5)) -> float:
  """Draws one view mpp: 'uniform' or 'loguniform' on `mpp_range`, or 'discrete' from `choices` (uniformly)."""
  lo, hi = float(mpp_range[0]), float(mpp_range[1])
  if dist == 'uniform':
    return float(rng.uniform(lo, hi))
  if dist == 'loguniform':
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
  if dist == 'discrete':
    return float(choices[int(rng.integers(len(choices)))])
  raise ValueError(f'mpp_dist {dist!r}: expected "uniform", "loguniform" or "discrete".')


def place_view(rng: np.random.Generator, region_hw: tuple[int, int], fov: float,
               center: tuple[float, float] | None = None) -> tuple[float, float]:
  """Top-left `(x0, y0)` (region pixel edges) of a `fov` x `fov` window.

  Uniform inside the region when `center` is None, else centred on `center` (edge coordinates) and clipped to
  the region. Along an axis where the region is smaller than `fov`, the window is centred on the region.
  """
  out = []
  for axis, extent in enumerate((region_hw[1], region_hw[0])):
    if extent <= fov:
      out.append((extent - fov) / 2.0)
    elif center is None:
      out.append(float(rng.uniform(0.0, extent - fov)))
    else:
      out.append(float(np.clip(center[axis] - fov / 2.0, 0.0, extent - fov)))
  return out[0], out[1]


def crop_resize_pil(image: np.ndarray | Image.Image, x0: float, y0: float, fov: float, size: int,
                    pad_mode: str = 'reflect', resample: int = Image.BILINEAR) -> Image.Image:
  """Cuts the `fov` x `fov` window at `(x0, y0)` (edge coordinates) and resizes it to `size` x `size`.

  `image` is uint8 [H,W,3] or a PIL RGB image of it. Pixels outside the image are filled with `pad_mode`
  ('reflect' or 'constant' = 255). PIL's resize filters with a support scaled to the downsampling factor
  (antialiased), like cv2.INTER_AREA rather than plain bilinear sampling.
  """
  w, h = (image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0]))
  pl, pt = max(0, math.ceil(-x0)), max(0, math.ceil(-y0))
  pr, pb = max(0, math.ceil(x0 + fov - w)), max(0, math.ceil(y0 + fov - h))
  if not (pl or pt or pr or pb):
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    return im.resize((size, size), resample, box=(x0, y0, x0 + fov, y0 + fov))
  arr = np.asarray(image)
  # Only the part of the image that the box touches (+2 px for the filter) is padded.
  cx0, cy0 = max(0, int(math.floor(x0)) - 2), max(0, int(math.floor(y0)) - 2)
  cx1, cy1 = min(w, int(math.ceil(x0 + fov)) + 2), min(h, int(math.ceil(y0 + fov)) + 2)
  sub = arr[cy0:cy1, cx0:cx1]
  if pad_mode == 'constant':
    sub = np.pad(sub, ((pt, pb), (pl, pr), (0, 0)), mode='constant', constant_values=255)
  elif pad_mode == 'reflect':
    sub = np.pad(sub, ((pt, pb), (pl, pr), (0, 0)), mode='reflect' if min(sub.shape[:2]) > 1 else 'edge')
  else:
    raise ValueError(f'pad_mode {pad_mode!r}: expected "reflect" or "constant".')
  bx, by = x0 - cx0 + pl, y0 - cy0 + pt
  return Image.fromarray(np.ascontiguousarray(sub)).resize((size, size), resample, box=(bx, by, bx + fov, by + fov))


def crop_resize(image: np.ndarray, x0: float, y0: float, fov: float, size: int, pad_mode: str = 'reflect',
                resample: int = Image.BILINEAR) -> np.ndarray:
  """`crop_resize_pil` returning uint8 [size, size, 3]."""
  return np.asarray(crop_resize_pil(image, x0, y0, fov, size, pad_mode, resample), dtype=np.uint8)


def crop_buffer_size(size: int, cfg: Mapping[str, Any]) -> int:
  """Side S (px) of the crop buffer of a `size` px view in 'device' mode: `ceil(size * f) + 5`, where `f` is
  `cfg['device_crop_factor']` or, when None, the largest field of view in units of the view: max view mpp / the
  region's mpp (`cfg['region_mpp']`; 2.0 when the records carry their own mpp, i.e. 0.5 µm/px views of 0.25 µm/px
  scans). The +5 holds the 2 px margin that the resize filter reads on each side of the field of view. A view whose
  field of view is wider than `S - 5` is reduced on the host first (`crop_window`)."""
  f = cfg.get('device_crop_factor')
  if f is None:
    hi = float(max(cfg['mpp_choices'])) if cfg['mpp_dist'] == 'discrete' else float(cfg['mpp_range'][1])
    f = hi / float(cfg['region_mpp']) if cfg.get('region_mpp') else 2.0
  return int(math.ceil(size * float(f) - 1e-9)) + 5


def _window_index(start: int, length: int, n: int, pad_mode: str) -> tuple[np.ndarray, np.ndarray]:
  """Source indices of pixels `start .. start + length - 1` of an axis of `n` px, mapped inside as `np.pad` does
  ('reflect': mirrored without repeating the edge, 'edge' when n == 1; 'constant': clipped, with an `inside` mask
  marking the pixels that exist)."""
  i = np.arange(start, start + length)
  inside = (i >= 0) & (i < n)
  if pad_mode == 'reflect':
    if n == 1:
      return np.zeros_like(i), inside
    period = 2 * (n - 1)
    j = np.mod(i, period)
    return np.where(j < n, j, period - j), inside
  if pad_mode == 'constant':
    return np.clip(i, 0, n - 1), inside
  raise ValueError(f'pad_mode {pad_mode!r}: expected "reflect" or "constant".')


def crop_window(image: np.ndarray, x0: float, y0: float, fov: float, buffer: int, pad_mode: str = 'reflect',
                out: np.ndarray | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
  """The unresized window of a view for 'device' mode: uint8 [buffer, buffer, 3] and the field of view in it.

  The window starts 2 px before the field of view (`(x0, y0)`, `fov`: region edge coordinates) so that the
  device's resize filter reads real neighbours, as PIL does on the host; pixels outside the region are filled with
  `pad_mode` as in `crop_resize_pil` (np.pad semantics). Only the `ceil(fov) + 5` px that the resize reads are
  written (into `out` when given, else into a new zero buffer); the rest of the buffer is never read. Returns
  `(crop, (ox, oy, f))`: the field of view is `[ox, ox + f)` x `[oy, oy + f)` of `crop` (edge coordinates), with
  `f <= buffer - 5` and at least 2 px of margin around it. When `fov + 5 > buffer` a wider window (margins of
  `ceil(2.5 / s)` px, `s = (buffer - 5) / fov`) is first reduced to `buffer` px on the host (PIL, antialiased),
  and the box is scaled with it.
  """
  arr = np.asarray(image)
  h, w = arr.shape[:2]
  if fov + 5 <= buffer:
    margin = 2
    side = min(buffer, int(math.ceil(fov)) + 5)
  else:
    margin = int(math.ceil(2.5 * fov / (buffer - 5)))
    side = int(math.ceil(fov + 2 * margin)) + 1
  xi, yi = int(math.floor(x0)) - margin, int(math.floor(y0)) - margin
  iy, in_y = _window_index(yi, side, h, pad_mode)
  ix, in_x = _window_index(xi, side, w, pad_mode)
  if 0 <= yi and yi + side <= h and 0 <= xi and xi + side <= w:
    win = arr[yi:yi + side, xi:xi + side]
  else:
    win = arr[np.ix_(iy, ix)]
    if pad_mode == 'constant':
      win = np.where((in_y[:, None] & in_x[None, :])[..., None], win, np.uint8(255))
  if out is None:
    out = np.zeros((buffer, buffer, 3), np.uint8)
  box = (x0 - xi, y0 - yi, fov)
  if side > buffer:
    s = buffer / side
    out[:] = np.asarray(Image.fromarray(np.ascontiguousarray(win)).resize((buffer, buffer), Image.BILINEAR))
    box = (box[0] * s, box[1] * s, fov * s)
  else:
    out[:side, :side] = win
  return out, (float(box[0]), float(box[1]), float(box[2]))


def map_coords(coords: np.ndarray, x0: float, y0: float, fov: float, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Region coords [N,2] -> view coords [N,2] (float32) and the boolean `inside` mask [N]."""
  s = size / fov
  out = ((np.asarray(coords, np.float32) + 0.5 - np.array([x0, y0], np.float32)) * s - 0.5).astype(np.float32)
  inside = ((out >= -0.5) & (out < size - 0.5)).all(axis=1)
  return out, inside


def geometric_coords(coords: np.ndarray, size: int, hflip: bool, vflip: bool, k: int) -> np.ndarray:
  """Coordinates [N,2] under h-flip, v-flip, then `k` counter-clockwise 90° rotations of a `size` px square."""
  c = np.array(coords, np.float32, copy=True).reshape(-1, 2)
  if hflip:
    c[:, 0] = size - 1 - c[:, 0]
  if vflip:
    c[:, 1] = size - 1 - c[:, 1]
  for _ in range(k % 4):
    c = np.stack([c[:, 1], size - 1 - c[:, 0]], axis=1)
  return c.astype(np.float32)


_ROT = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def flip_rotate_pil(im: Image.Image, hflip: bool, vflip: bool, k: int) -> Image.Image:
  """The image half of `geometric_coords` with PIL (ROTATE_90 is counter-clockwise, as `np.rot90`)."""
  if hflip:
    im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  if vflip:
    im = im.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
  if k % 4:
    im = im.transpose(_ROT[k % 4])
  return im


def flip_rotate(image: np.ndarray, coords: np.ndarray, hflip: bool, vflip: bool, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Applies h-flip, v-flip, then `k` counter-clockwise 90° rotations to a square view (uint8) and its coords."""
  im = flip_rotate_pil(Image.fromarray(np.ascontiguousarray(image)), hflip, vflip, k)
  return np.asarray(im), geometric_coords(coords, image.shape[0], hflip, vflip, k)


# ----------------------------------------------------------------------------------------------------- photometric

_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)
_LUMA = np.array([0.299, 0.587, 0.114])


def color_jitter(im: Image.Image, rng: np.random.Generator, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Image.Image:
  """DINO's colour jitter (torchvision semantics) as one affine colour map, the four adjustments in random order.

  brightness: `x -> b x`; contrast: blend with the mean gray level, `x -> c x + (1 - c) mean(gray)`; saturation:
  blend with the grayscale image; factors U(1-x, 1+x). hue: rotation of the chroma plane in YIQ space by
  U(-hue, hue) of a full turn (a linear stand-in for torchvision's HSV hue shift). All four are affine in RGB, so
  they are composed (in the drawn order) and applied in one pass with `PIL.Image.convert(matrix=...)`; unlike
  torchvision, values are clipped to [0, 255] only once, at the end.
  """
  a = np.eye(3)
  t = np.zeros(3)
  mean_rgb = np.asarray(im.resize((1, 1), Image.Resampling.BOX).getpixel((0, 0)), np.float64)  # mean, rounded
  for op in rng.permutation(4):
    if op == 0 and brightness > 0:
      m, d = np.eye(3) * rng.uniform(max(0.0, 1 - brightness), 1 + brightness), np.zeros(3)
    elif op == 1 and contrast > 0:
      c = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
      gray_mean = float(_LUMA @ (a @ mean_rgb + t))
      m, d = np.eye(3) * c, np.full(3, (1 - c) * gray_mean)
    elif op == 2 and saturation > 0:
      sat = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
      m, d = sat * np.eye(3) + (1 - sat) * np.outer(np.ones(3), _LUMA), np.zeros(3)
    elif op == 3 and hue > 0:
      theta = 2 * np.pi * rng.uniform(-hue, hue)
      co, si = np.cos(theta), np.sin(theta)
      m, d = _YIQ2RGB @ np.array([[1, 0, 0], [0, co, -si], [0, si, co]]) @ _RGB2YIQ, np.zeros(3)
    else:
      continue
    a, t = m @ a, m @ t + d
  return im.convert('RGB', matrix=tuple(np.concatenate([a, t[:, None]], axis=1).ravel().tolist()))


def stain_jitter(img_u8: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
  """H&E stain jitter: each HED optical-density channel is scaled by U(1-s, 1+s) and shifted by U(-s, s)*0.05."""
  from skimage.color import hed2rgb, rgb2hed  # pylint: disable=g-import-not-at-top
  hed = rgb2hed(img_u8)
  alpha = rng.uniform(1 - strength, 1 + strength, size=3)
  beta = rng.uniform(-strength, strength, size=3) * 0.05
  rgb = hed2rgb(hed * alpha + beta)
  return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


COLOR_AUGS = ('rgb', 'hed', 'none')


def blur_sigma_px(rng: np.random.Generator, cfg: Mapping[str, Any], mpp: float | None) -> float:
  """One Gaussian-blur sigma in view pixels: U(`blur_sigma_um`) µm / `mpp` when `blur_sigma_um` is set (physical,
  the same blur of the tissue at every view scale), else U(`blur_sigma`) px (DINO's pixel-space range)."""
  um = cfg.get('blur_sigma_um')
  if um is not None:
    if mpp is None or not mpp > 0:
      raise ValueError(f'blur_sigma_um={um} needs the view mpp (got {mpp})')
    return float(rng.uniform(float(um[0]), float(um[1]))) / float(mpp)
  return float(rng.uniform(*cfg['blur_sigma']))


def photometric_pil(im: Image.Image, rng: np.random.Generator, cfg: Mapping[str, Any], *, blur_p: float,
                    solarize_p: float, mpp: float | None = None) -> Image.Image:
  """The per-view photometric pipeline on a PIL RGB image: colour augmentation, grayscale, blur, solarise.

  `cfg['color_aug']` picks the colour augmentation (applied with probability `color_jitter_p`):
  'rgb' = DINO's colour jitter (brightness, contrast, saturation, hue; plus H&E stain jitter first when
  `stain_jitter` > 0, the behaviour of configs from before `color_aug` existed); 'hed' = H&E stain jitter of
  strength `stain_jitter` (per-stain optical-density scale and shift: changes staining, keeps morphology);
  'none' = no colour change. Grayscale (`grayscale_p`), blur (`blur_p`, sigma from `blur_sigma_px`) and
  solarisation follow for every choice. `mpp` is the view's µm/px (needed for `blur_sigma_um`).
  """
  aug = cfg.get('color_aug', 'rgb')
  if aug not in COLOR_AUGS:
    raise ValueError(f'data.color_aug={aug!r}: expected one of {COLOR_AUGS}')
  strength = float(cfg.get('stain_jitter', 0.0))
  if aug == 'rgb':
    if strength > 0:
      im = Image.fromarray(stain_jitter(np.asarray(im), rng, strength))
    if rng.uniform() < cfg['color_jitter_p']:
      im = color_jitter(im, rng, cfg['brightness'], cfg['contrast'], cfg['saturation'], cfg['hue'])
  elif aug == 'hed':
    if strength <= 0:
      raise ValueError("data.color_aug='hed' needs data.stain_jitter > 0 (e.g. 0.1)")
    if rng.uniform() < cfg['color_jitter_p']:
      im = Image.fromarray(stain_jitter(np.asarray(im), rng, strength))
  if rng.uniform() < cfg['grayscale_p']:
    im = im.convert('L').convert('RGB')
  if rng.uniform() < blur_p:
    im = im.filter(ImageFilter.GaussianBlur(radius=blur_sigma_px(rng, cfg, mpp)))
  if rng.uniform() < solarize_p:
    im = ImageOps.solarize(im, 128)
  return im


def photometric(img_u8: np.ndarray, rng: np.random.Generator, cfg: Mapping[str, Any], *, blur_p: float,
                solarize_p: float, mpp: float | None = None) -> np.ndarray:
  """`photometric_pil` on uint8 [H, W, 3] arrays."""
  im = photometric_pil(Image.fromarray(np.ascontiguousarray(img_u8)), rng, cfg, blur_p=blur_p,
                       solarize_p=solarize_p, mpp=mpp)
  return np.asarray(im, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------- views


def pad_nuclei(coords: np.ndarray, ids: np.ndarray, max_nuclei: int, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Pads (or randomly subsamples) to `max_nuclei`: coords [M,2] f32 (0 at pads), ids [M] i32 (-1), mask [M] bool."""
  n = len(ids)
  if n > max_nuclei:
    sel = np.sort(rng.choice(n, max_nuclei, replace=False))
    coords, ids, n = coords[sel], ids[sel], max_nuclei
  c = np.zeros((max_nuclei, 2), np.float32)
  i = np.full((max_nuclei,), -1, np.int32)
  m = np.zeros((max_nuclei,), bool)
  c[:n], i[:n], m[:n] = coords, ids, True
  return c, i, m


AUGMENT_ON = ('host', 'device')


def augment_on(cfg: Mapping[str, Any]) -> str:
  """'host' or 'device' (`cfg['augment_on']`; configs from before the field are 'host')."""
  where = cfg.get('augment_on', 'host')
  if where not in AUGMENT_ON:
    raise ValueError(f'data.augment_on={where!r}: expected one of {AUGMENT_ON}')
  return where


def _one_view(region, coords, ids, rng, cfg, size, mpp, region_mpp, center, max_nuclei, blur_p, solarize_p,
              out=None):
  """One view. 'host' mode (`out` None; `region` a PIL image): (uint8 image [size, size, 3], coords, ids, mask,
  box); 'device' mode (`region` uint8 [H, W, 3], the crop written into `out` [S, S, 3]): (out, coords, ids, mask,
  box, (ox, oy, f) in the crop, (hflip, vflip, k))."""
  hw = (region.size[1], region.size[0]) if out is None else region.shape[:2]
  fov = size * mpp / region_mpp
  x0, y0 = place_view(rng, hw, fov, center)
  if out is None:
    im = crop_resize_pil(region, x0, y0, fov, size, cfg['pad_mode'])
  else:
    crop, crop_box = crop_window(region, x0, y0, fov, out.shape[0], cfg['pad_mode'], out=out)
  vc, inside = map_coords(coords, x0, y0, fov, size)
  vc, vid = vc[inside], ids[inside]
  hflip = bool(cfg['flips']) and rng.uniform() < 0.5
  vflip = bool(cfg['flips']) and rng.uniform() < 0.5
  k = int(rng.integers(4)) if cfg['rot90'] else 0
  vc = geometric_coords(vc, size, hflip, vflip, k)
  if out is None:
    im = flip_rotate_pil(im, hflip, vflip, k)
    im = photometric_pil(im, rng, cfg, blur_p=blur_p, solarize_p=solarize_p, mpp=mpp)
  c, i, m = pad_nuclei(vc, vid, max_nuclei, rng)
  if out is None:
    return np.asarray(im, dtype=np.uint8), c, i, m, (x0, y0, fov)
  return crop, c, i, m, (x0, y0, fov), crop_box, (int(hflip), int(vflip), k)


def make_views(record: Mapping[str, Any], rng: np.random.Generator, cfg: Mapping[str, Any]) -> dict:
  """Turns one region record into MUSE's multi-view training example.

  Args:
    record: `image` uint8 [H,W,3]; `coords` float32 [N,2] (x, y) region pixels; optional `mpp` (used when
      `cfg.region_mpp` is None).
    rng: the record's generator (Grain `random_map` gives one per record).
    cfg: the data config (`pipeline.default_data_config()`).

  Returns:
    `{'global': {'images': uint8 [Vg,G,G,3], 'coords': f32 [Vg,Mg,2], 'ids': i32 [Vg,Mg], 'mask': bool [Vg,Mg],
    'mpp': f32 [Vg]}, 'local': {... [Vl, L, ...], Ml}}` ('local' absent when n_local == 0). With
    `cfg['augment_on'] == 'device'`, `images` is replaced by `crops` uint8 [V, S, S, 3], `box` f32 [V, 3] and
    `geom` i32 [V, 3] (module docstring); coords, ids, mask and mpp are the same fields.
  """
  image = np.asarray(record['image'], np.uint8)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'region image has shape {image.shape}, expected [H, W, 3].')
  coords = np.asarray(record['coords'], np.float32).reshape(-1, 2)
  ids = np.arange(len(coords), dtype=np.int32)
  device = augment_on(cfg) == 'device'
  region = image if device else Image.fromarray(np.ascontiguousarray(image))
  if cfg['region_mpp'] is not None:
    region_mpp = float(cfg['region_mpp'])
  elif 'mpp' in record:
    region_mpp = float(np.asarray(record['mpp']))
  else:
    raise ValueError('region record has no "mpp" and data_cfg.region_mpp is None: set one of them (µm/px).')
  blur_g1, blur_g2, blur_l = cfg['blur_p']
  out = {}
  boxes = []
  groups = [('global', cfg['n_global'], cfg['global_size'], cfg['max_nuclei_global'])]
  if cfg['n_local'] > 0:
    groups.append(('local', cfg['n_local'], cfg['local_size'], cfg['max_nuclei_local']))
  for group, n, size, max_n in groups:
    ims, cs, is_, ms, mpps, crop_boxes, geoms = [], [], [], [], [], [], []
    # One static buffer per group for every record (from the config, not from this record's mpp).
    crops = None
    if device:
      buffer = crop_buffer_size(size, cfg)
      crops = np.zeros((n, buffer, buffer, 3), np.uint8)
    for v in range(n):
      mpp = sample_mpp(rng, cfg['mpp_dist'], cfg['mpp_range'], cfg['mpp_choices'])
      if group == 'global':
        center, blur_p = None, (blur_g1 if v == 0 else blur_g2)
        sol_p = cfg['solarize_p'] if v == 1 else 0.0
        if cfg.get('global_in_global', False) and boxes:
          gx0, gy0, gf = boxes[0]
          center = (gx0 + rng.uniform(0, gf), gy0 + rng.uniform(0, gf))
      else:
        center, blur_p, sol_p = None, blur_l, 0.0
        if cfg['local_in_global'] and boxes:
          gx0, gy0, gf = boxes[int(rng.integers(len(boxes)))]
          center = (gx0 + rng.uniform(0, gf), gy0 + rng.uniform(0, gf))
      im, c, i, m, box, *dev = _one_view(region, coords, ids, rng, cfg, size, mpp, region_mpp, center, max_n,
                                         blur_p, sol_p, None if crops is None else crops[v])
      if group == 'global':
        boxes.append(box)
      ims.append(im), cs.append(c), is_.append(i), ms.append(m), mpps.append(mpp)
      if dev:
        crop_boxes.append(dev[0]), geoms.append(dev[1])
    out[group] = {'coords': np.stack(cs), 'ids': np.stack(is_), 'mask': np.stack(ms),
                  'mpp': np.asarray(mpps, np.float32)}
    if device:
      out[group].update(crops=crops, box=np.asarray(crop_boxes, np.float32),
                        geom=np.asarray(geoms, np.int32))
    else:
      out[group]['images'] = np.stack(ims)
  return out


def shared_nuclei(example: Mapping[str, Any]) -> np.ndarray:
  """Number of nuclei shared by each (global, local) view pair of one example: int [Vg, Vl]."""
  g, l = example['global'], example['local']
  out = np.zeros((g['ids'].shape[0], l['ids'].shape[0]), np.int64)
  for a in range(out.shape[0]):
    ga = set(g['ids'][a][g['mask'][a]].tolist())
    for b in range(out.shape[1]):
      out[a, b] = len(ga.intersection(l['ids'][b][l['mask'][b]].tolist()))
  return out
