"""`python -m muse_jax.score`: score thresholds and the threshold sweep (choose on val, apply on test)."""

import json

import pytest

from muse_jax import score


def _write(tmp_path):
  """Two images; GT points and predictions with known scores (radius 3 µm = 6 px at 0.5 µm/px)."""
  lab, pred = tmp_path / "labels", tmp_path / "pred"
  lab.mkdir()
  pred.mkdir()
  (lab / "a.csv").write_text("x,y,class\n10,10,tumor\n50,50,tumor\n90,90,stromal\n")
  (lab / "b.csv").write_text("x,y,class\n20,20,lymphocyte\n")
  # a: two right at 0.9 / 0.6, one false positive at 0.3, one right-place wrong-class at 0.2 (stromal GT -> tumor)
  (pred / "a.csv").write_text("x,y,class,score\n11,10,tumor,0.9\n50,52,tumor,0.6\n200,200,tumor,0.3\n"
                              "90,91,tumor,0.2\n")
  (pred / "b.csv").write_text("x,y,class,score\n20,21,lymphocyte,0.4\n")
  return str(pred), str(lab)


NAMES = ["lymphocyte", "tumor", "stromal"]


def test_threshold_filters_before_matching(tmp_path):
  pred, lab = _write(tmp_path)
  allp = score.score(pred, lab, mpp=0.5, modes=["mcspatnet"], class_names=NAMES)[0]["detection"]
  assert (allp["tp"], allp["fp"], allp["fn"]) == (4, 1, 0)
  hi = score.score(pred, lab, mpp=0.5, modes=["mcspatnet"], class_names=NAMES, score_threshold=0.5)[0]
  # image b keeps no prediction: the published MCSpatNet script counts its one GT as 6 FN (corrected: 1)
  assert (hi["detection"]["tp"], hi["detection"]["fp"], hi["detection"]["fn"]) == (2, 0, 1 + 6)
  fixed = score.score(pred, lab, mpp=0.5, modes=["mcspatnet"], class_names=NAMES, score_threshold=0.5,
                      mcspatnet_fn_quirk=False)[0]["detection"]
  assert (fixed["tp"], fixed["fp"], fixed["fn"]) == (2, 0, 2)
  assert hi["score_threshold"] == 0.5
  with pytest.raises(ValueError, match="score_threshold"):
    score.score(pred, lab, mpp=0.5, modes=["muse"], class_names=NAMES, score_threshold=1.5)


def test_sweep_picks_the_best_threshold(tmp_path):
  pred, lab = _write(tmp_path)
  res = score.sweep(pred, lab, mpp=0.5, modes=["mcspatnet", "muse"], class_names=NAMES,
                    thresholds=[0.1, 0.25, 0.35, 0.5, 0.95], select="mcspatnet/f_det")
  f1 = [r[0]["detection"]["f1"] for r in res["results"]]
  # 0.1: tp 4 fp 1 fn 0 -> 8/9; 0.25: tp 3 fp 1 fn 1 -> 0.75; 0.35: tp 3 fp 0 fn 1 -> 6/7; 0.95: 0;
  # 0.5: tp 2 fp 0 fn 1 + 6 (image b has no prediction left: the published MCSpatNet FN count) -> 4/11
  assert f1 == pytest.approx([8 / 9, 0.75, 6 / 7, 4 / 11, 0.0])
  assert res["best_threshold"] == 0.1 and res["best"][0]["detection"]["f1"] == pytest.approx(8 / 9)
  # by mean class F1 the wrong-class detection at 0.2 costs: 0.35 is best
  res2 = score.sweep(pred, lab, mpp=0.5, modes=["mcspatnet"], class_names=NAMES,
                     thresholds=[0.1, 0.25, 0.35, 0.5], select="mcspatnet/f_mean")
  means = [r[0]["mean_f1"] for r in res2["results"]]
  assert res2["best_threshold"] == [0.1, 0.25, 0.35, 0.5][means.index(max(means))] == 0.35
  with pytest.raises(ValueError, match="--select"):
    score.sweep(pred, lab, mpp=0.5, modes=["muse"], class_names=NAMES, thresholds=[0.5], select="mcspatnet/f_det")


def test_parse_sweep():
  assert score.parse_sweep("auto")[0] == 0.05 and score.parse_sweep("auto")[-1] == 0.95
  assert len(score.parse_sweep("auto")) == 19
  assert score.parse_sweep("0.7, 0.3,0.3") == [0.3, 0.7]
  for bad in ("", "a,b", "0.5,2", "nan"):
    with pytest.raises(ValueError, match="--sweep"):
      score.parse_sweep(bad)


def test_cli_sweep_and_threshold(tmp_path, capsys):
  pred, lab = _write(tmp_path)
  out = tmp_path / "s.json"
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.5", "--sweep", "0.1,0.5",
                     "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "best threshold 0.10" in text
  assert json.loads(out.read_text())["best_threshold"] == 0.1
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.5", "--score-threshold", "0.5"]) == 0
  out2 = tmp_path / "t.json"
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.5", "--modes", "mcspatnet",
                     "--threshold-from", str(out), "--json", str(out2)]) == 0
  r = json.loads(out2.read_text())[0]
  assert r["score_threshold"] == 0.1 and r["detection"]["tp"] == 4
  (tmp_path / "bad.json").write_text("{}")
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.5",
                     "--threshold-from", str(tmp_path / "bad.json")]) == 2
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.5", "--sweep", "auto",
                     "--score-threshold", "0.5"]) == 2
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.5", "--sweep", "auto", "--select", "x"]) == 2
