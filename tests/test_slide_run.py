"""Whole-slide runs with a fake dot-finding predictor: seams, resume, empty slides, bad input, exports."""
import csv
import json

import numpy as np
import pytest
from scipy.spatial import cKDTree

from muse_jax.slide import MissingMppError, SlideError
from muse_jax.slide import run as slide_run
from muse_jax.slide.synthetic import DotPredictor, write_synthetic_slide

CFG = dict(batch_size=8, overlap=32, num_readers=2, progress=False)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
  return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "dots.tif", 1024, 768, mpp=0.5, tile=128,
                               spacing=24.0)


@pytest.fixture(scope="module")
def predictor():
  return DotPredictor(mpp=0.5, window=128)


def read_csv(path):
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  xy = np.array([[float(r["x"]), float(r["y"])] for r in rows], np.float64).reshape(-1, 2)
  return xy, [r["class"] for r in rows], rows


def test_each_dot_once_across_seams(slide, predictor, tmp_path):
  summary = slide_run.run(predictor, slide.path, tmp_path / "out", slide_run.SlideRunConfig(**CFG))
  assert summary["complete"] and summary["devices"] == 4 and summary["batch_size"] == 8
  xy, names, _ = read_csv(tmp_path / "out" / "nuclei.csv")
  # the dots on tile borders: many must lie in overlaps for this test to mean anything
  stride = 128 - 32
  near_seam = (np.abs((slide.points - 16) % stride - stride / 2) > stride / 2 - 8).any(1)
  assert near_seam.sum() > 80
  assert len(xy) == len(slide.points) == summary["nuclei"]
  dist, idx = cKDTree(slide.points).query(xy)
  assert dist.max() < 1e-3 and len(set(idx.tolist())) == len(slide.points)
  assert names == [predictor.class_names[c] for c in slide.classes[idx]]
  counts = summary["counts"]
  assert counts == {n: int((slide.classes == k).sum()) for k, n in enumerate(predictor.class_names)}
  assert summary["density_per_mm2"]["blue_dot"] == pytest.approx(counts["blue_dot"] / summary["tissue_area_mm2"])
  geo = json.loads((tmp_path / "out" / "nuclei.geojson").read_text())
  assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(xy)
  f0 = geo["features"][0]
  assert f0["geometry"]["type"] == "Point" and f0["properties"]["objectType"] == "detection"
  assert f0["properties"]["classification"]["name"] in predictor.class_names
  assert len(f0["properties"]["classification"]["color"]) == 3
  assert json.loads((tmp_path / "out" / "summary.json").read_text())["nuclei"] == len(xy)
  from PIL import Image
  assert Image.open(tmp_path / "out" / "overlay.png").size == (256, 192)  # 2 µm/px


@pytest.mark.parametrize("pull_px", [1.5, -1.5])
def test_seam_merge_when_tiles_disagree(slide, tmp_path, pull_px):
  # neighbouring tiles place a seam dot 3 px apart (per axis), on both sides of (or both inside) the core border
  pred = DotPredictor(mpp=0.5, window=128, pull_px=pull_px)
  summary = slide_run.run(pred, slide.path, tmp_path / "out", slide_run.SlideRunConfig(**CFG))
  xy, _, _ = read_csv(tmp_path / "out" / "nuclei.csv")
  assert summary["seam_merged"] > 50
  assert len(xy) == len(slide.points)
  dist, idx = cKDTree(slide.points).query(xy)
  assert dist.max() <= 1.5 * np.sqrt(2) + 1e-3 and len(set(idx.tolist())) == len(slide.points)


class Crash(RuntimeError):
  pass


class CrashingPredictor(DotPredictor):
  """Dies on its third call, like a run killed half way."""

  def predict_tiles(self, tiles):
    if self.calls == 2:
      raise Crash("killed")
    return super().predict_tiles(tiles)


def test_interrupted_runs_resume_to_the_same_output(slide, predictor, tmp_path):
  full = slide_run.run(predictor, slide.path, tmp_path / "full", slide_run.SlideRunConfig(**CFG))
  # stopped by the max_batches hook, then by a crash, then finished
  first = slide_run.run(predictor, slide.path, tmp_path / "resumed", slide_run.SlideRunConfig(**CFG, max_batches=2))
  assert not first["complete"] and first["tiles_done"] == 16
  assert not (tmp_path / "resumed" / "nuclei.csv").exists()
  crashing = CrashingPredictor(mpp=0.5, window=128)
  with pytest.raises(Crash):
    slide_run.run(crashing, slide.path, tmp_path / "resumed", slide_run.SlideRunConfig(**CFG))
  done_lines = (tmp_path / "resumed" / "parts" / "done.txt").read_text().splitlines()
  assert len(done_lines) == 4
  last = slide_run.run(predictor, slide.path, tmp_path / "resumed", slide_run.SlideRunConfig(**CFG))
  assert last["complete"] and last["tiles_this_call"] == full["tiles_tissue"] - 32
  assert (tmp_path / "full" / "nuclei.csv").read_text() == (tmp_path / "resumed" / "nuclei.csv").read_text()
  assert last["counts"] == full["counts"]
  # a finished run done again reads nothing new
  again = slide_run.run(predictor, slide.path, tmp_path / "resumed", slide_run.SlideRunConfig(**CFG))
  assert again["tiles_this_call"] == 0 and again["nuclei"] == full["nuclei"]
  # other settings in the same folder: refused, unless overwrite
  with pytest.raises(ValueError, match="different run"):
    slide_run.run(predictor, slide.path, tmp_path / "resumed", slide_run.SlideRunConfig(**{**CFG, "overlap": 48}))


def test_slide_without_tissue_gives_empty_outputs(tmp_path, predictor):
  empty = write_synthetic_slide(tmp_path / "glass.tif", 600, 400, mpp=0.5, tissue=False, tile=64)
  summary = slide_run.run(predictor, empty.path, tmp_path / "out", slide_run.SlideRunConfig(**CFG))
  assert summary["complete"] and summary["tiles_tissue"] == 0 and summary["nuclei"] == 0
  assert summary["tissue_area_mm2"] == 0 and summary["density_per_mm2"] is None
  assert json.loads((tmp_path / "out" / "nuclei.geojson").read_text())["features"] == []
  assert (tmp_path / "out" / "nuclei.csv").read_text().strip() == "x,y,class,score"


def test_bad_slides_raise_clear_errors(tmp_path, predictor):
  bad = tmp_path / "report.svs"
  bad.write_bytes(b"%PDF-1.4 not a slide")
  with pytest.raises(SlideError, match="report.svs"):
    slide_run.run(predictor, bad, tmp_path / "out", slide_run.SlideRunConfig(**CFG))
  nompp = write_synthetic_slide(tmp_path / "nompp.tif", 300, 300, mpp=None, tile=64)
  with pytest.raises(MissingMppError, match="--mpp"):
    slide_run.run(predictor, nompp.path, tmp_path / "out2", slide_run.SlideRunConfig(**CFG))
  with pytest.raises(ValueError, match="merge radius"):
    slide_run.run(predictor, nompp.path, tmp_path / "out3", slide_run.SlideRunConfig(**{**CFG, "mpp": 0.5,
                                                                                          "overlap": 8}))


def test_cut_short_done_line_is_redone(slide, predictor, tmp_path):
  cfg = slide_run.SlideRunConfig(**CFG, max_batches=2)
  slide_run.run(predictor, slide.path, tmp_path / "out", cfg)
  done = tmp_path / "out" / "parts" / "done.txt"
  lines = done.read_text().splitlines()
  done.write_text(lines[0] + "\n" + lines[1][:20])  # the run died while writing the second line
  again = slide_run.run(predictor, slide.path, tmp_path / "out", slide_run.SlideRunConfig(**CFG))
  assert again["complete"] and again["tiles_this_call"] == again["tiles_tissue"] - 8
  assert again["nuclei"] == len(slide.points)
