"""Tests of the ahead-of-time TPU compilation tool (`muse_jax.tools.aot`) and the chip table.

The TPU tests need the optional libtpu package (`requirements-tpu.txt`) and are skipped without it. They compile
for compile-only TPU devices in this (CPU) process: the CPU backend stays the default one.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import jax
import pytest

from muse_jax.tools import aot
from muse_jax.tools import tpu_chips

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -r requirements-tpu.txt)")


def test_chip_table_has_sources_and_sane_numbers():
  for name, chip in tpu_chips.CHIPS.items():
    assert chip.name == name
    assert chip.source.startswith("https://cloud.google.com/tpu/docs/")
    assert "as published by Google Cloud TPU documentation" in chip.note
    assert 100e12 < chip.peak_bf16_flops < 1000e12
    assert 500e9 < chip.hbm_bandwidth < 3000e9
    # The compiler's usable HBM is within a few percent of the published capacity.
    assert 0.9 < chip.compiler_hbm_bytes / chip.hbm_bytes < 1.1
  assert tpu_chips.chip_for_topology("v5p:2x2x4").peak_bf16_flops == 459e12
  assert tpu_chips.chip_for_topology("v5litepod:2x4").name == "v5e"
  assert tpu_chips.chip_for_device_kind("TPU v5 lite").name == "v5e"
  assert tpu_chips.topology_chip_count("v5p:2x2x4") == 16
  with pytest.raises(ValueError, match="v7x"):
    tpu_chips.chip_for_topology("v7x:2x2")
  with pytest.raises(ValueError, match="generation:chip grid"):
    tpu_chips.chip_for_topology("v5p-8")


def _fake_step(limit, bytes_per_sample=1000, fixed=5000):
  """A `try_batch` whose memory is affine in the batch and that fits up to `limit`."""
  calls = []

  def try_batch(b):
    calls.append(b)
    if b > limit:
      return None
    return aot.CompileResult(fixed + bytes_per_sample * b, 0, 0, 0, 0, 0.0, 0.0, 0.0, None, 0.0)
  return try_batch, calls


def test_find_max_batch_bisection_brackets_the_limit():
  try_batch, calls = _fake_step(37)
  best, res, probes = aot.find_max_batch(try_batch, start=8)
  assert best == 37 and res.argument_bytes == 5000 + 37000
  assert calls[:3] == [8, 16, 32] and 64 in calls and len(calls) <= 3 + 1 + 5
  assert aot._bracketed(probes, best, 1)  # pylint: disable=protected-access
  best, _, _ = aot.find_max_batch(_fake_step(37)[0], start=8, granularity=8)
  assert best == 32
  best, res, _ = aot.find_max_batch(lambda b: None, start=4)
  assert best == 0 and res is None
  best, _, probes = aot.find_max_batch(_fake_step(37)[0], start=8, max_compiles=4)
  assert best == 32 and not aot._bracketed(probes, best, 1)  # pylint: disable=protected-access
  best, _, _ = aot.find_max_batch(_fake_step(5)[0], start=16)  # the start itself does not fit
  assert best == 5


def test_find_max_batch_uses_the_memory_line_to_save_compiles():
  # Memory 5000 + 1000 b bytes, capacity 300_000: the line predicts 295 after probes 8 and 16.
  try_batch, calls = _fake_step(295)
  best, _, probes = aot.find_max_batch(try_batch, start=8, capacity=300_000)
  assert best == 295 and calls == [8, 16, 295, 296]
  assert aot._bracketed(probes, best, 1)  # pylint: disable=protected-access
  # The compiler gives up earlier than the line says (e.g. fragmentation): still bracketed by compiles.
  try_batch, calls = _fake_step(250)
  best, _, probes = aot.find_max_batch(try_batch, start=8, capacity=300_000, max_compiles=20)
  assert best == 250 and aot._bracketed(probes, best, 1)  # pylint: disable=protected-access
  assert len(calls) <= 12


def test_find_max_batch_from_one_compile_and_known_probes():
  """One fitting compile predicts the next probe (temporaries per sample); earlier compiles are reused."""
  cap = 300_000
  calls = []

  def try_batch(b):  # 5000 fixed argument bytes; temporaries 2000 + 1000 b; fits while the total is <= cap
    calls.append(b)
    r = aot.CompileResult(5000, 0, 0, 2000 + 1000 * b, 0, 0.0, 0.0, 0.0, None, 0.0)
    return r if r.total_bytes <= cap else None
  best, _, probes = aot.find_max_batch(try_batch, start=8, capacity=cap, one_point=True)
  # 8 -> one-point line: 8 * (300000 - 5000) / 10000 = 236 (low, as documented) -> two-point line: 293 -> 294.
  assert best == 293 and calls == [8, 236, 293, 294] and aot._bracketed(probes, best, 1)  # pylint: disable=protected-access
  calls.clear()
  known = {8: try_batch(8), 236: try_batch(236)}
  calls.clear()
  best, _, _ = aot.find_max_batch(try_batch, start=8, capacity=cap, known=known)
  assert best == 293 and calls == [293, 294]
  known = {8: known[8], 293: try_batch(293), 294: try_batch(294)}
  calls.clear()
  best, _, _ = aot.find_max_batch(try_batch, start=8, capacity=cap, known=known)
  assert best == 293 and calls == []  # already bracketed: nothing to compile


def test_find_max_batch_steps_up_from_a_fit_near_the_limit():
  """Memory falling with the batch near the limit (the compiler recomputes): one step up, not a doubling."""
  cap = 100_000

  def res(total):
    return aot.CompileResult(total, 0, 0, 0, 0, 0.0, 0.0, 0.0, None, 0.0)
  calls = []

  def try_batch(b):
    calls.append(b)
    return res(95_000) if b <= 200 else None
  known = {32: res(20_000), 184: res(99_000), 192: res(95_000)}  # slope <= 0 between the last two
  best, _, probes = aot.find_max_batch(try_batch, start=32, granularity=8, capacity=cap, known=known)
  # Fits near the limit at 184 and 192: the step doubles to 16 (208 does not fit), then bisection (200 fits).
  assert calls == [208, 200] and best == 200 and aot._bracketed(probes, best, 8)  # pylint: disable=protected-access
  # The compiler keeps fitting by recomputing: the steps double (192 -> 208 -> 240 -> 304), then bisection.
  calls.clear()

  def recomputes(b):
    calls.append(b)
    return res(95_000) if b <= 240 else None
  best, _, probes = aot.find_max_batch(recomputes, start=32, granularity=8, capacity=cap, known=dict(known))
  assert calls == [208, 240, 304, 272, 256, 248] and best == 240
  assert aot._bracketed(probes, best, 8)  # pylint: disable=protected-access
  # Memory nearly flat near the limit: the line points far away (208 + 5650 / 6.25 = 1112); a step up comes first,
  # and with a far non-fit known the step, not the midpoint, is tried.
  calls.clear()
  flat = {192: res(92_000), 200: res(94_300), 208: res(94_350)}
  best, _, probes = aot.find_max_batch(recomputes, start=32, granularity=8, capacity=cap, known=dict(flat))
  assert calls[0] == 224 and best == 240 and aot._bracketed(probes, best, 8)  # pylint: disable=protected-access
  calls.clear()
  best, _, probes = aot.find_max_batch(recomputes, start=32, granularity=8, capacity=cap,
                                       known={**flat, 480: None}, max_compiles=1)
  assert calls == [224]
  # Far from the limit the same flat line still doubles.
  calls.clear()
  best, _, _ = aot.find_max_batch(try_batch, start=32, granularity=8, capacity=10 * cap, max_compiles=1,
                                  known={32: res(20_000), 64: res(20_000)})
  assert calls == [128]


def test_core_package_does_not_load_libtpu():
  """No module but the aot tool mentions libtpu, and using the core (CPU) never loads the libtpu shared library.

  (`import jax` itself imports libtpu's small Python wrapper to look up its path when the package is installed;
  the 700 MB library is only loaded when a TPU topology is requested.)
  """
  import pathlib  # pylint: disable=import-outside-toplevel
  pkg = pathlib.Path(aot.__file__).resolve().parents[1]
  users = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if "libtpu" in p.read_text())
  # host_malloc only asks whether the package is installed (`importlib.util.find_spec`, which imports nothing).
  assert users == ["host_malloc.py", "tools/aot.py", "tools/tpu_chips.py"], users
  code = ("import jax, jax.numpy as jnp, muse_jax.pretrain.step, muse_jax.models, muse_jax.tools.aot; "
          "jnp.ones(3).sum().block_until_ready(); print('libtpu.so' in open('/proc/self/maps').read())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "", "PYTHONPATH": str(pkg.parent)})
  assert out.stdout.strip() == "False", out.stderr[-2000:]


@pytest.mark.parametrize("variant", ["tiny", "vit_s16", "vit_b16", "r50", "lfov_vit_b16", "study", "small",
                                     "small_sk"])
def test_every_recipe_is_compilable_without_a_data_source(variant):
  # The full-size recipes start with `data.source` unset (a run must name its data); compiling reads no data, so
  # `.ci/aot_check.sh`'s `--config configs/pretrain.py:vit_s16` must not need one.
  cfg = aot.load_config(f"configs/pretrain.py:{variant}", [])
  assert (cfg.data.source == "") == (variant != "tiny")
  out = aot.compile_config(cfg, n_devices=4, per_device_batch=2)
  assert out.data_source == "synthetic" and out.batch_size == 8
  assert cfg.data_source == "pipeline"  # the caller's config is not changed


def test_trainer_batch_check_names_the_field():
  cfg = aot.load_config("configs/pretrain.py:tiny", ["batch_size=6"])
  with pytest.raises(ValueError, match=r"config.batch_size=6 must be a positive multiple"):
    aot.pretrain_spec(cfg, jax.devices()[:4])


@needs_libtpu
def test_wrong_sharding_fails_at_compile_time_with_a_clear_message():
  devices = aot.topology_devices("v5p:2x2x1")
  assert len(devices) == 4 and devices[0].platform == "tpu"
  assert jax.default_backend() == "cpu"  # the TPU topology does not replace the default backend
  cfg = aot.load_config("configs/pretrain.py:tiny", ["batch_size=6"])
  spec = aot.pretrain_spec(cfg, devices, check_batch=False)  # bypass the trainer's check: the compiler must object
  with pytest.raises(aot.AotError, match=r"(?s)global batch 6.*does not divide.*partitioned 4 times, but the dimension size is 6"):
    aot.compile_spec(spec)


@needs_libtpu
def test_flop_counts_agree_op_by_op():
  """Where the TPU and CPU compilers count FLOPs the same and where they do not (explains the step-level gap).

  Matmuls, convolutions, exact GELU, layer norm, image normalisation and the align-corners resize are counted
  identically; softmax-type reductions count 25% more elementwise FLOPs on TPU; the nucleus sampler's gather
  counts several times more on CPU.
  """
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from muse_jax import ops  # pylint: disable=import-outside-toplevel

  x = jax.ShapeDtypeStruct((64, 256), jnp.float32)
  w = jax.ShapeDtypeStruct((256, 512), jnp.float32)
  img = jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32)
  k = jax.ShapeDtypeStruct((16, 16, 3, 64), jnp.float32)
  conv = lambda i, kk: jax.lax.conv_general_dilated(i, kk, (16, 16), "VALID",  # noqa: E731
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cases = {  # name: (fn, args, sharded argnums, expected TPU/CPU ratio)
      "matmul_grad": (jax.grad(lambda a, b: jnp.sin(a @ b).sum(), argnums=(0, 1)), (x, w), (0,), 1.0),
      "conv_grad": (jax.grad(lambda i, kk: conv(i, kk).sum(), argnums=1), (img, k), (0,), 1.0),
      "gelu_erf": (lambda a: jax.nn.gelu(a, approximate=False), (x,), (0,), 1.0),
      "layernorm": (lambda a: (a - a.mean(-1, keepdims=True)) * jax.lax.rsqrt(a.var(-1, keepdims=True) + 1e-6),
                    (x,), (0,), 1.0),
      "resize": (lambda f: ops.resize_bilinear_ac(f, (32, 32)), (img,), (0,), 1.0),
      "log_softmax": (lambda a: jax.nn.log_softmax(a, -1), (x,), (0,), 1.25),
  }
  devs = {"cpu": jax.devices()[:4], "tpu": aot.topology_devices("v5p:2x2x1")}
  for name, (fn, args, sharded, want) in cases.items():
    flops = {}
    for plat, d in devs.items():
      mesh = Mesh(np.array(d), ("d",))
      shs = tuple(NamedSharding(mesh, P("d") if i in sharded else P()) for i in range(len(args)))
      flops[plat] = jax.jit(fn, in_shardings=shs).lower(*args).compile().cost_analysis()["flops"]
    assert flops["tpu"] / flops["cpu"] == pytest.approx(want, rel=0.01), (name, flops)


@needs_libtpu
@pytest.mark.slow
def test_tiny_step_flops_on_tpu_match_cpu():
  """FLOPs per device of the tiny pretraining step: TPU compile vs CPU compile of the same step on a 4-device mesh.

  Measured: TPU / CPU = 1.137 (6.16e8 vs 5.41e8). The tiny model's matmuls are small (embed 64), so its FLOPs are
  dominated by the DINO/NuLo softmaxes over 256/128 prototypes for every view pair, which the TPU compiler counts
  25% higher (see `test_flop_counts_agree_op_by_op`); for ViT-S/B the matmuls dominate. The two compiles run in
  two threads (XLA releases the GIL) to halve the wall time.
  """
  import concurrent.futures as cf  # pylint: disable=import-outside-toplevel
  cfg = aot.load_config("configs/pretrain.py:tiny", [])
  specs = {"tpu": aot.pretrain_spec(cfg, aot.topology_devices("v5p:2x2x1")),
           "cpu": aot.pretrain_spec(cfg, jax.devices()[:4])}
  with cf.ThreadPoolExecutor(2) as ex:
    res = dict(zip(specs, ex.map(lambda s: aot.compile_spec(s)[1], specs.values())))
  tpu, cpu = res["tpu"], res["cpu"]
  assert cpu.flops > 1e8
  assert 1.0 <= tpu.flops / cpu.flops < 1.2, (tpu.flops, cpu.flops)
  # Per-chip memory is small and fits with a large margin.
  assert tpu.total_bytes < 1 * 2**30


# ---------------------------------------------------------------------------------------------- NDC steps (finetune,
# predict): the builders `muse_jax.ndc.train.abstract_step` / `muse_jax.ndc.infer.abstract_forward`.


def _rebatch(tree, batch):
  """The same abstract arguments with leading (batch) dimension `batch`, shardings kept."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch,) + x.shape[1:], x.dtype, sharding=x.sharding), tree)


def _ndc_specs(devices, per_device_batch=1):
  cfg = aot.load_config("configs/finetune_ndc.py:tiny", ["train.max_points=64"])
  return {"finetune": aot.finetune_spec(cfg, devices, per_device_batch),
          "predict": aot.predict_spec(cfg, devices, per_device_batch)}


def test_ndc_steps_compile_on_a_cpu_mesh():
  """The tiny fine-tuning step (with its Hungarian host callback) and the inference forward compile for a 4-device
  mesh; batch fields and meshes follow the trainer's and the Predictor's rules."""
  devices = jax.devices()[:4]
  specs = _ndc_specs(devices, per_device_batch=2)
  ft, pr = specs["finetune"], specs["predict"]
  assert ft.global_batch == 8 and dict(ft.mesh.shape) == {"data": 4} and ft.per_device_batch == 2
  assert pr.global_batch == 8 and dict(pr.mesh.shape) == {"data": 4}
  state, batch = ft.args
  assert batch["images"].shape == (8, 256, 256, 3) and batch["coords"].shape == (8, 64, 2)
  assert batch["images"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert state["step"].sharding.spec == jax.sharding.PartitionSpec()
  assert pr.args[1].shape == (8, 256, 256, 3)
  for spec in (ft, pr):
    _, res = aot.compile_spec(spec)
    assert res.flops > 1e8 and 0 < res.total_bytes < 2**30, (spec.name, res)
  # The fine-tuning step donates its state: outputs alias the state buffers.
  assert aot.compile_spec(ft)[1].alias_bytes > 0
  # The trainer's mesh rule: a batch of 6 on 4 devices runs on a data mesh of 2 (the devices that divide it).
  cfg = aot.load_config("configs/finetune_ndc.py:tiny", ["train.batch_size=6"])
  from muse_jax.ndc import train as ndc_train  # pylint: disable=import-outside-toplevel
  assert dict(ndc_train.abstract_step(cfg, devices)["mesh"].shape) == {"data": 2}


def test_ndc_wrong_sharding_fails_with_a_clear_message():
  """A batch of 6 forced onto the 4-device batch sharding fails before anything runs, naming the shapes."""
  for name, spec in _ndc_specs(jax.devices()[:4]).items():
    args = (spec.args[0], _rebatch(spec.args[1], 6))
    bad = aot.StepSpec(name, spec.jitted, args, spec.mesh, 6, 1, spec.description)
    with pytest.raises(aot.AotError, match=r"(?s)global batch 6.*does not divide its shape \(args\[1\].*\(6, "
                       r".*partitioned 4 times, but the dimension size is 6"):
      aot.compile_spec(bad)


@needs_libtpu
@pytest.mark.slow
def test_ndc_steps_compile_for_tpu_with_the_matching_callback():
  """Both NDC steps compile for v5p:2x2x1. The Hungarian matching (`jax.pure_callback`) lowers for TPU to
  device-to-host `send`s of its 6 inputs and one host-to-device `recv` of the assignment (the host-callback
  mechanism TPUs run), so the compiled program includes it; the wrong-sharding check holds on TPU too."""
  import re  # pylint: disable=import-outside-toplevel
  devices = aot.topology_devices("v5p:2x2x1")
  specs = _ndc_specs(devices)
  text = specs["finetune"].jitted.lower(*specs["finetune"].args).as_text()
  assert len(re.findall(r"stablehlo\.send", text)) == 6 and len(re.findall(r"stablehlo\.recv", text)) == 1
  for spec in specs.values():
    _, res = aot.compile_spec(spec)
    assert res.flops > 1e8 and res.total_bytes < 2**30 and aot.fits(res, tpu_chips.CHIPS["v5p"])
    assert res.optimal_seconds and res.optimal_seconds > 0  # libtpu's cost model ran
  spec = specs["predict"]
  bad = aot.StepSpec("predict", spec.jitted, (spec.args[0], _rebatch(spec.args[1], 6)), spec.mesh, 6, 1, "")
  with pytest.raises(aot.AotError, match=r"(?s)global batch 6.*does not divide"):
    aot.compile_spec(bad)


def test_table_driver_reads_reports_and_renders_only_compiled_numbers(tmp_path):
  """`experiments/aot_table.py`: a report's `json:` line (and an older text-only report) become result records; the
  table bolds a batch only when a compile one step above did not fit, and says "not compiled" for empty cells."""
  from experiments import aot_table  # pylint: disable=import-outside-toplevel
  chip = tpu_chips.CHIPS["v5p"]
  res = aot.CompileResult(2**30, 0, 0, 3 * 2**30, 2**20, 1e12, 1e11, 0.0, 0.05, 1.0)
  rep = {"description": "pretrain vit_s16: ...", "topology": "v5p:2x2x1", "chip": chip, "num_chips": 4,
         "step": "pretrain", "variant": "vit_s16", "mesh": {"data": 4, "fsdp": 1}, "per_device_batch": 32,
         "global_batch": 128, "images_per_sample": 10, "result": res, "fits": True,
         "roofline": aot.roofline(res, chip, 128)}
  text = aot.format_report(rep)
  rec = aot_table.parse_report(text)
  assert rec["batch"] == 32 and rec["total_bytes"] == res.total_bytes and rec["variant"] == "vit_s16"
  old = aot_table.parse_report(text.rsplit("\njson:", 1)[0])  # a report without the json line: rounded text
  assert old["batch"] == 32 and abs(old["total_bytes"] - res.total_bytes) < 0.02 * 2**30 and old["rounded"]
  log = tmp_path / "r.log"
  log.write_text(text)
  results = str(tmp_path / "res.jsonl")
  aot_table.ingest([str(log)], results)
  aot_table.ingest([str(log)], results)  # once per file
  recs = aot_table.load_results(results)
  assert len(recs) == 1 and recs[0]["fits"] and recs[0]["cell"] == "pretrain|vit_s16|v5p:2x2x1|fsdp1"
  md = aot_table.render(recs, ["vit_s16"], ["v5p:2x2x1", "v5p:2x2x4"], "pretrain", 1, 8, "cmd", "time budget")
  assert "| >= 32 |" in md and "an estimate, not compiled" in md and "not compiled (time budget)" in md
  assert "**" not in md  # nothing is bracketed by compiles yet
  recs.append(dict(recs[0], batch=40, fits=False))
  md = aot_table.render(recs, ["vit_s16"], ["v5p:2x2x1"], "pretrain", 1, 8, "cmd", "time budget")
  assert "| **32** |" in md and "compiled: 32 fits, 40 does not" in md
  assert "recomputes" not in md
  # Near the limit the compiler rematerialises: more FLOPs per sample, memory flat. Say so; no affine estimate.
  remat = [dict(recs[0], batch=16, flops=0.5e12), dict(recs[0], batch=24, flops=0.8e12)]
  md = aot_table.render(remat, ["vit_s16"], ["v5p:2x2x1"], "pretrain", 1, 8, "cmd", "time budget")
  assert "FLOPs per sample +6.7% over batch 16" in md and "predicts" not in md and "| >= 24 |" in md
  # An affine estimate never exceeds a compiled non-fit.
  line = [dict(recs[0], batch=32, total_bytes=28 * 2**30), dict(recs[0], batch=72, total_bytes=62 * 2**30),
          dict(recs[0], batch=112, fits=False)]
  md = aot_table.render(line, ["vit_s16"], ["v5p:2x2x1"], "pretrain", 1, 8, "cmd", "time budget")
  assert "| >= 72 |" in md and "predicts ~104 " in md
  # A largest fit within 10% of the limit with a nearly flat line (it would point at 472): no affine estimate.
  flat = [dict(recs[0], batch=200, total_bytes=int(94.31 * 2**30)),
          dict(recs[0], batch=208, total_bytes=int(94.35 * 2**30)), dict(recs[0], batch=480, fits=False)]
  md = aot_table.render(flat, ["vit_s16"], ["v5p:2x2x1"], "pretrain", 1, 8, "cmd", "time budget")
  assert "| >= 208 |" in md and "predicts" not in md and "within 10% of the limit" in md
  md = aot_table.render(flat + [dict(recs[0], batch=216, fits=False)], ["vit_s16"], ["v5p:2x2x1"], "pretrain", 1, 8,
                        "cmd", "time budget")
  assert "| **208** |" in md and "within 10%" not in md  # bracketed: no estimate is wanted, so no note
  # The NDC tables say what one sample is: a fine-tuning field or an inference tile, not a pretraining region.
  ndc = [dict(r, step="predict", cell=r["cell"].replace("pretrain", "predict")) for r in recs[:2]]
  md = aot_table.render(ndc, ["vit_s16"], ["v5p:2x2x1"], "predict", 1, 8, "cmd", "time budget")
  assert "| **32** |" in md and "one sample = one inference tile" in md and "region" not in md


def test_table_driver_stop_at_is_the_next_such_time_of_day():
  """`--stop_at` / `study.py --deadline` HH:MM given before midnight for a time after it means tomorrow."""
  import datetime as dt  # pylint: disable=import-outside-toplevel
  from experiments import clock  # pylint: disable=import-outside-toplevel
  now = dt.datetime(2026, 11, 30, 22, 40, tzinfo=dt.timezone.utc)
  assert clock.next_utc("23:10", now=now) == dt.datetime(2026, 11, 30, 23, 10, tzinfo=dt.timezone.utc).timestamp()
  assert clock.next_utc("01:10", now=now) == dt.datetime(2026, 12, 1, 1, 10, tzinfo=dt.timezone.utc).timestamp()
  with pytest.raises(SystemExit, match="--stop_at"):
    clock.next_utc("25:00", now=now)
  with pytest.raises(SystemExit, match="--deadline"):
    clock.next_utc("9.30", "--deadline", now)


def test_table_driver_workers_die_with_the_driver(tmp_path):
  """A killed `aot_table.py` leaves no worker compiling on: the worker initializer ties the worker to the driver."""
  import os  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  driver = tmp_path / "driver.py"
  driver.write_text(
      "import concurrent.futures as cf, multiprocessing as mp, os, sys, time\n"
      f"sys.path.insert(0, {root!r})\n"
      "from experiments import aot_table\n"
      "if __name__ == '__main__':\n"
      "  with cf.ProcessPoolExecutor(1, mp_context=mp.get_context('spawn'), initializer=aot_table.die_with_parent,\n"
      "                              initargs=(os.getpid(),)) as ex:\n"
      "    print(ex.submit(os.getpid).result(), flush=True)\n"
      "    ex.submit(time.sleep, 120).result()\n")
  proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": root})
  worker = int(proc.stdout.readline())
  os.kill(worker, 0)  # alive while the driver is
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  deadline = time.time() + 20
  while time.time() < deadline:
    try:
      os.kill(worker, 0)
      with open(f"/proc/{worker}/stat") as f:
        if f.read().split(")")[-1].split()[0] == "Z":  # a zombie is dead (its new parent reaps it)
          break
    except (ProcessLookupError, FileNotFoundError):
      break
    time.sleep(0.2)
  else:
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived the killed driver")
