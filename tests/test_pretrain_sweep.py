"""The sweep runner's command lines and results table, and the demo's loss summary (no training)."""
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import sweep  # noqa: E402
from muse_jax import demo  # noqa: E402


def test_sweep_commands_and_gather(tmp_path, capsys):
  name, base, runs = sweep.load_sweep(str(REPO / "experiments/sweeps/loss_ablation.py"))
  assert name == "loss_ablation" and set(runs) == {"image_only", "nulo_only", "both"}
  cmd = sweep.command(base, "W", runs["image_only"], python="python")
  assert cmd == ["python", "-m", "muse_jax.main", "--config", "configs/pretrain.py:vit_s16", "--workdir", "W",
                 "--config.loss.w_nu=0.0"]
  assert sweep.main([str(REPO / "experiments/sweeps/loss_ablation.py"), "--root", "gs://b/s", "--print",
                     "--template", "launch {name}: {cmd}"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("launch image_only: python -m muse_jax.main") and "gs://b/s/loss_ablation/both" in out[2]
  run_dir = tmp_path / "loss_ablation" / "both"
  run_dir.mkdir(parents=True)
  (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.5}) + "\n" +
                                         json.dumps({"step": 10, "loss": 1.25, "loss_nu": 0.5}) + "\n")
  table = sweep.gather(tmp_path / "loss_ablation", runs)
  assert "| both | 10 | 1.25 |  | 0.5 |" in table
  assert "| image_only | not run |" in table


def test_demo_summary_first_last_min(tmp_path):
  p = tmp_path / "metrics.jsonl"
  p.write_text("\n".join(json.dumps({"step": s, "loss": l}) for s, l in ((5, 3.0), (10, 1.0), (15, 2.0))))
  s = demo.summarize_metrics(p)["loss"]
  assert (s["first"], s["last"], s["min"], s["min_step"]) == (3.0, 2.0, 1.0, 10)
