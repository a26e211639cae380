"""Issue #19, training CLIs (main, finetune, export): bad values, foreign or incompatible workdirs and failed
checkpoint saves stop with one line (`cli.UserError`, exit 2) before anything is written; SIGTERM exits 75."""
import json
import os
import pathlib
import subprocess
import textwrap
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import finetune_ndc
from configs import pretrain
from muse_jax import cli
from muse_jax import config_check
from muse_jax.data import pipeline
from muse_jax.ndc import train as ndc_train
from muse_jax.pretrain import checkpoint as ckpt_lib
from muse_jax.pretrain import train
from test_pretrain_train import small_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _set(c: ml_collections.ConfigDict, field: str, value) -> None:
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  with c.unlocked():
    node[leaf] = value


def _cli(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
  lines = [x for x in proc.stderr.splitlines() if x.strip()]
  assert proc.returncode == cli.EXIT_USAGE, proc.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  return lines[0]


def _ndc_config() -> ml_collections.ConfigDict:
  c = finetune_ndc.get_config("tiny")
  c.data.dir = "bundled"
  return c


# ------------------------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("variant", pretrain.VARIANTS)
def test_every_pretrain_field_has_a_rule(variant):
  c = pretrain.get_config(variant)
  assert config_check.uncovered(c, train.RULES) == [], "add a rule to muse_jax.pretrain.train.RULES"
  c.data.source = "bundled"
  train.validate_config(c, check_data=True)


@pytest.mark.parametrize("variant", finetune_ndc.BACKBONES)
def test_every_finetune_field_has_a_rule(variant):
  c = finetune_ndc.get_config(variant)
  assert config_check.uncovered(c, ndc_train.RULES) == [], "add a rule to muse_jax.ndc.train.RULES"
  c.data.dir = "bundled"
  ndc_train.validate_config(c)


@pytest.mark.parametrize("field,value,match", [
    ("data.mpp_range", ("foo",), r"config\.data\.mpp_range.*\('foo',\)"),
    ("data.mpp_range", (1.0, "a"), r"config\.data\.mpp_range\[1\]"),
    ("data.mpp_range", (2.0, 1.0), r"lo <= hi \(config\.data\.mpp_range\)"),
    ("data.mpp_range", (0.0, 1.0), r"config\.data\.mpp_range\[0\]"),
    ("data.region_mpp", -1.0, r"config\.data\.region_mpp"),
    ("data.global_size", 0, r"config\.data\.global_size"),
    ("data.blur_p", (1.0, 0.5), r"config\.data\.blur_p"),
    ("data.hue", 0.7, r"config\.data\.hue"),
    ("data.mpp_dist", "gauss", r"config\.data\.mpp_dist"),
    ("data.source", "bogus:x", r"unknown data source .bogus:x. \(config\.data\.source\)"),
    ("data.source", "brca:/no/such/folder", r"brca folder not found \(config\.data\.source\)"),
    ("optim.base_lr", float("nan"), r"config\.optim\.base_lr"),
    ("optim.b2", 1.0, r"config\.optim\.b2"),
    ("batch_size", 0, r"config\.batch_size"),
    ("total_steps", -5, r"config\.total_steps"),
    ("checkpoint_every_steps", 0, r"config\.checkpoint_every_steps"),
])
def test_pretrain_bad_values_fail_before_anything_is_written(field, value, match, tmp_path):
  c = small_config()
  c.data_source = "pipeline" if field.startswith("data.") else "synthetic"
  _set(c, field, value)
  with pytest.raises(cli.UserError, match=match):
    train.run(c, tmp_path / "wd")
  assert not (tmp_path / "wd").exists()


def test_pretrain_mistyped_field_from_json_is_named():
  c = ml_collections.ConfigDict(small_config().to_dict())
  c.optim = ml_collections.ConfigDict(dict(c.optim.to_dict(), base_lr="5e-4"))
  with pytest.raises(cli.UserError, match=r"has type str .*\(config\.optim\.base_lr\)"):
    train.validate_config(c)


@pytest.mark.parametrize("field,value,match", [
    ("data.dir", None, r"not set \(config\.data\.dir\).*--config\.data\.dir=bundled"),
    ("data.dir", "/no/such/folder", r"config\.data\.dir"),
    ("data.mpp", -1.0, r"config\.data\.mpp"),
    ("data.mpp", float("inf"), r"config\.data\.mpp"),
    ("infer.overlap", 256, r"config\.infer\.overlap"),
    ("infer.score_threshold", 1.5, r"config\.infer\.score_threshold"),
    ("lfov.field", 250, r"multiple of 16 .*config\.lfov\.field"),
    ("eval.modes", ("muse", "nope"), r"config\.eval\.modes\[1\]"),
    ("loss.match_max_dist_um", 0.0, r"config\.loss\.match_max_dist_um"),
    ("init", "random:nope", r"config\.init"),
    ("init", "/no/such/backbone", r"config\.init"),
    ("train.steps", 0, r"config\.train\.steps"),
])
def test_finetune_bad_values_fail_before_anything_is_written(field, value, match, tmp_path):
  c = _ndc_config()
  _set(c, field, value)
  with pytest.raises(cli.UserError, match=match):
    ndc_train.run(c, tmp_path / "wd")
  assert not (tmp_path / "wd").exists()


# ------------------------------------------------------------------------------------------- tfds sources
def _fake_prepared(root: pathlib.Path, *names: str) -> pathlib.Path:
  for n in names:
    (root / n / "1.0.0").mkdir(parents=True)
    (root / n / "1.0.0" / "dataset_info.json").write_text("{}")
  return root


def test_tfds_source_infers_the_only_dataset_and_names_the_valid_ones(tmp_path):
  one = _fake_prepared(tmp_path / "one", "brca_m2c")
  assert pipeline.resolve_tfds(str(one)) == ("brca_m2c", str(one))
  assert pipeline.resolve_tfds(f"brca_m2c@{one}") == ("brca_m2c", str(one))
  with pytest.raises(cli.UserError, match=r"no prepared dataset 'regions' .*holds brca_m2c"):
    pipeline.resolve_tfds(f"regions@{one}")
  two = _fake_prepared(tmp_path / "two", "brca_m2c", "regions")
  with pytest.raises(cli.UserError, match=r"several prepared datasets.*brca_m2c, regions.*tfds:NAME@"):
    pipeline.resolve_tfds(str(two))
  (tmp_path / "empty").mkdir()
  with pytest.raises(cli.UserError, match=r"no prepared dataset in the tfds data dir.*muse_jax\.data\.prepare"):
    pipeline.resolve_tfds(str(tmp_path / "empty"))
  with pytest.raises(cli.UserError, match=r"tfds data dir not found"):
    pipeline.resolve_tfds(str(tmp_path / "missing"))


@pytest.mark.slow
def test_readme_tfds_form_reads_prepared_brca_records(tmp_path):
  from muse_jax.data import prepare
  prepare.run("brca_m2c", "bundled", str(tmp_path))
  cfg = pipeline.default_data_config()
  cfg.source = f"tfds:{tmp_path}"  # the README's form: the one prepared dataset is used
  src = pipeline.open_pretrain_source(cfg)
  assert len(src) > 0 and {"image", "coords", "mpp"} <= set(src[0])


# ------------------------------------------------------------------------------------------- workdirs
@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
  """A 3-step tiny pretraining run (checkpoint at 3) on one device."""
  wd = tmp_path_factory.mktemp("pre")
  train.run(small_config(total_steps=3), wd, devices=jax.devices()[:1])
  return wd


def test_resume_refuses_a_changed_shape_and_keeps_config_json(pretrain_run, tmp_path):
  before = (pretrain_run / "config.json").read_bytes()
  c = small_config(total_steps=3)
  c.heads.cls_out_dim = 64
  with pytest.raises(cli.UserError, match=r"heads\.cls_out_dim 32 -> 64.*may change only: total_steps"):
    train.run(c, pretrain_run, devices=jax.devices()[:1])
  c = small_config(total_steps=3)
  c.data.mpp_range, c.seed = (0.5, 1.0), 1  # same shapes, another run
  with pytest.raises(cli.UserError, match=r"2 config field\(s\).*data\.mpp_range \[1\.0, 2\.0\] -> \[0\.5, 1\.0\]; "
                                          r"seed 0 -> 1"):
    train.run(c, pretrain_run, devices=jax.devices()[:1])
  assert (pretrain_run / "config.json").read_bytes() == before
  from muse_jax import export  # the good run still exports
  out = export.export(pretrain_run, tmp_path / "export")
  assert (pathlib.Path(out) / "model_config.json").exists()


def test_resume_accepts_the_documented_fields(pretrain_run, tmp_path):
  import shutil
  wd = tmp_path / "copy"
  shutil.copytree(pretrain_run, wd)
  c = small_config(total_steps=4)
  c.log_every_steps, c.checkpoint_every_steps, c.keep_checkpoints = 2, 2, 5
  out = train.run(c, wd, devices=jax.devices()[:1])
  assert out["step"] == 4
  stored = json.loads((wd / "config.json").read_text())
  assert stored["total_steps"] == 4 and stored["keep_checkpoints"] == 5


def test_main_refuses_a_finetune_workdir_and_vice_versa(pretrain_run, tmp_path):
  ft = tmp_path / "ft"
  (ft / "checkpoints" / "10").mkdir(parents=True)
  (ft / "config.json").write_text(_ndc_config().to_json_best_effort())
  before = (ft / "config.json").read_bytes()
  with pytest.raises(cli.UserError, match=r"not a pretraining workdir .*it is an NDC fine-tuning workdir \(written by python -m muse_jax\.finetune\)"):
    train.run(small_config(), ft)
  assert (ft / "config.json").read_bytes() == before
  before = (pretrain_run / "config.json").read_bytes()
  with pytest.raises(cli.UserError, match=r"not an NDC fine-tuning workdir .*it is a pretraining workdir \(written by python -m muse_jax\.main\)"):
    ndc_train.run(_ndc_config(), pretrain_run)
  assert (pretrain_run / "config.json").read_bytes() == before
  from muse_jax import export
  with pytest.raises(cli.UserError, match=r"not a pretraining workdir .*it is an NDC fine-tuning workdir"):
    export.export(ft, tmp_path / "out")
  with pytest.raises(cli.UserError, match=r"no checkpoint of step 7 \(--step\).*\[3\]"):
    export.export(pretrain_run, tmp_path / "out", step=7)


def test_exports_and_bare_checkpoints_are_not_workdirs(tmp_path):
  exp = tmp_path / "exp"
  exp.mkdir()
  (exp / "model_config.json").write_text("{}")
  with pytest.raises(cli.UserError, match=r"not a\w* .*it is a backbone export"):
    train.run(small_config(), exp)
  with pytest.raises(cli.UserError, match=r"not a\w* .*it is a backbone export"):
    ndc_train.run(_ndc_config(), exp)
  bare = tmp_path / "bare"
  (bare / "checkpoints" / "3").mkdir(parents=True)
  with pytest.raises(cli.UserError, match=r"checkpoints/ without config\.json"):
    train.run(small_config(), bare)


def test_resume_of_an_older_config_accepts_its_legacy_defaults():
  stored = small_config().to_dict()
  del stored["optim"]["teacher_half_life_frac"]  # written before the field existed
  req = small_config()
  assert config_check.diff(stored, req.to_dict(), train.RESUMABLE, train.LEGACY_DEFAULTS) == []
  req.optim.teacher_half_life_frac = 0.05
  assert config_check.diff(stored, req.to_dict(), train.RESUMABLE, train.LEGACY_DEFAULTS) == [
      "optim.teacher_half_life_frac 0.0 -> 0.05"]
  # how the 3x3 convolutions are computed (rounding only) may change on a resume, e.g. a run from before the field
  del stored["model"]["conv_impl"]
  req.optim.teacher_half_life_frac = 0.0
  assert req.model.conv_impl == "auto"
  assert config_check.diff(stored, req.to_dict(), train.RESUMABLE, train.LEGACY_DEFAULTS) == []


# ------------------------------------------------------------------------------------------- failed saves
def _disk_full_at(monkeypatch, step: int):
  from orbax.checkpoint._src.path import atomicity
  orig = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == str(step):
      raise OSError(28, "No space left on device")
    return await orig(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpointer_save_failure_names_step_directory_and_cause(tmp_path, monkeypatch, async_save):
  state = {"w": np.arange(4.0, dtype=np.float32)}
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=async_save)
  ck.save(1, state)
  ck.wait()
  _disk_full_at(monkeypatch, 2)
  with pytest.raises(ckpt_lib.CheckpointSaveError,
                     match=r"step 2 failed \(.*ck\): OSError: \[Errno 28\] No space left on device;.*last good "
                           r"checkpoint: step 1"):
    ck.save(2, state)
    ck.wait()
  ck.close(raise_errors=False)
  monkeypatch.undo()
  ck = ckpt_lib.Checkpointer(tmp_path / "ck", async_save=False)
  assert ck.latest_step() == 1
  restored, _ = ck.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))
  np.testing.assert_array_equal(restored["w"], state["w"])
  ck.close()


def test_background_save_failure_stops_training_at_once(tmp_path, monkeypatch, caplog):
  c = small_config(total_steps=12)
  c.async_checkpointing = True
  _disk_full_at(monkeypatch, 6)
  with pytest.raises(ckpt_lib.CheckpointSaveError, match=rf"step 6 failed \({tmp_path}/checkpoints\): OSError: "
                                                         r".*No space left.*last good checkpoint: step 3"):
    train.run(c, tmp_path, devices=jax.devices()[:1])
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  # Stopped as soon as the failure was known (polled every step; at the latest when the next save at 9 waits for
  # it), long before the end; nothing after step 3 was saved.
  assert rows[-1]["step"] <= 9
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [3]
  assert not [r for r in caplog.records if "orbax" in r.pathname and r.levelname == "ERROR"]
  monkeypatch.undo()
  out = train.run(c, tmp_path, devices=jax.devices()[:1])  # the last good checkpoint resumes
  assert out["step"] == 12


# ------------------------------------------------------------------------------------------- CLIs
def test_main_cli_bad_value_is_one_line_exit_2(tmp_path):
  line = _one_error_line(_cli("muse_jax.main", "--config", "configs/pretrain.py:tiny", "--workdir",
                              str(tmp_path / "wd"), "--config.data.mpp_range=foo"))
  assert "config.data.mpp_range" in line
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("variant", ["vit_s16", "small"])
def test_main_cli_without_data_source_is_one_line_exit_2(variant, tmp_path):
  # Only `tiny` names the bundled sample; a full-size config without --config.data.source must not pretrain on it.
  line = _one_error_line(_cli("muse_jax.main", "--config", f"configs/pretrain.py:{variant}", "--workdir",
                              str(tmp_path / "wd")))
  assert "config.data.source" in line and "bundled" in line
  assert not (tmp_path / "wd").exists()


def test_main_cli_non_finite_loss_is_one_line_exit_2(tmp_path):
  code = textwrap.dedent(f"""
      import sys
      from muse_jax import cli, main
      from muse_jax.pretrain import train
      def diverge(*args, **kwargs):
        raise train.NonFiniteLossError(7, float("nan"), 5)
      train.run = diverge
      sys.argv = ["main", "--config", "configs/pretrain.py:tiny", "--workdir", {str(tmp_path / "wd")!r}]
      cli.run_absl(main.main)
      """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
  line = _one_error_line(proc)
  assert "non-finite loss (nan) at step 7" in line and "step 5" in line and "base_lr" in line


def test_finetune_cli_without_data_dir_is_one_line_exit_2(tmp_path):
  line = _one_error_line(_cli("muse_jax.finetune", "--config", "configs/finetune_ndc.py:tiny", "--workdir",
                              str(tmp_path / "wd")))
  assert "config.data.dir" in line and "bundled" in line
  assert not (tmp_path / "wd").exists()


def test_export_cli_on_a_finetune_workdir_is_one_line_exit_2(tmp_path):
  ft = tmp_path / "ft"
  ft.mkdir()
  (ft / "config.json").write_text(_ndc_config().to_json_best_effort())
  line = _one_error_line(_cli("muse_jax.export", "--workdir", str(ft), "--out", str(tmp_path / "out")))
  assert "NDC fine-tuning workdir" in line


_PREEMPTED = """
import sys
from muse_jax import cli, main
from muse_jax.pretrain import train
preempted = sys.argv.pop() == "1"
train.run = lambda config, workdir: {"step": 2, "preempted": preempted, "health": {"line": "health: ok"}}
cli.run_absl(main.main)
"""


@pytest.mark.parametrize("preempted,code", [(True, 75), (False, 0)])
def test_main_exits_75_when_preempted(tmp_path, preempted, code):
  proc = subprocess.run([sys.executable, "-c", _PREEMPTED, "--config", "configs/pretrain.py:tiny", "--workdir",
                         str(tmp_path), "1" if preempted else "0"], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)))
  assert proc.returncode == code == (cli.EXIT_PREEMPTED if preempted else cli.EXIT_OK), proc.stderr[-3000:]
