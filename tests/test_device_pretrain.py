"""The prepared accelerator script (experiments/device_pretrain.py) end to end on CPU with the tiny config."""
import json

import pytest

from experiments import device_pretrain


def test_published_peaks():
  assert device_pretrain.published_peak("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4e12)
  assert device_pretrain.published_peak("NVIDIA H200", "float32") == pytest.approx(66.9e12)
  assert device_pretrain.published_peak("cpu", "bfloat16") is None


def test_device_script_runs_on_cpu_with_the_tiny_config(tmp_path, capsys):
  out = tmp_path / "result.json"
  rc = device_pretrain.main([
      "--config", "tiny", "--dtype", "float32", "--minutes", "0.1", "--batch", "4", "--data", "bundled",
      "--eval_data", "bundled", "--workdir", str(tmp_path / "wd"), "--out", str(out), "--calib_steps", "1",
      "--min_steps", "8", "--log_every", "2", "--linear_epochs", "2", "--matmul_n", "128"])
  assert rc == 0
  r = json.loads(out.read_text())
  assert r["device"]["platform"] == "cpu" and r["config"]["model"] == "tiny"
  t = r["train"]
  assert t["steps_done"] >= 1 and t["regions_per_s"] > 0 and t["flops_per_step"] > 0
  assert t["mfu"] is None and 0 < t["fraction_of_measured_matmul"]  # no published peak for a CPU
  assert r["config"]["schedule"]["teacher_half_life_frac"] == 0.05
  assert set(r["eval"]) == {"pretrained", "random_init", "raw_pixels"}
  for v in r["eval"].values():
    assert 0 <= v["knn_f1_val_k"] <= 100 and 0 <= v["linear_acc"] <= 100
  assert "health at step" in r["health"]["line"]
  assert "wrote" in capsys.readouterr().out
