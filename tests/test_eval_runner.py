"""Evaluation driver end to end on a 3-image BRCA-M2C folder (tiny random backbone): kNN, linear, fine-tune,
reports; empty splits and bad protocol names."""
import json
import shutil

import numpy as np
import pytest

from muse_jax.data import bundled_sample_dir
from muse_jax.evaluation import runner


def _mini_brca(tmp_path, empty_val=False):
  src = bundled_sample_dir()
  (tmp_path / "images").mkdir(parents=True)
  (tmp_path / "labels").mkdir()
  for split in ("train", "val", "test"):
    name = (src / f"brca_ds_{split}.txt").read_text().split()[0]
    stem = name[:-4]
    shutil.copy(src / "images" / name, tmp_path / "images" / name)
    shutil.copy(src / "labels" / f"{stem}_gt_class_coords.txt", tmp_path / "labels")
    (tmp_path / f"brca_ds_{split}.txt").write_text("" if (empty_val and split == "val") else name + "\n")
  return tmp_path


@pytest.mark.slow
def test_run_all_protocols_writes_reports(tmp_path):
  data = _mini_brca(tmp_path / "data")
  cfg = runner.default_config()
  cfg.data_dir = str(data)
  cfg.protocols = "knn,linear,finetune"
  cfg.linear_epochs = 3
  cfg.finetune_epochs = 2
  cfg.progress = False
  out = runner.run(cfg, tmp_path / "out")
  rows = {r["protocol"]: r for r in out["rows"]}
  assert set(rows) == {"knn", "linear", "finetune"}
  n_train, n_val, n_test = map(int, rows["knn"]["counts"].split("/"))
  assert rows["knn"]["result"]["n_test"] == n_test and rows["linear"]["result"]["n_train"] == n_train
  ft = rows["finetune"]["result"]
  assert len(ft["val_acc"]) == 2 and np.isfinite(ft["train_loss"]).all()
  assert ft["val_accuracy"] == max(ft["val_acc"]) and ft["metrics"]["n"] == n_test
  assert ft["val_acc"][ft["best_epoch"]] == max(ft["val_acc"])
  md = (tmp_path / "out" / "results.md").read_text()
  for title in ("KNN Evaluation", "Linear Probing Evaluation", "Fine-Tuning Evaluation", "[k on val]",
                "linear-probe epochs = 3 (spec: 100)"):
    assert title in md
  saved = json.loads((tmp_path / "out" / "results.json").read_text())
  assert len(saved["rows"]) == 3 and "head" not in saved["rows"][1]["result"]
  assert len(list((tmp_path / "out").glob("confusion_*.png"))) == 3


def test_empty_split_and_bad_protocol(tmp_path):
  data = _mini_brca(tmp_path, empty_val=True)
  with pytest.raises(ValueError, match="split 'val' is empty"):
    runner.load_tiles("brca_m2c", str(data), mpp=0.5, size=224)
  with pytest.raises(ValueError, match="protocols"):
    runner.parse_protocols("knn,svm")
  assert runner.parse_protocols("finetune,knn") == ["knn", "finetune"]
