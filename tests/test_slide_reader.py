"""Slide reading, tissue masks and tile grids: the bundled real Aperio slide, synthetic pyramids, bad input."""
import numpy as np
import pytest

from muse_jax.slide import MissingMppError, SlideError, cmu_small_region_path, open_slide, tiling, tissue
from muse_jax.slide.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
  return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "pyr.tif", 1100, 900, mpp=0.5, tile=128)


def test_cmu_reads_with_metadata_mpp_and_has_tissue():
  with open_slide(cmu_small_region_path()) as s:
    assert s.vendor == "aperio" and s.mpp_source == "metadata"
    assert s.mpp == pytest.approx(0.499)
    assert s.dimensions == (2220, 2967)
    region = s.read_at_mpp(100, 200, 64, 48, mpp=1.0)
    assert region.shape == (48, 64, 3) and region.dtype == np.uint8
    thumb = s.thumbnail(8.0)
  assert thumb.shape[:2] == (186, 139)
  mask = tissue.tissue_mask(thumb, 8.0)
  assert 0.1 < mask.mean() < 0.9  # skin tissue on a large white background
  assert 0.2 < tissue.tissue_area_mm2(mask, 8.0) < 1.5


def test_user_mpp_overrides_metadata():
  with open_slide(cmu_small_region_path(), mpp=0.25) as s:
    assert s.mpp == 0.25 and s.mpp_source == "user"
  with pytest.raises(ValueError, match="mpp"):
    open_slide(cmu_small_region_path(), mpp=-1.0)


def test_pyramid_levels_and_resampling(pyramid):
  with open_slide(pyramid.path) as s:
    assert s.mpp == 0.5 and len(s.level_dimensions) >= 2
    assert s.level_downsamples[:2] == (1.0, 2.0)
    assert s.best_level(0.5) == 0 and s.best_level(1.0) == 1 and s.best_level(1.9) == 1 and s.best_level(0.25) == 0
    full = s.read_level(0, 0, 0, 1100, 900)
    assert np.array_equal(s.read_at_mpp(0, 0, 1100, 900, 0.5), full)
    # a dot is darkest exactly at its level-0 position
    x, y = pyramid.points[len(pyramid.points) // 2].astype(int)
    win = full[y - 3:y + 4, x - 3:x + 4].astype(int).sum(-1)
    assert np.unravel_index(win.argmin(), win.shape) == (3, 3)
    # outside the slide is white; half resolution comes from level 1
    edge = s.read_at_mpp(1080, 880, 40, 40, 0.5)
    assert (edge[25:, 25:] == 255).all()
    half = s.read_at_mpp(0, 0, 550, 450, 1.0)
    assert half.shape == (450, 550, 3)
    assert abs(float(half.mean()) - float(full.mean())) < 3.0


def test_missing_mpp_error_names_file_and_flag(tmp_path):
  syn = write_synthetic_slide(tmp_path / "nompp.tif", 300, 200, mpp=None, tile=64)
  with pytest.raises(MissingMppError, match="nompp.tif") as err:
    open_slide(syn.path)
  assert "--mpp" in str(err.value)
  with open_slide(syn.path, mpp=0.5) as s:
    assert s.mpp == 0.5


def test_not_a_slide_and_plain_images(tmp_path):
  bad = tmp_path / "notes.svs"
  bad.write_text("this is not a slide")
  with pytest.raises(SlideError, match="notes.svs"):
    open_slide(bad)
  with pytest.raises(FileNotFoundError):
    open_slide(tmp_path / "missing.svs")
  from PIL import Image
  img = np.full((50, 70, 3), 200, np.uint8)
  Image.fromarray(img).save(tmp_path / "tile.png")
  with pytest.raises(MissingMppError, match="tile.png"):
    open_slide(tmp_path / "tile.png")
  with open_slide(tmp_path / "tile.png", mpp=0.5) as s:
    assert s.vendor == "image" and s.dimensions == (70, 50)
    out = s.read_level(0, -5, -5, 20, 20)
    assert (out[:5] == 255).all() and (out[5:, 5:] == 200).all()


def test_tissue_mask_empty_on_background_and_full_on_tissue():
  rng = np.random.default_rng(0)
  glass = np.clip(rng.normal(240, 3, (64, 64, 3)), 0, 255).astype(np.uint8)
  assert not tissue.tissue_mask(glass, 8.0).any()
  pink = np.clip(rng.normal((236, 170, 205), 5, (64, 64, 3)), 0, 255).astype(np.uint8)
  assert tissue.tissue_mask(pink, 8.0).mean() > 0.95
  with pytest.raises(ValueError, match="uint8"):
    tissue.tissue_mask(glass.astype(np.float32), 8.0)


def test_grid_cores_partition_and_tissue_selection():
  g = tiling.make_grid(500, 300, tile=128, overlap=32)
  assert (g.nx, g.ny) == (5, 3) and g.origin(g.num_tiles - 1).tolist() == [384, 192]
  assert (g.nx - 1) * g.stride + g.tile >= 500
  pts = np.random.default_rng(0).uniform(-10, 510, (2000, 2))
  inside = np.stack([g.in_core(i, pts) for i in range(g.num_tiles)])
  assert (inside.sum(0) == 1).all()  # every point in exactly one core
  assert (np.argmax(inside, 0) == g.owner(pts)).all()
  for i in range(g.num_tiles):  # cores lie inside their tile with overlap/2 of context
    x0, y0, x1, y1 = g.core(i)
    ox, oy = g.origin(i)
    assert x0 == -np.inf or x0 == ox + 16
    assert x1 == np.inf or x1 == ox + 128 - 16
  mask = np.zeros((30, 50), bool)
  mask[:10, :10] = True  # tissue in the top-left 100x100 model px (mask scale 0.1): only in the first core
  assert tiling.tissue_tiles(g, mask, 0.1).tolist() == [0]
  mask[:13, :13] = True  # up to 130 px: crosses the core borders at 112 px
  sel = tiling.tissue_tiles(g, mask, 0.1)
  assert sel.tolist() == [0, 1, 5, 6]
  with pytest.raises(ValueError, match="overlap"):
    tiling.make_grid(500, 300, tile=128, overlap=128)
