"""End to end: the CLI with a random-init tiny NDC checkpoint on a small synthetic slide and on the real CMU slide."""
import csv
import json

import pytest

from muse_jax import predict_slide
from muse_jax.slide import cmu_small_region_path
from muse_jax.slide.synthetic import write_random_ndc_checkpoint, write_synthetic_slide


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_random_ndc_checkpoint(tmp_path_factory.mktemp("ckpt") / "ndc", "tiny", window=128, mpp=0.5,
                                     max_detections=16, batch_size=8)


@pytest.mark.slow
def test_cli_writes_valid_outputs(checkpoint, tmp_path, capsys):
  syn = write_synthetic_slide(tmp_path / "s.tif", 700, 500, mpp=0.25, tile=128)  # a "40x" slide: resampled to 0.5
  out = tmp_path / "out"
  rc = predict_slide.main(["--checkpoint", str(checkpoint), "--slide", str(syn.path), "--out", str(out),
                           "--batch", "8", "--overlap", "32", "--no-progress"])
  assert rc == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["complete"] and summary["model_mpp"] == 0.5 and summary["slide_mpp"] == 0.25
  assert summary["devices"] == 4  # the batch is spread over the 4 fake CPU devices of conftest.py
  assert summary["tiles_tissue"] > 0 and summary["nuclei"] > 0
  assert set(summary["counts"]) == {"lymphocyte", "tumor", "stromal"}
  with open(out / "nuclei.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == summary["nuclei"]
  assert all(0 <= float(r["x"]) < 700 and 0 <= float(r["y"]) < 500 for r in rows)  # level-0 px of the slide
  geo = json.loads((out / "nuclei.geojson").read_text())
  assert len(geo["features"]) == len(rows)
  assert json.loads(capsys.readouterr().out)["nuclei"] == len(rows)
  # bad input through the CLI: a clear message and exit code 2, no traceback
  nompp = write_synthetic_slide(tmp_path / "nompp.tif", 200, 200, mpp=None, tile=64)
  assert predict_slide.main(["--checkpoint", str(checkpoint), "--slide", str(nompp.path), "--out",
                             str(tmp_path / "o2"), "--no-progress"]) == 2
  assert "--mpp" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_on_real_cmu_slide_crop(checkpoint, tmp_path):
  # the whole CMU region at 0.5 µm/px is ~70 tissue tiles of 128 px; one jit shape, already compiled above
  out = tmp_path / "cmu"
  rc = predict_slide.main(["--checkpoint", str(checkpoint), "--slide", str(cmu_small_region_path()), "--out",
                           str(out), "--batch", "16", "--overlap", "32", "--no-progress"])
  assert rc == 0
  summary = json.loads((out / "summary.json").read_text())
  assert summary["vendor"] == "aperio" and summary["slide_mpp"] == pytest.approx(0.499)
  assert summary["tissue_area_mm2"] > 0.2 and summary["tiles_tissue"] < summary["tiles_total"]


def test_sharded_ndc_path_matches_predict_tiles(checkpoint):
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from muse_jax.ndc.infer import Predictor
  from muse_jax.slide import run as slide_run

  pred = Predictor.from_checkpoint(checkpoint)
  mesh = slide_run.data_mesh()
  assert mesh.shape["data"] == len(jax.devices()) == 4
  dispatch, collect = slide_run._batch_predict_fns(pred, mesh)  # pylint: disable=protected-access
  tiles = np.random.default_rng(0).integers(0, 256, (8, 128, 128, 3), dtype=np.uint8)
  sharded = collect(dispatch(jax.device_put(tiles, NamedSharding(mesh, P("data")))))
  host = pred.predict_tiles(tiles)
  assert len(sharded) == len(host) == 8
  for a, b in zip(sharded, host):
    np.testing.assert_allclose(a["points"], b["points"], atol=1e-3)
    np.testing.assert_array_equal(a["classes"], b["classes"])
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)
