"""Tests for the reproduction study's pure parts: the union data source and the report's aggregation."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from muse_jax.data import pipeline

_STUDY = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "study.py"


@pytest.fixture(scope="module")
def study():
  spec = importlib.util.spec_from_file_location("study", _STUDY)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _folder(tmp_path, n=3, size=160):
  """`n` white PNGs with two sidecar points each, in `images/` + `points/`."""
  (tmp_path / "images").mkdir()
  (tmp_path / "points").mkdir()
  for i in range(n):
    img = np.full((size, size, 3), 255, np.uint8)
    img[40:50, 40:50] = (60, 20, 120)
    Image.fromarray(img).save(tmp_path / "images" / f"r{i}.png")
    (tmp_path / "points" / f"r{i}.csv").write_text("x,y\n45.0,45.0\n100.5,120.0\n")
  return tmp_path


def test_union_source_concatenates_parts_with_their_own_mpp(tmp_path):
  from muse_jax.data import bundled_sample_dir
  folder = _folder(tmp_path)
  cfg = pipeline.default_data_config()
  cfg.region_mpp = 0.25
  brca = pipeline.open_pretrain_source(pipeline.default_data_config())  # 'bundled': train + val
  cfg.source = f"brca:{bundled_sample_dir()}|folder:{folder}"
  src = pipeline.open_pretrain_source(cfg)
  assert isinstance(src, pipeline.UnionSource)
  assert len(src) == len(brca) + 3
  first, last = src[0], src[len(src) - 1]
  assert float(first["mpp"]) == pytest.approx(0.5)  # BRCA records keep 0.5, not region_mpp
  assert first["name"] == brca[0]["name"]
  assert float(last["mpp"]) == pytest.approx(0.25) and last["name"] == "r2"
  np.testing.assert_allclose(last["coords"], [[45.0, 45.0], [100.5, 120.0]])
  with pytest.raises(IndexError):
    src[len(src)]


def test_union_source_errors_name_the_part(tmp_path):
  cfg = pipeline.default_data_config()
  cfg.source = f"bundled|folder:{_folder(tmp_path)}"  # folder part without region_mpp
  with pytest.raises(ValueError, match="region_mpp"):
    pipeline.open_pretrain_source(cfg)
  cfg.source = "bundled|bundled"
  with pytest.raises(ValueError, match="distinct"):
    pipeline.open_pretrain_source(cfg)
  cfg.source = "bundled|"
  with pytest.raises(ValueError, match="non-empty"):
    pipeline.open_pretrain_source(cfg)


def test_union_dataset_uses_each_record_mpp(tmp_path):
  """With region_mpp 0.25 set for the folder part, a 0.5 µm/px BRCA record must still be read at 0.5: a view at
  mpp 0.5 then covers `size` region pixels, so its nuclei keep their spacing (scale 1)."""
  cfg = pipeline.default_data_config()
  cfg.region_mpp = 0.25
  cfg.source = f"bundled|folder:{_folder(tmp_path, n=1)}"
  cfg.n_global, cfg.global_size, cfg.n_local = 1, 64, 0
  cfg.mpp_range = (0.5, 0.5)
  cfg.max_nuclei_global = 128
  cfg.read_threads, cfg.read_buffer = 1, 1
  src = pipeline.open_pretrain_source(cfg)
  n = len(src)
  ds = pipeline.make_pretrain_dataset(src, cfg, seed=0, batch_size=n)
  batch = next(iter(ds))
  g = batch["global"]
  assert g["images"].shape == (n, 1, 64, 64, 3)
  # The folder record (0.25 µm/px, 2 nuclei 60 px apart and more) seen at 0.5 µm/px: coordinates halve, so at most
  # both of its nuclei; BRCA records (dense, 0.5 µm/px) keep dozens of nuclei in a 64 px view at scale 1.
  counts = g["mask"].sum(axis=(1, 2))
  assert counts.min() <= 2 < counts.max()
  assert np.all(g["mpp"] == 0.5)


def test_mean_std_and_formatting(study):
  mu, sd, n = study.mean_std([1.0, 2.0, 3.0])
  assert (mu, n) == (2.0, 3) and sd == pytest.approx(1.0)
  assert study.mean_std([4.0]) == (4.0, 0.0, 1)
  assert study.mean_std([None, float("nan")])[2] == 0
  assert study.fmt_ms((2.0, 1.0, 3)) == "2.00 ± 1.00"
  assert study.fmt_ms((2.0, 0.0, 1)) == "2.00 ± 0.00 (n=1)"
  assert study.fmt_ms((float("nan"), float("nan"), 0)) == "not run"


def _write_run(root, method, seed, knn, linear, det):
  name = study_name = f"{method}_s{seed}"
  ev = root / "eval" / name
  ev.mkdir(parents=True)
  metrics = lambda a, f: {"accuracy": a, "macro_f1": f}  # noqa: E731
  rows = [{"protocol": "knn", "result": {"official": {"k": 500, "accuracy": knn, "metrics": metrics(knn, 0.3)},
                                         "honest": {"k": 10, "accuracy": knn - 0.02,
                                                    "metrics": metrics(knn - 0.02, 0.31)}}},
          {"protocol": "linear", "result": {"accuracy": linear, "best_epoch": 7, "metrics": metrics(linear, 0.4)}}]
  (ev / "results.json").write_text(json.dumps({"rows": rows}))
  (ev / "run.json").write_text(json.dumps({"commands": ["x"], "wall_s": [12.0], "rc": 0, "finished": True}))
  nd = root / "ndc" / name
  nd.mkdir(parents=True)
  (nd / "scores.json").write_text(json.dumps([{"mode": m, "detection": {"f1": det}, "mean_f1": det / 2}
                                              for m in ("mcspatnet", "muse")]))
  (nd / "scores_valthr.json").write_text(json.dumps([{"mode": m, "detection": {"f1": det + 0.1},
                                                      "mean_f1": det / 2 + 0.1} for m in ("mcspatnet", "muse")]))
  (nd / "val_sweep.json").write_text(json.dumps({"best_threshold": 0.15}))
  if method != "random":
    pre = root / "pretrain" / name
    pre.mkdir(parents=True)
    (pre / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "loss": 10.0 - s, "loss_image": 5.0,
                                                             "loss_nu": 5.0 - s, "steps_per_s": 4.0})
                                                 for s in (1, 2, 3)) + "\n")
  return study_name


def test_gather_aggregate_and_report(study, tmp_path):
  for seed, (knn, lin, det) in enumerate([(0.60, 0.50, 0.40), (0.62, 0.52, 0.50), (0.64, 0.54, 0.60)]):
    _write_run(tmp_path, "random", seed, knn, lin, det)
  _write_run(tmp_path, "muse", 0, 0.70, 0.65, 0.55)
  data = study.gather(tmp_path, ("random", "muse"), (0, 1, 2))
  r0 = data["runs"]["random_s0"]
  assert r0["knn_best_acc"] == pytest.approx(60.0) and r0["knn_val_acc"] == pytest.approx(58.0)
  assert r0["linear_f1"] == pytest.approx(40.0) and r0["muse_mean"] == pytest.approx(20.0)
  assert r0["muse_mean_v"] == pytest.approx(30.0) and r0["mcspatnet_det_v"] == pytest.approx(50.0)
  assert r0["ndc_threshold"] == 0.15
  assert r0["eval_wall_s"] == [12.0]
  assert data["runs"]["muse_s0"]["final_loss"] == 7.0 and "muse_s0" in data["curves"]
  agg = study.aggregate(data, ["knn_best_acc", "mcspatnet_det"], ("random", "muse"))
  mu, sd, n = agg["random"]["knn_best_acc"]
  assert (round(mu, 6), round(sd, 6), n) == (62.0, 2.0, 3)
  assert agg["muse"]["mcspatnet_det"][2] == 1
  md = study.table(data, study.EVAL_METRICS, ("random", "muse"))
  assert "| random init | 62.00 ± 2.00 |" in md
  assert "70.00 ± 0.00 (n=1)" in md
  paired = study.paired_table(data, study.EVAL_METRICS, ("random", "muse"))
  assert "| MUSE (both) | +10.00 ± 0.00 (n=1) |" in paired
  text = study.report(tmp_path, tmp_path / "figs", ("random", "muse"), (0, 1, 2))
  assert "random_s2" in text and (tmp_path / "study.json").exists()
  assert "| random init | 60.00 ± 10.00 | 35.00 ± 5.00 |" in text  # NDC at the val threshold, then at 0.5:
  assert "| random init | 50.00 ± 10.00 | 25.00 ± 5.00 |" in text
  assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
      "study_eval_by_method.png", "study_loss_curves.png", "study_ndc_by_method.png"]


def test_commands_are_the_project_clis(study, tmp_path):
  root = tmp_path
  cmd = study.pretrain_command("py", root, "muse_fixed", 2, "brca:B|folder:R", 0.499)
  assert cmd[:5] == ["py", "-m", "muse_jax.main", "--config", "configs/pretrain.py:small"]  # issue #21's recipe
  assert "--config.seed=2" in cmd and "--config.data.mpp_range=(0.5, 0.5)" in cmd
  assert study.pretrain_command("py", root, "muse", 0, "s", 0.5, variant="study")[4] == "configs/pretrain.py:study"
  dino = study.pretrain_command("py", root, "dino", 0, "s", 0.5)
  assert "--config.loss.w_nu=0.0" in dino and "--config.loss.w_image=1.0" in dino
  # small_sk's default is NuLo only: the MUSE row must switch the image loss back on; no slide -> no region mpp.
  muse = study.pretrain_command("py", root, "muse", 1, "brca:B", None, variant="small_sk")
  assert "--config.loss.w_image=1.0" in muse and not any("region_mpp" in c for c in muse)
  assert study.slide_source(root, "B", no_slide=True) == "brca:B"
  ev = study.eval_command("py", root, "/b", "random", 1)
  assert ev[ev.index("--backbone") + 1] == "random:tiny_p8" and ev[ev.index("--backbone_seed") + 1] == "1"
  assert study.eval_command("py", root, "/b", "random", 1, "study")[4] == "random:tiny"
  raw = study.eval_command("py", root, "/b", "raw", 0)
  assert raw[raw.index("--backbone") + 1] == "raw:16"
  with pytest.raises(ValueError, match="raw-pixel"):
    study.ndc_commands("py", root, "/b", "raw", 0)
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "brca_ds_test.txt").write_text("a.png\nb.png\nc.png\n")
  (tmp_path / "b" / "brca_ds_val.txt").write_text("v.png\n")
  ft, pval, ptest, sweep, fixed, chosen = study.ndc_commands("py", root, str(tmp_path / "b"), "nulo", 0, steps=7)
  assert ft[ft.index("--init") + 1] == str(root / "pretrain" / "nulo_s0" / "export")
  assert "--config.train.steps=7" in ft and ptest.count("--inputs") == 1
  assert "... (3 files)" in study.short_cmd(ptest) and str(tmp_path / "b" / "images" / "v.png") in pval
  assert sweep[sweep.index("--split") + 1] == "val" and "--sweep" in sweep
  assert fixed[fixed.index("--split") + 1] == "test" and fixed[fixed.index("--score-threshold") + 1] == "0.5"
  nd = root / "ndc" / "nulo_s0"
  assert chosen[chosen.index("--threshold-from") + 1] == sweep[sweep.index("--json") + 1] == str(nd / "val_sweep.json")
  assert chosen[chosen.index("--predictions") + 1] == str(nd / "test_pred")
  ctl = study.ndc_commands("py", root, str(tmp_path / "b"), "muse", 1, overrides=["optim.backbone_train_mode=True"],
                           stage_dir="ndc_bn")
  assert "--config.optim.backbone_train_mode=True" in ctl[0]
  assert ctl[0][ctl[0].index("--workdir") + 1] == str(root / "ndc_bn" / "muse_s1" / "train")
  assert ctl[-1][ctl[-1].index("--json") + 1] == str(root / "ndc_bn" / "muse_s1" / "scores_valthr.json")
  # random init fine-tunes the architecture that the variant pretrains (tiny_p8 for small / small_sk, tiny for study)
  rnd = study.ndc_commands("py", root, str(tmp_path / "b"), "random", 2, variant="small_sk")[0]
  assert rnd[rnd.index("--init") + 1] == "random:tiny_p8" and "--config.seed=2" in rnd
  old = study.ndc_commands("py", root, str(tmp_path / "b"), "random", 2, variant="study")[0]
  assert old[old.index("--init") + 1] == "random:tiny"
  with pytest.raises(SystemExit):
    study.parse_args(["ndc", "--brca", "/b", "--ndc_override", "optim.backbone_train_mode=True"])
  a = study.parse_args(["ndc", "--brca", "/b", "--ndc_override", "optim.backbone_train_mode=True", "--ndc_tag", "bn"])
  assert a.ndc_override == ["optim.backbone_train_mode=True"] and a.ndc_tag == "bn"
