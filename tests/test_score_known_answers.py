"""Known answers of issue 20: each benchmark mode gives the counts of that benchmark's published script.

The expected values are what the published scripts give on these inputs (MCSpatNet `03_eval_localization_fscore.py`,
DeNuC `get_match`/`multi_cls_eval`, OCELOT `evaluation/eval.py`, PUMA `eval_nuclei.py` + `evaluate.py`); the
randomised comparison with transcriptions of those loops is in `test_score_equivalence.py`.
"""

import json

import numpy as np
import pytest

from muse_jax import score
from muse_jax.ndc import metrics

NAMES = ["lymphocyte", "tumor", "stromal"]


def _set(points, classes, scores=None):
  d = {"points": np.asarray(points, np.float64).reshape(-1, 2), "classes": np.asarray(classes, np.int64)}
  if scores is not None:
    d["scores"] = np.asarray(scores, np.float64)
  return d


def _det(r):
  d = r["detection"]
  return d["tp"], d["fp"], d["fn"]


# 1. MCSpatNet, equidistant predictions: which comes first is the KDTree's (leafsize 2048, k 50) order.
def test_mcspatnet_equidistant_predictions_in_the_trees_order():
  gt = _set([(20, 29), (26, 26), (35, 20)], [0, 0, 0])
  pr = _set([(20, 23), (20, 35), (23, 23), (23, 29), (26, 32), (29, 20), (29, 29), (29, 32), (32, 26), (32, 35),
             (35, 20), (35, 29)], [0] * 12)
  r = metrics.evaluate([pr], [gt], mode="mcspatnet", num_classes=1, radius_px=6)
  assert r["detection"]["tp"] == 2  # GT (26,26) takes (23,29) of its four predictions at sqrt(18), as the script
  assert metrics.match_mcspatnet(pr["points"], gt["points"], 6) == (2, 12, 3)


def test_mcspatnet_radius_is_strict_as_the_kdtree_query():
  # KDTree.query(distance_upper_bound=r) leaves out a point exactly r away, so the script matches d < r only.
  gt, pr = _set([(0, 0)], [0]), _set([(6, 0)], [0])
  assert metrics.evaluate([pr], [gt], mode="mcspatnet", radius_px=6)["detection"]["tp"] == 0
  assert metrics.evaluate([pr], [gt], mode="mcspatnet", radius_px=6.001)["detection"]["tp"] == 1
  assert metrics.RULES["mcspatnet"].comparison == "<"


# 2. MCSpatNet, images with no prediction of a class: FN += 6 x #GT, as published; the corrected count on request.
def _quirk_case():
  ga = _set([(10, 10), (30, 10), (50, 10)], [0, 1, 2])
  pa = _set(np.zeros((0, 2)), [])
  gb, pb = _set([(10, 10)], [0]), _set([(11, 10)], [0])
  return [pa, pb], [ga, gb]


def test_mcspatnet_fn_quirk_published_and_corrected():
  preds, gts = _quirk_case()
  r = metrics.evaluate(preds, gts, mode="mcspatnet", class_names=NAMES, radius_px=6)
  assert r["fn_quirk_applied"] and _det(r) == (1, 0, 18)
  assert r["detection"]["f1"] == pytest.approx(0.1)
  assert r["fn_quirk"]["without_quirk"]["detection"]["fn"] == 3
  assert r["fn_quirk"]["without_quirk"]["detection"]["f1"] == pytest.approx(0.4)
  assert r["fn_quirk"]["with_quirk"]["detection"] == r["detection"]
  assert r["fn_quirk"]["maps_without_predictions"] == 4  # image a: the three class maps and the all-cells map
  c = metrics.evaluate(preds, gts, mode="mcspatnet", class_names=NAMES, radius_px=6, mcspatnet_fn_quirk=False)
  assert not c["fn_quirk_applied"] and _det(c) == (1, 0, 3) and c["detection"]["f1"] == pytest.approx(0.4)
  assert c["classes"] == r["fn_quirk"]["without_quirk"]["classes"]
  assert (r["classes"]["tumor"]["fn"], c["classes"]["tumor"]["fn"]) == (6, 1)
  # other modes know no quirk
  assert not metrics.evaluate(preds, gts, mode="muse", radius_px=6)["fn_quirk_applied"]


def _write_quirk_case(tmp_path):
  lab, pred = tmp_path / "labels", tmp_path / "pred"
  lab.mkdir()
  pred.mkdir()
  (lab / "a.csv").write_text("x,y,class\n10,10,lymphocyte\n30,10,tumor\n50,10,stromal\n")
  (lab / "b.csv").write_text("x,y,class\n10,10,lymphocyte\n")
  (pred / "a.csv").write_text("x,y,class,score\n")
  (pred / "b.csv").write_text("x,y,class,score\n11,10,lymphocyte,0.9\n")
  return str(pred), str(lab)


def test_cli_says_whether_the_quirk_was_applied_and_json_has_both(tmp_path, capsys):
  pred, lab = _write_quirk_case(tmp_path)
  out = tmp_path / "s.json"
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.5", "--modes", "mcspatnet,muse",
                     "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "FN quirk of the published script APPLIED" in text and "--mcspatnet-corrected-fn" in text
  m, u = json.loads(out.read_text())
  assert m["fn_quirk_applied"] is True and m["detection"]["fn"] == 18
  assert m["fn_quirk"]["without_quirk"]["detection"]["fn"] == 3 and m["fn_quirk"]["with_quirk"]["detection"]["fn"] == 18
  assert u["fn_quirk_applied"] is False and u["detection"]["fn"] == 3
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.5", "--modes", "mcspatnet",
                     "--mcspatnet-corrected-fn", "--json", str(out)]) == 0
  assert "NOT applied" in capsys.readouterr().out
  (m,) = json.loads(out.read_text())
  assert m["fn_quirk_applied"] is False and m["detection"]["fn"] == 3
  assert m["fn_quirk"]["with_quirk"]["detection"]["fn"] == 18


# 3. PUMA, duplicate centroids: the first prediction with the winner's centroid is removed, not the winner.
def test_puma_removes_the_first_prediction_with_the_winners_centroid():
  gt = _set([(100, 100), (110, 100), (130, 100)], [0, 0, 0])
  pr = _set([(100, 100), (100, 100), (120, 100)], [0, 0, 0], [0.1, 0.9, 0.5])  # A, B, C
  r = metrics.evaluate([pr], [gt], mode="puma", num_classes=1, radius_px=15)
  assert _det(r) == (3, 0, 0) and r["classes"]["class_0"]["tp"] == 3  # GT1 takes B (A removed), GT2 B again, GT3 C
  assert metrics.match_puma(pr["points"], pr["scores"], gt["points"], 15) == 3


# 4. Distances in each script's precision: float64 (muse, puma, mcspatnet, hungarian), float32 (ocelot).
@pytest.mark.parametrize("mode,tp_at_6,tp_at_15", [("muse", 0, 1), ("ocelot", 1, 0), ("puma", 0, 1),
                                                   ("hungarian", 0, 1)])
def test_distances_in_the_scripts_precision(mode, tp_at_6, tp_at_15):
  gt = _set([(500, 500)], [0])
  near6 = _set([(503.6, 504.8)], [0], [0.9])  # 6.000000000000022 in float64, 5.9999939 in float32
  near15 = _set([(504.2, 514.4)], [0], [0.9])  # 14.999999999999975 in float64, 15.000027 in float32
  assert metrics.evaluate([near6], [gt], mode=mode, radius_px=6)["detection"]["tp"] == tp_at_6
  assert metrics.evaluate([near15], [gt], mode=mode, radius_px=15)["detection"]["tp"] == tp_at_15


def test_files_are_parsed_in_float64(tmp_path):
  lab, pred = tmp_path / "labels", tmp_path / "pred"
  lab.mkdir()
  pred.mkdir()
  (lab / "a.csv").write_text("x,y,class\n500,500,tumor\n")
  (pred / "a.csv").write_text("x,y,class,score\n503.60,504.80,tumor,0.9\n")
  p = score.read_predictions(pred / "a.csv", NAMES)
  assert p["points"].dtype == np.float64 and p["points"][0, 0] == 503.6
  res = score.score(str(pred), str(lab), mpp=0.25, modes=["muse", "ocelot"], class_names=NAMES, radius_px=6)
  assert [r["detection"]["tp"] for r in res] == [0, 1]
  (lab / "b_gt_class_coords.txt").write_text("504.8 503.6 2\n")  # BRCA rows: y x class
  with pytest.warns(UserWarning, match="nothing found"):
    _, gts = score.load(str(pred), str(lab), class_names=NAMES, missing_as_empty=True)
  assert gts[1]["points"].dtype == np.float64 and gts[1]["points"].tolist() == [[503.6, 504.8]]


# 5. Inputs the scripts would reject or count differently.
def test_prediction_class_outside_the_class_map_is_an_error_with_file_and_line(tmp_path):
  lab, pred = tmp_path / "labels", tmp_path / "pred"
  lab.mkdir()
  pred.mkdir()
  (lab / "a.csv").write_text("x,y,class\n10,10,tumor\n")
  (pred / "a.csv").write_text("x,y,class,score\n10,10,tumor,0.9\n20,20,3,0.8\n")
  with pytest.raises(ValueError, match=r"class '3' is not one of .*a\.csv:3, column class"):
    score.score(str(pred), str(lab), mpp=0.5, modes=["puma"], class_names=NAMES)
  (pred / "a.csv").write_text("x,y,class,score\n10,10,tumor,0.9\n20,20,macrophage,0.8\n")
  with pytest.raises(ValueError, match=r"class 'macrophage' .*a\.csv:3"):
    score.score(str(pred), str(lab), mpp=0.5, modes=["puma"], class_names=NAMES)
  assert score.main(["--predictions", str(pred), "--labels", str(lab), "--mpp", "0.5"]) == 2
  # class indices are fine inside the map; the API refuses classes outside it too
  (pred / "a.csv").write_text("x,y,class,score\n10,10,1,0.9\n")
  assert score.score(str(pred), str(lab), mpp=0.5, modes=["puma"], class_names=NAMES)[0]["mean_f1"] == 1.0
  with pytest.raises(ValueError, match=r"preds\[0\]: class 3 outside 0..2"):
    metrics.evaluate([_set([(0, 0)], [3])], [_set([(0, 0)], [0])], mode="puma", class_names=NAMES, radius_px=15)


def test_orphan_files_warn_and_strict_makes_them_errors(tmp_path):
  lab, pred = tmp_path / "labels", tmp_path / "pred"
  lab.mkdir()
  pred.mkdir()
  (lab / "a.csv").write_text("x,y,class\n10,10,tumor\n")
  (pred / "a.csv").write_text("x,y,class,score\n10,10,tumor,0.9\n")
  (pred / "stray.csv").write_text("x,y,class,score\n10,10,tumor,0.9\n")
  with pytest.warns(UserWarning, match="stray.csv"):
    res = score.score(str(pred), str(lab), mpp=0.5, modes=["muse"], class_names=NAMES)
  assert res[0]["num_images"] == 1
  with pytest.raises(ValueError, match="no label file"):
    score.score(str(pred), str(lab), mpp=0.5, modes=["muse"], class_names=NAMES, strict=True)
  (pred / "stray.csv").unlink()
  (lab / "b.csv").write_text("x,y,class\n10,10,tumor\n")
  with pytest.warns(UserWarning, match="nothing found"):
    score.score(str(pred), str(lab), mpp=0.5, modes=["muse"], class_names=NAMES, missing_as_empty=True)
  with pytest.raises(FileNotFoundError, match="b.csv"):
    score.score(str(pred), str(lab), mpp=0.5, modes=["muse"], class_names=NAMES, strict=True)
  assert score.main(["--predictions", str(pred), "--labels", str(lab), "--mpp", "0.5", "--strict",
                     "--missing-as-empty"]) == 2


def test_brca_predictions_outside_the_split_are_not_orphans(tmp_path):
  root, pred = tmp_path / "brca", tmp_path / "pred"
  (root / "labels").mkdir(parents=True)
  pred.mkdir()
  for stem in ("t1", "v1"):
    (root / "labels" / f"{stem}_gt_class_coords.txt").write_text("10 10 2\n")
    (pred / f"{stem}.csv").write_text("x,y,class,score\n10,10,tumor,0.9\n")
  (root / "brca_ds_test.txt").write_text("t1.png\n")
  res = score.score(str(pred), str(root), mpp=0.5, modes=["muse"], class_names=NAMES, split="test", strict=True)
  assert res[0]["num_images"] == 1 and res[0]["detection"]["tp"] == 1


def test_puma_with_no_points_is_undefined(tmp_path, capsys):
  empty = _set(np.zeros((0, 2)), [], [])
  r = metrics.evaluate([empty, empty], [empty, empty], mode="puma", class_names=NAMES, radius_px=15)
  assert r["mean_f1"] is None and r["detection"]["f1"] is None and r["classes"]["tumor"]["f1"] is None
  # a class seen nowhere is left out of PUMA's mean (it has no entry in the script), not counted as 0
  g, p = _set([(0, 0)], [1]), _set([(1, 0)], [1], [0.5])
  r = metrics.evaluate([p, empty], [g, empty], mode="puma", class_names=NAMES, radius_px=15)
  assert r["classes"]["tumor"]["f1"] == 0.5 and r["classes"]["stromal"]["f1"] is None and r["mean_f1"] == 0.5
  lab, pred = tmp_path / "labels", tmp_path / "pred"
  lab.mkdir()
  pred.mkdir()
  (lab / "a.csv").write_text("x,y,class\n")
  (pred / "a.csv").write_text("x,y,class,score\n")
  out = tmp_path / "s.json"
  assert score.main(["--predictions", str(pred), "--labels", str(lab), "--mpp", "0.24", "--modes", "puma",
                     "--json", str(out)]) == 0
  row = "| puma | 15.00 | 3.60 | undefined | undefined | undefined | undefined | undefined |"
  assert row in capsys.readouterr().out
  assert json.loads(out.read_text())[0]["mean_f1"] is None


# 6. Radii: each mode's own radius at its benchmark's mpp, --radius-px, and what was used printed and recorded.
@pytest.mark.parametrize("mode,mpp,px,comparison", [("mcspatnet", 0.5, 6.0, "<"), ("muse", 0.25, 12.0, "<="),
                                                    ("ocelot", 0.2, 15.0, "<="), ("puma", 0.23, 15.0, "<"),
                                                    ("puma", 0.25, 15.0, "<"), ("hungarian", 0.2, 15.0, "<=")])
def test_native_radius_per_mode(mode, mpp, px, comparison):
  gt = _set([(0, 0)], [0])
  r = metrics.evaluate([_set([(px, 0)], [0], [1.0])], [gt], mode=mode, mpp=mpp)
  assert r["radius_px"] == px and r["radius_um"] == pytest.approx(px * mpp) and r["comparison"] == comparison
  assert r["detection"]["tp"] == (comparison == "<=")  # a prediction exactly at the radius
  # away from the benchmark's mpp: 3 µm
  assert metrics.evaluate([gt], [gt], mode=mode, mpp=0.4)["radius_px"] == 7.5


def test_radius_um_and_px_override_every_mode():
  gt = _set([(0, 0)], [0])
  r = metrics.evaluate([gt], [gt], mode="puma", mpp=0.23, radius_um=3.0)
  assert r["radius_px"] == pytest.approx(3 / 0.23) and r["radius_rule"] == "given in µm"
  assert metrics.evaluate([gt], [gt], mode="ocelot", mpp=0.5, radius_um=7.5)["radius_px"] == 15.0  # not 14.99..
  r = metrics.evaluate([gt], [gt], mode="muse", mpp=0.5, radius_px=9)
  assert (r["radius_px"], r["radius_um"], r["radius_rule"]) == (9.0, 4.5, "given in px")
  assert metrics.evaluate([gt], [gt], mode="muse", radius_px=9)["radius_um"] is None
  r = metrics.evaluate([gt, gt], [gt, gt], mode="mcspatnet", mpp=[0.5, 0.25])
  assert r["radius_px"] == [6.0, 12.0] and r["radius_um"] == 3.0


def test_cli_prints_and_records_radius_tie_rule_and_quirk_per_mode(tmp_path, capsys):
  pred, lab = _write_quirk_case(tmp_path)
  out = tmp_path / "s.json"
  modes = "mcspatnet,muse,ocelot,puma,hungarian"
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.23", "--modes", modes,
                     "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "| puma | 15.00 | 3.45 |" in text and "| muse | 12.00 | 2.76 |" in text
  assert "| ocelot | 13.04 | 3.00 |" in text
  res = json.loads(out.read_text())
  for r in res:
    assert {"radius_px", "radius_um", "radius_rule", "comparison", "tie_rule", "fn_quirk_applied"} <= set(r)
    assert f"- {r['mode']}: " in text and r["tie_rule"] in text
  assert [r["fn_quirk_applied"] for r in res] == [True, False, False, False, False]
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.23", "--modes", modes, "--radius-px", "6",
                     "--json", str(out)]) == 0
  assert {r["radius_px"] for r in json.loads(out.read_text())} == {6.0}
  assert score.main(["--predictions", pred, "--labels", lab, "--mpp", "0.5", "--radius-px", "6",
                     "--radius-um", "3"]) == 2
