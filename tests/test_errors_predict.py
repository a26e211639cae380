"""Issue #19, prediction CLIs: no silent wrong results (mixed resumes, half-written exports, overwritten outputs,
skipped images, 16-bit slides, score thresholds) and bad values stop with one line and exit 2."""
import csv
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from muse_jax import cli, outputs, predict, predict_slide
from muse_jax.ndc import infer
from muse_jax.slide import SlideError, open_slide
from muse_jax.slide import run as slide_run
from muse_jax.slide.synthetic import DotPredictor, write_random_ndc_checkpoint, write_synthetic_slide

CFG = dict(batch_size=8, overlap=32, num_readers=2, progress=False)


@pytest.fixture(scope="module")
def ck_a(tmp_path_factory):
  return write_random_ndc_checkpoint(tmp_path_factory.mktemp("ck") / "a", "tiny", window=128, mpp=0.5,
                                     max_detections=16, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def ck_b(tmp_path_factory):
  return write_random_ndc_checkpoint(tmp_path_factory.mktemp("ck") / "b", "tiny", window=128, mpp=0.5,
                                     max_detections=16, batch_size=8, seed=1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
  return write_synthetic_slide(tmp_path_factory.mktemp("slides") / "dots.tif", 512, 384, mpp=0.5, tile=128)


def one_error_line(capsys, *needles):
  err = capsys.readouterr().err.strip().splitlines()
  errors = [line for line in err if line.startswith("error: ")]
  assert len(errors) == 1, err
  assert "Traceback" not in "\n".join(err)
  for n in needles:
    assert n in errors[0], errors[0]
  return errors[0]


# ------------------------------------------------------------------------------------------- 3: resume identity
def test_resume_with_another_checkpoint_or_threshold_is_refused(slide, ck_a, ck_b, tmp_path, capsys):
  out = tmp_path / "out"
  # a run with checkpoint A "killed" before its first batch: its resume state is written, nothing else
  first = slide_run.run(infer.Predictor.from_checkpoint(ck_a), slide.path, out,
                        slide_run.SlideRunConfig(**CFG, max_batches=0))
  assert not first["complete"] and (out / "parts" / "meta.json").exists()
  meta_before = (out / "parts" / "meta.json").read_text()
  base = ["--checkpoint", str(ck_b), "--slide", str(slide.path), "--out", str(out), "--overlap", "32",
          "--no-progress"]
  assert predict_slide.main(base) == cli.EXIT_USAGE
  one_error_line(capsys, "different run", "model.fingerprint.variables_sha256 ", "--restart")
  base[1] = str(ck_a)
  assert predict_slide.main(base + ["--score-threshold", "0.3"]) == cli.EXIT_USAGE
  line = one_error_line(capsys, "model.score_threshold 0.0 -> 0.3")
  assert "variables_sha256" not in line  # only what differs is named
  assert predict_slide.main(base[:-3] + ["--overlap", "48", "--no-progress"]) == cli.EXIT_USAGE
  one_error_line(capsys, "overlap 32 -> 48")
  assert (out / "parts" / "meta.json").read_text() == meta_before  # a refused rerun changes nothing


def test_restart_discards_another_runs_parts(slide, tmp_path):
  full = slide_run.run(DotPredictor(), slide.path, tmp_path / "full", slide_run.SlideRunConfig(**CFG))
  out = tmp_path / "out"
  slide_run.run(DotPredictor(threshold=80.0), slide.path, out, slide_run.SlideRunConfig(**CFG, max_batches=1))
  with pytest.raises(cli.UserError, match="fingerprint.threshold 80.0 -> 50.0"):
    slide_run.run(DotPredictor(), slide.path, out, slide_run.SlideRunConfig(**CFG))
  again = slide_run.run(DotPredictor(), slide.path, out, slide_run.SlideRunConfig(**CFG, restart=True))
  assert again["complete"] and again["tiles_this_call"] == again["tiles_tissue"]
  assert (out / "nuclei.csv").read_text() == (tmp_path / "full" / "nuclei.csv").read_text()
  assert again["nuclei"] == full["nuclei"]


def test_killed_reexport_leaves_no_complete_summary_beside_partial_files(slide, tmp_path, monkeypatch):
  out = tmp_path / "out"
  done = slide_run.run(DotPredictor(), slide.path, out, slide_run.SlideRunConfig(**CFG))
  csv_before = (out / "nuclei.csv").read_text()
  calls = {"n": 0}
  real = outputs.points_to_geojson

  def dying(*a, **k):  # the rerun is "killed" while it streams the second part of the GeoJSON
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt
    return real(*a, **k)

  monkeypatch.setattr(outputs, "points_to_geojson", dying)
  with pytest.raises(KeyboardInterrupt):
    slide_run.run(DotPredictor(), slide.path, out, slide_run.SlideRunConfig(**CFG))
  assert not (out / "summary.json").exists()  # no "complete": true beside what is there
  assert (out / "nuclei.csv").read_text() == csv_before  # the final names hold whole files only
  assert len(json.loads((out / "nuclei.geojson").read_text())["features"]) == done["nuclei"]
  monkeypatch.setattr(outputs, "points_to_geojson", real)
  again = slide_run.run(DotPredictor(), slide.path, out, slide_run.SlideRunConfig(**CFG))
  assert again["complete"] and json.loads((out / "summary.json").read_text())["complete"]
  assert (out / "nuclei.csv").read_text() == csv_before
  assert not list(out.glob(".*.tmp")) and not list((out / "parts").glob("*.tmp*"))


# ---------------------------------------------------------------------------------- 4: predict on image folders
def test_predict_keeps_outputs_distinct_and_skips_bad_images(ck_a, tmp_path, capsys):
  src = tmp_path / "in"
  src.mkdir()
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 255, (100, 120, 3), np.uint8)).save(src / "x.png")
  Image.fromarray(rng.integers(0, 255, (90, 80, 3), np.uint8)).save(src / "x.jpg")
  Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(src / "y.png")
  (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  out = tmp_path / "out"
  rc = predict.main(["--checkpoint", str(ck_a), "--inputs", str(src), "--mpp", "0.5", "--out", str(out),
                     "--no-overlay"])
  assert rc == cli.EXIT_PARTIAL == 3
  err = capsys.readouterr().err
  assert "skipped" in err and "bad.png" in err and "score threshold 0 (source: the checkpoint's inference default" in err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["complete"] and summary["processed"] == 3 and summary["skipped_count"] == 1
  assert summary["skipped"][0]["file"].endswith("bad.png") and "corrupt" in summary["skipped"][0]["reason"]
  by_file = {pathlib_name(i["file"]): i for i in summary["images"]}
  assert by_file["x.png"]["outputs"]["csv"] == "x_png.csv" and by_file["x.jpg"]["outputs"]["csv"] == "x_jpg.csv"
  assert by_file["y.png"]["outputs"]["csv"] == "y.csv"
  for name, item in by_file.items():  # each image's own outputs, none overwritten
    with open(out / item["outputs"]["csv"], newline="") as f:
      assert len(list(csv.DictReader(f))) == item["nuclei"], name
  assert sorted(p.name for p in out.glob("*.csv")) == ["x_jpg.csv", "x_png.csv", "y.csv"]
  assert "3 finished, but some images were skipped" in " ".join(_help(predict, capsys).split())


def pathlib_name(path):
  return path.replace("\\", "/").rsplit("/", 1)[-1]


def _help(module, capsys):
  with pytest.raises(SystemExit):
    module.parse_args(["--help"])
  return capsys.readouterr().out


def test_output_names_never_collide():
  import pathlib
  files = [pathlib.Path(p) for p in ("a/x.png", "b/x.png", "a/x.jpg", "a/X.tif", "a/x_png.png", "a/z.png")]
  names = predict.output_names(files)
  assert len({n.lower() for n in names}) == len(names)
  assert names[-1] == "z"


# ------------------------------------------------------------------------------------ 8: pixel types and paths
def _level0(syn):
  return tifffile.imread(syn.path)


def test_16bit_and_float_slides_are_converted_with_a_note(slide, tmp_path, capsys):
  rgb = _level0(slide)
  res = dict(resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", photometric="rgb")
  tifffile.imwrite(tmp_path / "u16.tif", rgb.astype(np.uint16) * 257, **res)
  tifffile.imwrite(tmp_path / "f32.tif", rgb.astype(np.float32) / 255, **res)
  ref = open_slide(slide.path).read_at_mpp(0, 0, 200, 150, 0.5)
  for name in ("u16.tif", "f32.tif"):
    s = open_slide(tmp_path / name)
    assert s.pixel_note and ("16-bit" in s.pixel_note or "float32" in s.pixel_note)
    assert np.abs(s.read_at_mpp(0, 0, 200, 150, 0.5).astype(int) - ref).max() <= 1
  base = slide_run.run(DotPredictor(), slide.path, tmp_path / "o8", slide_run.SlideRunConfig(**CFG))
  conv = slide_run.run(DotPredictor(), tmp_path / "u16.tif", tmp_path / "o16", slide_run.SlideRunConfig(**CFG))
  assert conv["tiles_tissue"] == base["tiles_tissue"] > 0 and conv["nuclei"] == base["nuclei"]
  assert "16-bit" in capsys.readouterr().err and "16-bit" in conv["pixel_note"]
  # 12-bit data in 16-bit samples: scaled by its bit depth, not by 65535
  tifffile.imwrite(tmp_path / "u12.tif", ((rgb.astype(np.uint32) * 4095) // 255).astype(np.uint16), **res)
  s12 = open_slide(tmp_path / "u12.tif")
  assert "4095" in s12.pixel_note and np.abs(s12.read_at_mpp(0, 0, 200, 150, 0.5).astype(int) - ref).max() <= 1
  # a 16-bit grey PNG (Pillow path)
  Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "g16.png")
  g = open_slide(tmp_path / "g16.png", mpp=0.5)
  assert g.pixel_note and g.read_level(0, 0, 0, 4, 4).dtype == np.uint8
  assert np.abs(g.read_level(0, 0, 0, 50, 50)[..., 1].astype(int) - rgb[:50, :50, 0]).max() <= 1


def test_unconvertible_pixel_types_and_directories_are_refused(ck_a, tmp_path, capsys):
  res = dict(resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
  tifffile.imwrite(tmp_path / "f.tif", np.full((64, 64, 3), 1000.0, np.float32), photometric="rgb", **res)
  tifffile.imwrite(tmp_path / "i16.tif", np.full((64, 64), -5, np.int16), **res)
  with pytest.raises(SlideError, match="no known 8-bit mapping"):
    open_slide(tmp_path / "f.tif")
  with pytest.raises(SlideError, match="int16"):
    open_slide(tmp_path / "i16.tif")
  args = ["--checkpoint", str(ck_a), "--out", str(tmp_path / "o"), "--overlap", "32", "--no-progress"]
  assert predict_slide.main(args + ["--slide", str(tmp_path / "f.tif")]) == cli.EXIT_USAGE
  one_error_line(capsys, "f.tif", "convert the slide to 8-bit RGB")
  assert predict_slide.main(args + ["--slide", str(tmp_path)]) == cli.EXIT_USAGE
  one_error_line(capsys, "is a directory", "--slide")
  assert predict_slide.main(args + ["--slide", str(tmp_path / "nope.svs")]) == cli.EXIT_USAGE
  one_error_line(capsys, "does not exist", "--slide")


# --------------------------------------------------------------------------------------- 9: score thresholds
def test_threshold_stored_in_checkpoint_is_the_default(ck_a, tmp_path, capsys):
  import shutil
  ck = tmp_path / "ck"
  shutil.copytree(ck_a, ck)
  p = infer.Predictor.from_checkpoint(ck)
  assert p.score_threshold == 0.0 and "inference default" in p.threshold_source
  sweep = tmp_path / "val_sweep.json"
  sweep.write_text(json.dumps({"thresholds": [0.1, 0.2, 0.3], "select": "mcspatnet/f_det", "best_threshold": 0.2}))
  assert infer.main(["--checkpoint", str(ck), "--threshold-from", str(sweep)]) == 0
  p = infer.Predictor.from_checkpoint(ck)
  assert p.score_threshold == 0.2 and "chosen on val" in p.threshold_source and "val_sweep.json" in p.threshold_source
  assert infer.Predictor.from_checkpoint(ck, score_threshold=0.7).score_threshold == 0.7
  assert infer.Predictor.from_checkpoint(ck).fingerprint == p.fingerprint  # the threshold is not the weights
  # save_predictor takes it directly (what the fine-tuning export passes)
  cfg = json.loads((ck / infer.CONFIG_FILE).read_text())
  assert cfg["threshold"]["score_threshold"] == 0.2
  img = tmp_path / "img.png"
  Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
  assert predict.main(["--checkpoint", str(ck), "--inputs", str(img), "--mpp", "0.5", "--out",
                       str(tmp_path / "o"), "--no-overlay"]) == 0
  assert "score threshold 0.2 (source: the checkpoint, chosen on val" in capsys.readouterr().err
  summary = json.loads((tmp_path / "o" / "summary.json").read_text())
  assert summary["score_threshold"] == 0.2 and "chosen on val" in summary["score_threshold_source"]
  bad = tmp_path / "bad_sweep.json"
  bad.write_text(json.dumps({"best_threshold": 7}))
  assert cli.run(infer.main, ["--checkpoint", str(ck), "--threshold-from", str(bad)]) == cli.EXIT_USAGE
  one_error_line(capsys, "best_threshold", "must be in [0, 1]")


def test_save_predictor_records_the_val_threshold(tmp_path):
  src = write_random_ndc_checkpoint(tmp_path / "src", "tiny", window=128, mpp=0.5)
  cfg = json.loads((src / infer.CONFIG_FILE).read_text())
  p = infer.Predictor.from_checkpoint(src)
  infer.save_predictor(tmp_path / "ck", p.model_cfg, p.head_cfg, p.class_names, p.mpp, p.variables,
                       infer_cfg=cfg["infer"], score_threshold=0.35, threshold_source="val sweep, mcspatnet/f_det")
  q = infer.Predictor.from_checkpoint(tmp_path / "ck")
  assert q.score_threshold == 0.35 and "val sweep, mcspatnet/f_det" in q.threshold_source


# ------------------------------------------------------------------------------ 6/10: values checked up front
@pytest.mark.parametrize("flags, needle", [
    (["--mpp", "nan"], "--mpp"), (["--mpp", "-0.5"], "--mpp"), (["--mpp", "0.5", "--score-threshold", "1.5"],
                                                               "--score-threshold"),
    (["--mpp", "0.5", "--window", "0"], "--window"), (["--mpp", "0.5", "--batch-size", "2.5"], "--batch-size"),
    (["--mpp", "0.5", "--overlap", "-3"], "--overlap"), (["--mpp", "0.5", "--overlap", "256"], "--overlap"),
    (["--mpp", "0.5", "--nms-radius-um", "inf"], "--nms-radius-um"),
    (["--mpp", "0.5", "--class-names", "a,,b"], "--class-names"),
])
def test_predict_bad_values_stop_before_any_work(ck_a, tmp_path, capsys, flags, needle):
  img = tmp_path / "img.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
  rc = predict.main(["--checkpoint", str(ck_a), "--inputs", str(img), "--out", str(tmp_path / "o")] + flags)
  assert rc == cli.EXIT_USAGE
  one_error_line(capsys, needle)
  assert not (tmp_path / "o").exists()


def test_predict_bad_paths_and_checkpoints(ck_a, tmp_path, capsys):
  img = tmp_path / "img.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
  args = ["--inputs", str(img), "--mpp", "0.5", "--out", str(tmp_path / "o")]
  assert predict.main(["--checkpoint", str(tmp_path / "none")] + args) == cli.EXIT_USAGE
  one_error_line(capsys, "does not exist")
  assert predict.main(["--checkpoint", str(img)] + args) == cli.EXIT_USAGE
  one_error_line(capsys, "is a file")
  assert predict.main(["--checkpoint", str(tmp_path)] + args) == cli.EXIT_USAGE
  one_error_line(capsys, "not an NDC checkpoint")
  assert predict.main(["--checkpoint", str(ck_a), "--inputs", str(tmp_path / "nope"), "--mpp", "0.5", "--out",
                       str(tmp_path / "o")]) == cli.EXIT_USAGE
  one_error_line(capsys, "--inputs")
  assert predict.main(["--checkpoint", str(ck_a), "--inputs", str(img), "--mpp", "0.5", "--out", str(img)]
                      ) == cli.EXIT_USAGE
  one_error_line(capsys, "--out", "not a directory")
  assert predict.main(["--checkpoint", str(ck_a), "--inputs", str(img), "--mpp", "0.25", "--no-rescale", "--out",
                       str(tmp_path / "o")]) == cli.EXIT_USAGE
  one_error_line(capsys, "--no-rescale")
  assert predict.main(["--checkpoint", str(ck_a), "--inputs", str(img), "--mpp", "0.5", "--class-names", "a,b,c",
                       "--out", str(tmp_path / "o")]) == cli.EXIT_USAGE
  one_error_line(capsys, "--class-names", "lymphocyte")
  cut = tmp_path / "cut"  # an export cut short: config without weights
  cut.mkdir()
  (cut / infer.CONFIG_FILE).write_text((ck_a / infer.CONFIG_FILE).read_text())
  assert predict.main(["--checkpoint", str(cut)] + args) == cli.EXIT_USAGE
  one_error_line(capsys, "without variables/")


@pytest.mark.parametrize("flags, needle", [
    (["--batch", "0"], "--batch"), (["--overlap", "33"], "must be even"), (["--overlap", "128"], "--overlap"),
    (["--readers", "x"], "--readers"), (["--mpp", "inf"], "--mpp"), (["--mpp", "100"], "--mpp"),
    (["--merge-radius-um", "0"], "--merge-radius-um"), (["--merge-radius-um", "20"], "--merge-radius-um"),
    (["--score-threshold", "-0.1"], "--score-threshold"), (["--score-threshold", "nan"], "--score-threshold"),
])
def test_predict_slide_bad_values_stop_before_any_work(ck_a, slide, tmp_path, capsys, flags, needle):
  rc = predict_slide.main(["--checkpoint", str(ck_a), "--slide", str(slide.path), "--out", str(tmp_path / "o"),
                           "--no-progress"] + flags)
  assert rc == cli.EXIT_USAGE
  one_error_line(capsys, needle)
  assert not (tmp_path / "o").exists()


def test_slide_run_config_is_validated(slide, tmp_path):
  for bad, field in [(dict(mask_mpp=float("nan")), "mask_mpp"), (dict(min_tissue_area_um2=-1), "min_tissue"),
                     (dict(overlay_max_side=4), "overlay_max_side"), (dict(object_type="cell"), "object_type"),
                     (dict(max_batches=-1), "max_batches"), (dict(batch_size=True), "--batch")]:
    with pytest.raises(cli.UserError, match=field):
      slide_run.run(DotPredictor(), slide.path, tmp_path / "o", slide_run.SlideRunConfig(**{**CFG, **bad}))
  assert not (tmp_path / "o").exists()


def test_choose_threshold_maximises_val_f1():
  from types import SimpleNamespace

  gt = np.array([[10, 10], [40, 10], [10, 40], [40, 40]], np.float32)
  fake = np.array([[25, 25], [60, 60], [5, 60], [60, 5]], np.float32)

  class Fake:
    class_names = ["a"]
    score_threshold = 0.5

    def predict_image(self, image, mpp):
      pts, sc = np.concatenate([gt, fake]), np.array([0.3] * 4 + [0.1] * 4, np.float32)
      keep = sc >= self.score_threshold
      return {"points": pts[keep], "classes": np.zeros(int(keep.sum()), np.int32), "scores": sc[keep]}

  pred = Fake()
  samples = [SimpleNamespace(image=None, mpp=0.5, coords=gt, classes=np.zeros(4, np.int32))]
  best = infer.choose_threshold(pred, samples, "mcspatnet", 3.0)
  assert best["score_threshold"] == pytest.approx(0.15) and best["f_det"] == pytest.approx(1.0)
  assert pred.score_threshold == 0.5 and "mcspatnet/f_det" in best["source"]
  assert Fake().predict_image(None, 0.5)["points"].shape == (0, 2)  # at 0.5 this model finds nothing
  far = [SimpleNamespace(image=None, mpp=0.5, coords=gt + 500, classes=np.zeros(4, np.int32))]
  assert infer.choose_threshold(pred, far, "mcspatnet", 3.0)["score_threshold"] is None  # F1 0 everywhere
