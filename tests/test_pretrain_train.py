"""End-to-end checks of the pretraining driver on the tiny config with synthetic data (4 fake CPU devices), in the
'device' augmentation layout (the views are rendered in the step)."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest

import multiproc

from configs import pretrain
from muse_jax.pretrain import train

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_config(total_steps: int = 6) -> ml_collections.ConfigDict:
  c = pretrain.get_config("tiny")
  c.data_source = "synthetic"
  c.data.n_global, c.data.global_size, c.data.n_local, c.data.local_size = 2, 64, 1, 32
  c.data.max_nuclei_global, c.data.max_nuclei_local = 8, 4
  # The accelerator recipes' layout (issue #23): the step renders the views from crops with keys from the step's
  # RNG, so the resume, device-count and two-process tests below also check that the rendering is exact across
  # them (compiling it costs about what the host layout does).
  c.data.augment_on = "device"
  c.data.blur_p, c.data.solarize_p, c.data.grayscale_p = (1.0, 0.5, 0.5), 0.5, 0.5
  c.synthetic_region_nuclei = 10
  c.batch_size = 4
  c.heads.cls_out_dim, c.heads.nu_out_dim, c.heads.hidden_dim, c.heads.bottleneck_dim = 32, 16, 32, 16
  c.steps_per_epoch = 2
  c.total_steps = total_steps
  c.log_every_steps = 1
  c.checkpoint_every_steps = 3
  c.async_checkpointing = False
  c.progress_bar = False
  return c


def read_metrics(workdir) -> list[dict]:
  return [json.loads(line) for line in open(os.path.join(workdir, train.METRICS_FILE))]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """6 steps on 1 device (reference for the resume and device-count tests)."""
  wd = tmp_path_factory.mktemp("straight")
  out = train.run(small_config(), wd, devices=jax.devices()[:1])
  return wd, out


def test_straight_run_logs_every_metric_and_checkpoints(straight_run):
  wd, out = straight_run
  assert out["step"] == 6 and out["last_checkpoint_step"] == 6
  rows = read_metrics(wd)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  for key in ("loss", "loss_image", "loss_nu", "lr", "wd", "momentum", "teacher_temp", "shared_nuclei",
              "grad_norm", "images_per_s"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[0]["shared_nuclei"] > 0
  assert sorted(int(p.name) for p in (pathlib.Path(wd) / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]


def test_kill_and_resume_gives_the_same_params(straight_run, tmp_path):
  wd, _ = straight_run
  cfg = small_config()
  out1 = train.run(cfg, tmp_path, devices=jax.devices()[:1], stop_at_step=3)
  assert out1["step"] == 3
  out2 = train.run(cfg, tmp_path, devices=jax.devices()[:1])  # a fresh call resumes from step 3
  assert out2["step"] == 6
  a, _ = train.load_state(wd, cfg, devices=jax.devices()[:1])
  b, _ = train.load_state(tmp_path, cfg, devices=jax.devices()[:1])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path)], [r["loss"] for r in read_metrics(wd)],
                             rtol=1e-6)


def test_one_and_four_devices_give_the_same_losses(straight_run, tmp_path):
  wd, _ = straight_run
  cfg = small_config(total_steps=6)
  train.run(cfg, tmp_path, devices=jax.devices()[:4], stop_at_step=3)
  one = read_metrics(wd)[:3]
  four = read_metrics(tmp_path)
  for key in ("loss", "loss_image", "loss_nu", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in four], [r[key] for r in one], rtol=2e-4, atol=1e-5, err_msg=key)


def test_fsdp_mesh_shards_large_params_and_runs(tmp_path):
  from muse_jax.pretrain import mesh as mesh_lib
  cfg = small_config(total_steps=1)
  cfg.mesh.fsdp, cfg.mesh.fsdp_min_size = 2, 1024
  s = train.setup(cfg, jax.devices()[:4])
  assert dict(s["mesh"].shape) == {"data": 2, "fsdp": 2}
  specs = [sh.spec for sh in jax.tree.leaves(s["shardings"], is_leaf=lambda x: hasattr(x, "spec"))]
  assert any("fsdp" in tuple(sp) for sp in specs)
  assert mesh_lib.leaf_spec((6, 64), 2, 16) == jax.sharding.PartitionSpec(None, "fsdp")
  assert mesh_lib.leaf_spec((3,), 2, 1) == jax.sharding.PartitionSpec()


def test_non_divisible_batch_fails_at_start(tmp_path):
  cfg = small_config()
  cfg.batch_size = 6
  with pytest.raises(ValueError, match=r"batch_size=6 must be a positive multiple of the number of devices"):
    train.run(cfg, tmp_path, devices=jax.devices()[:4])
  assert not (tmp_path / "checkpoints").exists()


def test_wrong_typed_config_field_fails_at_start(tmp_path):
  cfg = small_config()
  with pytest.raises(TypeError):
    cfg.batch_size = "eight"  # ConfigDicts are type-safe
  bad = ml_collections.ConfigDict(cfg.to_dict())
  bad.optim = ml_collections.ConfigDict(dict(bad.optim.to_dict(), base_lr="5e-4"))
  with pytest.raises(ValueError, match=r"has type str .*config.optim.base_lr"):
    train.run(bad, tmp_path)
  cfg.loss.w_image, cfg.loss.w_nu = 0.0, 0.0
  with pytest.raises(ValueError, match=r"not both 0"):
    train.validate_config(cfg)


def test_cli_rejects_wrong_typed_override(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "muse_jax.main", "--config", "configs/pretrain.py:tiny",
                         "--workdir", str(tmp_path), "--config.batch_size=abc"], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert "batch_size" in proc.stderr


_WORKER = textwrap.dedent("""
    import sys, json
    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    sys.path.insert(0, REPO); sys.path.insert(0, TESTS)
    from test_pretrain_train import small_config
    from muse_jax.pretrain import train
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    out = train.run(small_config(), workdir, stop_at_step=3)
    print("DONE", json.dumps(out["step"]))
""")


@pytest.mark.slow
def test_two_processes_match_one_process(straight_run, tmp_path):
  """Two CPU processes (2 devices each) with jax.distributed == one process with the same global batch."""
  wd, _ = straight_run
  procs = multiproc.launch_two_workers(_WORKER, tmp_path / "mh")
  multiproc.wait_workers(procs, "DONE 3")
  multi = read_metrics(tmp_path / "mh")
  one = read_metrics(wd)[:3]
  for key in ("loss", "loss_image", "loss_nu"):
    np.testing.assert_allclose([r[key] for r in multi], [r[key] for r in one], rtol=2e-4, atol=1e-5, err_msg=key)


class _Inject:
  """Wraps a data iterator: SIGTERM before batch `sigterm_at`, NaN coordinates in batch `nan_at` (1-based)."""

  def __init__(self, it, sigterm_at=None, nan_at=None):
    self.it, self.n, self.sigterm_at, self.nan_at = it, 0, sigterm_at, nan_at

  def __next__(self):
    self.n += 1
    b = next(self.it)
    if self.n == self.sigterm_at:
      import signal
      os.kill(os.getpid(), signal.SIGTERM)
    if self.n == self.nan_at:
      b["global"]["coords"] = np.full_like(b["global"]["coords"], np.nan)
    return b

  def get_state(self):
    return self.it.get_state()

  def set_state(self, s):
    self.it.set_state(s)

  def start_prefetch(self):
    pass


def _patched(monkeypatch, **kw):
  orig = train.make_data_iterator
  def make(config):
    it, n = orig(config)
    return _Inject(it, **kw), n
  monkeypatch.setattr(train, "make_data_iterator", make)


def test_sigterm_saves_and_stops_cleanly(straight_run, tmp_path, monkeypatch):
  _patched(monkeypatch, sigterm_at=2)
  out = train.run(small_config(), tmp_path, devices=jax.devices()[:1])
  assert out["preempted"] and out["step"] == 2 and out["last_checkpoint_step"] == 2
  monkeypatch.undo()
  out = train.run(small_config(), tmp_path, devices=jax.devices()[:1])  # resumes from step 2
  assert out["step"] == 6


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(straight_run, tmp_path, monkeypatch):
  _patched(monkeypatch, nan_at=5)
  with pytest.raises(train.NonFiniteLossError, match=r"at step 5.*Last good checkpoint: step 3"):
    train.run(small_config(), tmp_path, devices=jax.devices()[:1])
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3]
