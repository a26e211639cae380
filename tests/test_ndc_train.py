"""End-to-end NDC fine-tuning on the bundled BRCA-M2C sample (tiny model), then the predict and score CLIs."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import finetune_ndc
from muse_jax import outputs, predict, score
from muse_jax.ndc import metrics, train
from muse_jax.ndc.infer import Predictor


def _config(steps):
  c = finetune_ndc.get_config("tiny")
  c.data.dir = "bundled"
  c.data.max_samples = 1  # overfit one labelled window: a fast, deterministic check that the whole loop learns
  c.data.val_split = ""
  c.lfov.field = 128
  c.lfov.label_size = 96  # labelled centre; the rest of the field is unlabelled tile context (consistency loss)
  c.lfov.center = True
  c.lfov.flips = False
  c.train.steps = steps
  c.train.batch_size = 2
  c.train.log_every = 5
  c.train.ckpt_every = 20
  c.train.progress = False
  c.semi.start_step = 10
  c.optim.lr = 2e-3
  c.num_devices = 2  # data-parallel over 2 of the 4 fake CPU devices (exercises the sharded host callback)
  c.infer.window = 128
  c.infer.overlap = 32
  c.infer.batch_size = 2
  return c


@pytest.mark.slow
def test_finetune_learns_predicts_resumes_and_clis(tmp_path, capsys):
  cfg = _config(40)
  wd = tmp_path / "run"
  res = train.run(cfg, wd)
  logs = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  losses = [m["loss_sup"] for m in logs if "loss_sup" in m]
  assert res["step"] == 40 and len(losses) >= 5
  assert all(np.isfinite(m["loss"]) for m in logs if "loss" in m)
  assert losses[-1] < 0.3 * losses[0], losses
  assert "loss_cons_cls" in logs[-1] and logs[-1]["pseudo_bg"] > 0  # the consistency loss is active

  # The exported model finds the labelled nuclei of the (training) window, near where they are.
  sample = train.load_samples(cfg.data, "train")[0]
  batch = train.make_batch([sample], cfg, 0, 1, 512)
  img, m = batch["images"][0], batch["mask"][0]
  gt = {"points": batch["coords"][0][m], "classes": batch["classes"][0][m]}
  x0, y0, x1, y1 = batch["region"][0]
  pred = Predictor.from_checkpoint(wd)
  assert pred.class_names == list(cfg.data.class_names) and pred.mpp == 0.5 and pred.window == 128
  det = pred.predict_tiles(img[None])[0]
  # Precision over predictions well inside the labelled window, against every nucleus of the tile (the tile's
  # nuclei just outside the window are real but unlabelled in training); recall over the window's labels.
  H, W = sample.image.shape[:2]
  shift = batch["region"][0][:2] - np.array([(W - 96) // 2, (H - 96) // 2], np.float32)
  all_gt = {"points": sample.coords + shift, "classes": sample.classes}
  inner = (det["points"] >= [x0 + 6, y0 + 6]).all(1) & (det["points"] < [x1 - 6, y1 - 6]).all(1)
  p_in = metrics.evaluate([{k: v[inner] for k, v in det.items()}], [all_gt], mode="muse",
                          class_names=pred.class_names, mpp=0.5)["detection"]
  rec = metrics.evaluate([det], [gt], mode="muse", class_names=pred.class_names, mpp=0.5)["detection"]
  assert len(gt["points"]) >= 5 and p_in["tp"] >= 3
  assert rec["recall"] >= 0.7 and p_in["precision"] >= 0.7, (rec, p_in)

  # Resume: a second run() restores the last checkpoint instead of starting again.
  res2 = train.run(cfg, wd)
  assert res2["step"] == 40 and not res2["last_metrics"]

  # predict CLI on the window saved as PNG and on a blank image (nothing found -> empty files, no error).
  inp = tmp_path / "in"
  inp.mkdir()
  Image.fromarray(img).save(inp / "win.png")
  Image.fromarray(np.full((40, 60, 3), 255, np.uint8)).save(inp / "blank.png")  # smaller than the window
  out = tmp_path / "out"
  assert predict.main(["--checkpoint", str(wd), "--inputs", str(inp), "--mpp", "0.5", "--out", str(out),
                       "--class-names", ",".join(cfg.data.class_names), "--score-threshold", "0.5"]) == 0
  win = outputs.read_points_csv(out / "win.csv", pred.class_names)
  assert len(win["points"]) >= 0.7 * len(gt["points"])
  assert outputs.read_points_csv(out / "blank.csv", pred.class_names)["points"].shape == (0, 2)
  g = json.load(open(out / "win.geojson"))
  assert len(g["features"]) == len(win["points"])
  assert (out / "win_overlay.png").exists() and (out / "summary.json").exists()
  capsys.readouterr()
  assert predict.main(["--checkpoint", str(wd), "--inputs", str(inp), "--mpp", "0.5", "--out", str(out),
                       "--class-names", "tumor,lymphocyte,stromal"]) == 2
  assert "do not match" in capsys.readouterr().err
  assert predict.main(["--checkpoint", str(wd), "--inputs", str(inp), "--mpp", "0", "--out", str(out)]) == 2
  assert "--mpp" in capsys.readouterr().err

  # score CLI against labels written as CSV (only the labelled window's nuclei are labels here).
  labels = tmp_path / "labels"
  labels.mkdir()
  outputs.write_points_csv(labels / "win.csv", gt["points"], gt["classes"], None, pred.class_names)
  res = score.score(str(out), str(labels), mpp=0.5, modes=["mcspatnet", "muse"], class_names=pred.class_names)
  assert [r["mode"] for r in res] == ["mcspatnet", "muse"]
  assert res[1]["detection"]["tp"] >= 0.7 * len(gt["points"])
