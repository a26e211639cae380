"""NDC fine-tuning across processes: 2 CPU processes x 2 devices == 1 process x 4 devices (same global batch)."""
import json
import pathlib
import textwrap

import jax
import numpy as np
import pytest

import multiproc

from configs import finetune_ndc
from muse_jax.ndc import train as ndc_train


def small_config():
  c = finetune_ndc.get_config("tiny")
  c.data.dir = "bundled"
  c.data.max_samples = 2
  c.lfov.field, c.lfov.label_size = 128, 64  # small fields: the test is about feeding, not accuracy
  c.infer.window, c.infer.overlap = 128, 16
  c.data.val_split = ""
  c.train.steps = 3
  c.train.log_every = 1
  c.train.ckpt_every = 100
  c.train.progress = False
  c.train.batch_size = 4
  c.semi.enabled = False  # a smaller program to compile; the feeding under test is the same with the teacher on
  return c


def read_metrics(workdir):
  rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
  return [r for r in rows if "loss" in r]


_WORKER = textwrap.dedent("""
    import sys, json
    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    sys.path.insert(0, REPO); sys.path.insert(0, TESTS)
    from test_ndc_multihost import small_config
    from muse_jax.ndc import train
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    out = train.run(small_config(), workdir)
    print("DONE", json.dumps(out["step"]))
""")


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  assert jax.device_count() == 4
  procs = multiproc.launch_two_workers(_WORKER, tmp_path / "mh")
  # The reference run compiles while the two workers do (XLA compiles mostly on one core each).
  one = ndc_train.run(small_config(), tmp_path / "one")
  assert one["step"] == 3
  multiproc.wait_workers(procs, "DONE 3")
  multi, single = read_metrics(tmp_path / "mh"), read_metrics(tmp_path / "one")
  assert [r["step"] for r in multi] == [1, 2, 3]  # process 0 alone writes the log
  for key in ("loss", "loss_cls", "loss_reg", "matched", "gt"):
    np.testing.assert_allclose([r[key] for r in multi], [r[key] for r in single], rtol=2e-4, atol=1e-5, err_msg=key)
  assert (tmp_path / "mh" / "export" / "ndc_config.json").exists()
  from muse_jax.ndc.infer import Predictor
  p_multi, p_one = Predictor.from_checkpoint(tmp_path / "mh"), Predictor.from_checkpoint(tmp_path / "one")
  a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(p_multi.variables)])
  b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(p_one.variables)])
  # Adam turns float-order noise in near-zero gradients into steps of up to lr (1e-3) on a few weights, so compare
  # in bulk: training on other data (or a missing step) would move most weights by ~1e-3.
  assert np.mean(np.abs(a - b) > 2e-4) < 1e-3, np.mean(np.abs(a - b) > 2e-4)
  assert np.mean(np.abs(a - b)) < 1e-5, np.mean(np.abs(a - b))


def test_multihost_batch_must_use_every_device(monkeypatch, tmp_path):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  c = small_config()
  c.train.batch_size = 6
  with pytest.raises(ValueError, match=r"got 6, expected a multiple of the 4 devices of the 2 processes"):
    ndc_train.run(c, tmp_path)
