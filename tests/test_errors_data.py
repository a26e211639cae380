"""Issue #19 for the data / scoring / evaluation CLIs: stale records, bad values and bad rows stop with one line.

prepare: records remember what they were built from (reuse the same, refuse another source, `--overwrite`);
prepare / evaluate / score / demo: every value checked before any work, a user error is one stderr line
`error: <what> (<where>): <why>` and exit code 2 (`--debug`: the traceback); score: a bad row names file, line,
column. No data outside the repository: the bundled sample and synthetic files only.
"""
import json
import os
import shutil

import numpy as np
import pytest

from muse_jax import cli, demo, evaluate, score
from muse_jax.data import bundled_sample_dir, load_labelled, prepare
from errlines import one_error_line


def _mini_brca(dst, n=1):
  """A BRCA-M2C folder with the first `n` tiles of each bundled split."""
  src = bundled_sample_dir()
  (dst / "images").mkdir(parents=True)
  (dst / "labels").mkdir()
  for split in ("train", "val", "test"):
    names = (src / f"brca_ds_{split}.txt").read_text().split()[:n]
    for name in names:
      shutil.copy(src / "images" / name, dst / "images" / name)
      shutil.copy(src / "labels" / f"{name[:-4]}_gt_class_coords.txt", dst / "labels")
    (dst / f"brca_ds_{split}.txt").write_text("".join(f"{x}\n" for x in names))
  return dst


# ------------------------------------------------------------------------------------------------ 1. stale records


def test_prepare_reuses_same_inputs_and_refuses_another_source(tmp_path, capsys):
  out = tmp_path / "records"
  args = ["--dataset", "brca_m2c", "--out", str(out)]
  assert prepare.main(args + ["--source", "bundled"]) == 0
  printed = capsys.readouterr().out
  assert "Downloading" not in printed and "built from" in printed and "train 6, val 2, test 3" in printed
  assert not (out / "downloads").exists()  # nothing is downloaded
  prov = json.loads((out / "brca_m2c" / "1.0.0" / prepare.PROVENANCE_FILE).read_text())
  assert prov["source"] == "bundled" and prov["options"] == {"mpp": 0.5} and prov["fingerprint"]["files"] > 0
  assert {"content_sha256", "stat_sha256"} <= set(prov["fingerprint"]) and prov["muse_jax_version"]
  # the same inputs: reused, and it says so
  assert prepare.main(args + ["--source", "bundled"]) == 0
  assert "reusing the records" in capsys.readouterr().out
  # another source into the same --out: exit 2, one line naming both sources; the records are left as they were
  mini = _mini_brca(tmp_path / "mini")
  assert prepare.main(args + ["--source", str(mini)]) == 2
  one_error_line(capsys, "other source files", str(bundled_sample_dir()), str(mini), "--overwrite")
  assert len(load_labelled("brca_m2c", out, "train")) == 6
  # other options: refused too
  assert prepare.main(args + ["--source", "bundled", "--mpp", "0.25"]) == 2
  one_error_line(capsys, "other options", "mpp=0.5", "mpp=0.25")
  # --overwrite rebuilds from the new source
  assert prepare.main(args + ["--source", str(mini), "--overwrite"]) == 0
  assert "rebuilt from" in capsys.readouterr().out
  assert len(load_labelled("brca_m2c", out, "train")) == 1
  # a copy of the folder (new modification times, same bytes) is the same input
  copy = tmp_path / "copy"
  shutil.copytree(mini, copy)
  os.utime(copy / "brca_ds_train.txt", (1, 1))
  assert prepare.main(args + ["--source", str(copy)]) == 0
  assert "same file names, sizes and bytes" in capsys.readouterr().out
  # one changed label file: refused
  lbl = sorted((copy / "labels").iterdir())[0]
  lbl.write_text(lbl.read_text() + "10 10 1\n")
  assert prepare.main(args + ["--source", str(copy)]) == 2
  one_error_line(capsys, "other source files")
  # records written without provenance (older muse_jax): refused until --overwrite
  (out / "brca_m2c" / "1.0.0" / prepare.PROVENANCE_FILE).unlink()
  assert prepare.main(args + ["--source", str(mini)]) == 2
  one_error_line(capsys, "without a provenance file")


def test_prepare_fingerprint_is_cheap_and_tracks_content(tmp_path):
  mini = _mini_brca(tmp_path / "m")
  a = prepare.fingerprint(mini)
  assert a == prepare.fingerprint(mini)
  assert "content_sha256" not in prepare.fingerprint(mini, content=False)
  (mini / "notes.txt").write_text("x")
  b = prepare.fingerprint(mini)
  assert b["files"] == a["files"] + 1 and b["content_sha256"] != a["content_sha256"]


# ------------------------------------------------------------------------------------------------ 6. bad values


@pytest.mark.parametrize("extra,needle", [
    (["--dataset", "regions", "--mpp", "0"], "must be > 0 (--mpp)"),
    (["--dataset", "regions", "--mpp", "nan"], "not a finite number (--mpp)"),
    (["--dataset", "regions", "--mpp", "100"], "(--mpp)"),
    (["--dataset", "regions", "--mpp", "0.5", "--sigma_um", "-1"], "(--sigma_um)"),
    (["--dataset", "regions", "--mpp", "0.5", "--min_distance_um", "inf"], "(--min_distance_um)"),
    (["--dataset", "regions", "--mpp", "0.5", "--min_nuclei", "-1"], "(--min_nuclei)"),
    (["--dataset", "regions"], "needs --mpp"),
    (["--dataset", "brca_m2c"], "not a BRCA-M2C folder (--source)"),
    (["--dataset", "regions", "--mpp", "abc"], "invalid float value"),
])
def test_prepare_bad_values_stop_before_any_work(tmp_path, capsys, extra, needle):
  src = tmp_path / "imgs"
  src.mkdir()
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(src / "a.png")
  out = tmp_path / "out"
  assert prepare.main(["--source", str(src), "--out", str(out)] + extra) == 2
  one_error_line(capsys, needle)
  assert not out.exists()


def test_prepare_bad_paths(tmp_path, capsys):
  assert prepare.main(["--dataset", "brca_m2c", "--source", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
  one_error_line(capsys, "no such folder (--source)")
  (tmp_path / "f").write_text("")
  assert prepare.main(["--dataset", "brca_m2c", "--source", "bundled", "--out", str(tmp_path / "f")]) == 2
  one_error_line(capsys, "(--out)")
  (tmp_path / "empty").mkdir()
  assert prepare.main(["--dataset", "regions", "--source", str(tmp_path / "empty"), "--mpp", "0.5",
                       "--out", str(tmp_path / "o")]) == 2
  one_error_line(capsys, "no images (--source)")


@pytest.mark.parametrize("extra,needle", [
    (["--mpp", "-0.5"], "must be > 0 (--mpp)"),
    (["--mpp", "0"], "must be > 0 (--mpp)"),
    (["--mpp", "inf"], "(--mpp)"),
    (["--mpp", "8"], "(--mpp)"),
    (["--size", "100"], "(--size)"),
    (["--size", "250"], "(--size)"),
    (["--batch_size", "0"], "(--batch_size)"),
    (["--linear_epochs", "0"], "(--linear_epochs)"),
    (["--finetune_epochs", "-2"], "(--finetune_epochs)"),
    (["--finetune_lr", "nan"], "(--finetune_lr)"),
    (["--seed", "-1"], "(--seed)"),
    (["--protocols", "knn,svm"], "(--protocols)"),
    (["--protocols", "finetune"], "no network to fine-tune"),
    (["--data_dir", "/nonexistent/brca"], "no such folder (--data_dir)"),
    (["--backbone", "random:nope"], "unknown model variant (--backbone)"),
    (["--backbone", "/nonexistent/backbone"], "no such backbone directory (--backbone)"),
    (["--batch_size", "2.5"], "invalid int value"),
])
def test_evaluate_bad_values_stop_before_any_work(tmp_path, capsys, extra, needle):
  out = tmp_path / "out"
  argv = ["--backbone", "raw:16", "--no_progress", "--out", str(out)]
  assert evaluate.main(argv + extra) == 2
  one_error_line(capsys, needle)
  assert not out.exists()


def test_evaluate_data_dir_must_hold_the_dataset(tmp_path, capsys):
  assert evaluate.main(["--backbone", "raw:16", "--data_dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  one_error_line(capsys, "neither a brca_m2c folder nor prepared records")


def test_demo_bad_values(capsys):
  for extra, needle in ((["--steps", "0"], "(--steps)"), (["--budget_s", "-1"], "(--budget_s)"),
                        (["--seed", "x"], "invalid int value")):
    assert demo.main(extra) == 2
    one_error_line(capsys, needle)


# ------------------------------------------------------------------------------------------------ 7. score rows


def _score_dirs(tmp_path):
  lab, pred = tmp_path / "labels", tmp_path / "pred"
  lab.mkdir()
  pred.mkdir()
  (lab / "a.csv").write_text("x,y,class\n10,10,tumor\n")
  (pred / "a.csv").write_text("x,y,class,score\n10,10,tumor,0.9\n")
  return lab, pred


@pytest.mark.parametrize("row,needle", [
    ("hello,world", "x is not a number (PRED:2, column x): got 'hello'"),
    ("x=abc,10,tumor,0.5", "x is not a number (PRED:2, column x): got 'x=abc'"),
    ("10,abc,tumor,0.5", "y is not a number (PRED:2, column y)"),
    ("10,10", "missing class (PRED:2, column class)"),
    ("10,10,7,0.5", "class '7' is not one of"),
    ("10,10,-1,0.5", "class '-1' is not one of"),
    ("10,10,macrophage,0.5", "(PRED:2, column class)"),
    ("nan,10,tumor,0.5", "x is not finite (PRED:2, column x)"),
    ("10,inf,tumor,0.5", "y is not finite (PRED:2, column y)"),
    ("1e30,10,tumor,0.5", "x is out of range (PRED:2, column x)"),
    ("10,-1e9,tumor,0.5", "y is out of range (PRED:2, column y)"),
    ("10,10,tumor,nan", "score is not finite (PRED:2, column score)"),
    ("10,10,tumor,0.5,extra", "more fields than the header (PRED:2)"),
])
def test_score_bad_prediction_rows_name_file_line_and_column(tmp_path, capsys, row, needle):
  lab, pred = _score_dirs(tmp_path)
  f = pred / "a.csv"
  f.write_text(f"x,y,class,score\n{row}\n")
  with _no_numpy_warning():
    assert score.main(["--predictions", str(pred), "--labels", str(lab), "--mpp", "0.5",
                       "--modes", "mcspatnet,muse,ocelot,puma,hungarian"]) == 2
  one_error_line(capsys, needle.replace("PRED", str(f)))


class _no_numpy_warning:  # pylint: disable=invalid-name
  """Fails on a NumPy RuntimeWarning (overflow etc.) inside the block."""

  def __enter__(self):
    self._ctx = np.errstate(all="raise")
    self._ctx.__enter__()

  def __exit__(self, *exc):
    self._ctx.__exit__(*exc)
    return False


@pytest.mark.parametrize("name,text,needle", [
    ("a.csv", "x,y,class\n1e30,10,tumor\n", "x is out of range (LAB:2, column x)"),
    ("a.csv", "x,y,class\n10,10,7\n", "(LAB:2, column class)"),
    ("a.csv", "hello,world\n", 'header has no "x" and "y" columns (LAB:1)'),
    ("a.geojson", '["hello", "world"]', "not a GeoJSON Feature with a geometry (LAB:feature 0)"),
    ("a.geojson", '{"type": "Feature", "geometry": {"type": "Point", "coordinates": ["a", 1]}}',
     "x is not a number (LAB:feature 0, column x)"),
    ("a.geojson", '{"type": "Feature", "geometry": {"type": "Point", "coordinates": 5}}',
     "malformed Point coordinates (LAB:feature 0)"),
    ("a.geojson", '42', "not a GeoJSON FeatureCollection"),
    ("a.geojson", '{"features": [', "invalid JSON (LAB:1)"),
    ("a_gt_class_coords.txt", "10 10 4\n", "(LAB:1, column class)"),
    ("a_gt_class_coords.txt", "10 1e30 1\n", "x is out of range (LAB:1, column x)"),
    ("a_gt_class_coords.txt", "10 10\n", 'expected three numbers "y x class" (LAB:1)'),
])
def test_score_bad_label_rows_name_file_line_and_column(tmp_path, capsys, name, text, needle):
  lab, pred = _score_dirs(tmp_path)
  (lab / "a.csv").unlink()
  f = lab / name
  f.write_text(text)
  assert score.main(["--predictions", str(pred), "--labels", str(lab), "--mpp", "0.5"]) == 2
  one_error_line(capsys, needle.replace("LAB", str(f)))


@pytest.mark.parametrize("extra,needle", [
    (["--radius-um", "-3"], "must be > 0 (--radius-um): got -3 µm"),
    (["--radius-um", "nan"], "(--radius-um)"),
    (["--radius-um", "1000"], "(--radius-um)"),
    (["--radius-px", "0"], "(--radius-px)"),
    (["--mpp", "0"], "must be > 0 (--mpp)"),
    (["--mpp", "-0.5"], "must be > 0 (--mpp)"),
    (["--mpp", "inf"], "(--mpp)"),
    (["--score-threshold", "1.5"], "(--score-threshold)"),
    (["--score-threshold", "nan"], "(--score-threshold)"),
    (["--sweep", "0.1,abc"], "(--sweep)"),
    (["--sweep", "auto", "--select", "muse/f_x"], "(--select)"),
    (["--modes", "foo"], "unknown mode (--modes)"),
    (["--modes", ","], "no mode given (--modes)"),
    (["--class-names", "a,,b"], "empty class name (--class-names)"),
    (["--class-names", "a,A"], "repeated class name (--class-names)"),
    (["--split", "dev"], "invalid choice"),
    (["--json", "/nonexistent/dir/s.json"], "no such folder (--json)"),
])
def test_score_bad_flags(tmp_path, capsys, extra, needle):
  lab, pred = _score_dirs(tmp_path)
  argv = ["--predictions", str(pred), "--labels", str(lab), "--mpp", "0.5"]
  assert score.main(argv + extra) == 2
  one_error_line(capsys, needle)


def test_score_bad_folders_and_threshold_file(tmp_path, capsys):
  lab, pred = _score_dirs(tmp_path)
  assert score.main(["--predictions", str(tmp_path / "nope"), "--labels", str(lab), "--mpp", "0.5"]) == 2
  one_error_line(capsys, "no such folder (--predictions)")
  assert score.main(["--predictions", str(pred), "--labels", str(pred / "a.csv"), "--mpp", "0.5"]) == 2
  one_error_line(capsys, "not a folder (--labels)")
  (tmp_path / "t.json").write_text('{"best_threshold": 7}')
  assert score.main(["--predictions", str(pred), "--labels", str(lab), "--mpp", "0.5",
                     "--threshold-from", str(tmp_path / "t.json")]) == 2
  one_error_line(capsys, "best_threshold")
  (lab / "a.csv").unlink()
  assert score.main(["--predictions", str(pred), "--labels", str(lab), "--mpp", "0.5"]) == 2
  one_error_line(capsys, "no label files (--labels)")


def test_score_valid_input_unchanged(tmp_path, capsys):
  """Valid rows (negative sub-pixel coordinates, class indices, no score column) still score as before."""
  lab, pred = _score_dirs(tmp_path)
  (pred / "a.csv").write_text("x,y,class\n10,10,1\n-0.4,-0.4,tumor\n")
  out = tmp_path / "s.json"
  assert score.main(["--predictions", str(pred), "--labels", str(lab), "--mpp", "0.5", "--modes", "muse",
                     "--json", str(out)]) == 0
  d = json.loads(out.read_text())[0]["detection"]
  assert (d["tp"], d["fp"], d["fn"]) == (1, 1, 0)


# ------------------------------------------------------------------------------------------------ 10. one line, --debug


def test_debug_shows_the_traceback(tmp_path, capsys):
  lab, pred = _score_dirs(tmp_path)
  with pytest.raises(cli.UserError, match="--mpp"):
    score.main(["--predictions", str(pred), "--labels", str(lab), "--mpp", "0", "--debug"])
  with pytest.raises(cli.UserError, match="--mpp"):
    prepare.main(["--dataset", "regions", "--source", "bundled", "--out", str(tmp_path), "--mpp", "0", "--debug"])
  with pytest.raises(cli.UserError, match="--mpp"):
    evaluate.main(["--backbone", "raw:16", "--mpp", "0", "--debug"])
  assert capsys.readouterr().err == ""


def test_help_still_exits_zero(capsys):
  with pytest.raises(SystemExit) as e:
    score.main(["--help"])
  assert e.value.code == 0 and "--predictions" in capsys.readouterr().out
