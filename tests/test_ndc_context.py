"""Real context around labelled tiles for LFoV fine-tuning (muse_jax/ndc/context.py)."""
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from muse_jax.data.readers import Sample
from muse_jax.ndc import context as context_lib
from muse_jax.ndc import lfov
from muse_jax.ndc import train as ndc_train


def _texture(h, w, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def slide_and_tile(tmp_path):
  big = _texture(300, 400)
  Image.fromarray(big).save(tmp_path / "slide.png")
  x0, y0, W, H = 150, 100, 64, 48
  tile = big[y0:y0 + H, x0:x0 + W].copy()
  (tmp_path / "ctx.csv").write_text(f"name,context,x,y,mpp\ntileA,slide.png,{x0},{y0},0.5\n")
  return tmp_path, big, tile, (x0, y0)


def test_manifest_and_crop_match_the_slide(slide_and_tile):
  d, big, tile, (x0, y0) = slide_and_tile
  entries = context_lib.read_manifest(d / "ctx.csv")
  assert entries["tileA"].path == str(d / "slide.png") and entries["tileA"].mpp == 0.5
  prov = context_lib.ContextProvider(entries, mpp=0.5, margin=32)
  crop, (ox, oy) = prov.get("tileA", tile)
  assert (ox, oy) == (32, 32) and crop.shape == (48 + 64, 64 + 64, 3)
  np.testing.assert_array_equal(crop[oy:oy + 48, ox:ox + 64], tile)
  np.testing.assert_array_equal(crop, big[y0 - 32:y0 + 48 + 32, x0 - 32:x0 + 64 + 32])


def test_lfov_field_comes_from_the_context_not_padding(slide_and_tile):
  d, big, tile, (x0, y0) = slide_and_tile
  prov = context_lib.ContextProvider(context_lib.read_manifest(d / "ctx.csv"), mpp=0.5, margin=96)
  ctx, origin = prov.get("tileA", tile)
  coords = np.array([[10.0, 20.0], [50.0, 5.0]], np.float32)
  smp = lfov.make_lfov_sample(tile, coords, np.array([0, 1]), field=96, rng=np.random.default_rng(3),
                              context=ctx, tile_origin=origin)
  x_r0, y_r0 = int(smp["region"][0]), int(smp["region"][1])
  # The field is the slide shifted so that the labelled window sits at the region box: every pixel is real.
  fx, fy = x0 - x_r0, y0 - y_r0
  np.testing.assert_array_equal(smp["image"], big[fy:fy + 96, fx:fx + 96])
  np.testing.assert_allclose(smp["coords"], coords + np.array([x_r0, y_r0], np.float32))


def test_make_batch_uses_context_for_known_tiles_only(slide_and_tile):
  d, big, tile, _ = slide_and_tile
  cfg = ml_collections.ConfigDict({
      "seed": 0, "lfov": {"enabled": True, "field": 96, "label_size": None, "pad_mode": "constant",
                          "flips": False, "center": True, "no_lfov_field": 96},
      "data": {"mpp": 0.5, "context": str(d / "ctx.csv")}})
  pts = np.array([[10.0, 20.0]], np.float32)
  samples = [Sample(tile, pts, np.array([0], np.int32), 0.5, "tileA", "train"),
             Sample(tile, pts, np.array([0], np.int32), 0.5, "tileB", "train")]
  prov = context_lib.from_config(cfg.data, 96, [s.name for s in samples])
  with_ctx = ndc_train.make_batch(samples[:1], cfg, 0, 1, 64, prov)
  without = ndc_train.make_batch(samples[1:], cfg, 0, 1, 64, prov)
  # Centred 64x48 tile in a 96 field: white padding without context, slide pixels with it.
  assert (without["images"][0, :20] == 255).all()
  assert not (with_ctx["images"][0, :20] == 255).all()
  np.testing.assert_array_equal(with_ctx["images"][0, 24:72, 16:80], tile)


def test_wrong_position_is_caught(slide_and_tile):
  d, _, tile, (x0, y0) = slide_and_tile
  (d / "bad.csv").write_text(f"name,context,x,y\ntileA,slide.png,{x0 + 40},{y0}\n")
  prov = context_lib.ContextProvider(context_lib.read_manifest(d / "bad.csv"), mpp=0.5, margin=8)
  with pytest.raises(ValueError, match=r"bad.csv:2: tile 'tileA' does not match its context"):
    prov.get("tileA", tile)


def test_context_at_another_mpp_is_resampled(tmp_path):
  big = np.repeat(np.repeat(_texture(15, 20, 1), 8, 0), 8, 1)  # a 0.25 µm/px "slide" of 8x8 blocks (smooth-ish)
  Image.fromarray(big).save(tmp_path / "s.png")
  tile = big[40:104:2, 60:124:2]  # the tile as the model sees it at 0.5 µm/px (32 x 32)
  (tmp_path / "m.csv").write_text("name,context,x,y,mpp\nt,s.png,60,40,0.25\n")
  prov = context_lib.ContextProvider(context_lib.read_manifest(tmp_path / "m.csv"), mpp=0.5, margin=4)
  crop, (ox, oy) = prov.get("t", tile)
  assert crop.shape == (40, 40, 3)
  assert np.mean(np.abs(crop[oy:oy + 32, ox:ox + 32].astype(float) - tile)) < 25
  # The same 0.25 µm/px slide declared at 0.5 µm/px puts the tile at the wrong place and scale: caught.
  (tmp_path / "w.csv").write_text("name,context,x,y,mpp\nt,s.png,60,40,0.5\n")
  prov = context_lib.ContextProvider(context_lib.read_manifest(tmp_path / "w.csv"), mpp=0.5, margin=4)
  with pytest.raises(ValueError, match="does not match its context"):
    prov.get("t", tile)


@pytest.mark.parametrize("text, match", [
    ("name,x,y\nt,1,2\n", "lacks the column"),
    ("name,context,x,y\nt,missing.png,1,2\n", r"m.csv:2: context file .* does not exist"),
    ("name,context,x,y\nt,s.png,a,2\n", r"m.csv:2: x, y and mpp must be numbers"),
    ("name,context,x,y\nt,s.png,-5,2\n", r"m.csv:2: tile position"),
    ("name,context,x,y\nt,s.png,1,2\nt,s.png,3,4\n", r"m.csv:3: tile 't' is listed twice"),
])
def test_bad_manifests(tmp_path, text, match):
  Image.fromarray(_texture(10, 10)).save(tmp_path / "s.png")
  (tmp_path / "m.csv").write_text(text)
  with pytest.raises(ValueError, match=match):
    context_lib.read_manifest(tmp_path / "m.csv")


def test_no_training_tile_in_manifest_is_an_error(slide_and_tile):
  d, *_ = slide_and_tile
  cfg = ml_collections.ConfigDict({"mpp": 0.5, "context": str(d / "ctx.csv")})
  with pytest.raises(ValueError, match="none of the 2 training tiles"):
    context_lib.from_config(cfg, 64, ["x", "y"])
  assert context_lib.from_config(ml_collections.ConfigDict({"mpp": 0.5, "context": None}), 64) is None
  with pytest.raises(FileNotFoundError, match="nope.csv"):
    context_lib.read_manifest(os.path.join(d, "nope.csv"))
