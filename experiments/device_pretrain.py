r"""One prepared accelerator run: a time-boxed MUSE pretraining, export, kNN / linear evaluation, one JSON of figures.

  python -m experiments.device_pretrain --minutes 6 --data 'brca:/data/BRCA-M2C|folder:runs/study21/slide_regions' \
      --region_mpp 0.499 --eval_data /data/BRCA-M2C --out runs/device/result.json          # vit_s16, bf16
  python -m experiments.device_pretrain --config tiny --dtype float32 --minutes 0.2 --data bundled \
      --eval_data bundled --out /tmp/dev.json                                             # the CPU test
  bash experiments/device_pretrain.sh [MINUTES]                                          # the same, on a lent GPU

What it does, in order (every number lands in `--out`):
1. The config: `configs/pretrain.py:<--config>` (default the real `vit_s16`) in `--dtype` (default bfloat16), the
   global batch `--batch` (default 64 per device), data `--data` (pipeline sources; BRCA-M2C train + val and slide
   regions, never test), and the run-length-aware schedules of issue #21 (warm-ups and last-layer freeze as fractions
   of the run, teacher momentum from a half-life of `--half_life_frac` of the run), so a few-minute run gets a
   teacher that moves. DINO's epoch-based values would keep the teacher at its random init in such a run.
2. Calibration: the jitted step is compiled once and timed (median of `--calib_steps` steps after a warm-up), which
   gives the step time, XLA's FLOPs per step, and from them the number of steps that fit `--minutes`.
3. The pretraining itself (`muse_jax.pretrain.train.run` with that many steps and `--minutes` as a hard budget), with
   the run-health monitor (collapse diagnostics) on.
4. Export of the teacher; kNN and linear probe (`muse_jax.evaluate` protocols, mpp 0.5, 224 px) of the export, of
   the same architecture at random init and of the raw-pixel baseline, on `--eval_data`.

The JSON: device (platform, kind, count), config summary, steps done, step time, throughput (regions/s, views/s),
FLOPs per step, achieved FLOP/s, MFU against the chip's published dense peak in the run's dtype (and against a matmul
measured in the same run), health summary, the evaluation table, wall time of each phase.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Sequence

# Published dense peaks per chip (FLOP/s), bf16 and float32 (non-tensor-core for NVIDIA). Sources: NVIDIA H100 /
# H200 / A100 datasheets (SXM, dense, without sparsity); TPUs from muse_jax.tools.tpu_chips.
GPU_PEAKS = {
    "H100": {"bfloat16": 989.4e12, "float32": 66.9e12},
    "H200": {"bfloat16": 989.4e12, "float32": 66.9e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


def published_peak(device_kind: str, dtype: str) -> float | None:
  """The chip's published dense peak FLOP/s for `dtype`, or None (CPUs, unknown chips)."""
  for name, peaks in GPU_PEAKS.items():
    if name in device_kind:
      return peaks.get(dtype)
  try:
    from muse_jax.tools import tpu_chips  # pylint: disable=import-outside-toplevel
    chip = tpu_chips.chip_for_device_kind(device_kind)
    return chip.peak_bf16_flops if dtype == "bfloat16" else chip.peak_bf16_flops / 2
  except Exception:  # pylint: disable=broad-except
    return None


def build_config(args) -> Any:
  """The pretraining config of the run (before the step count is known)."""
  import jax  # pylint: disable=import-outside-toplevel
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  c = pretrain.get_config(args.config)
  c.model.dtype = args.dtype
  c.batch_size = args.batch or 64 * jax.device_count()
  c.data.source = args.data
  if args.region_mpp:
    c.data.region_mpp = args.region_mpp
  c.data.num_workers = args.workers
  c.optim.warmup_frac = 0.1
  c.optim.warmup_teacher_temp_frac = 0.3
  c.optim.freeze_last_layer_frac = 0.02
  c.optim.teacher_half_life_frac = args.half_life_frac
  c.log_every_steps = args.log_every
  c.checkpoint_every_steps = 10**9  # saved at the end (and on SIGTERM) only
  c.progress_bar = False
  c.seed = args.seed
  return c


def calibrate(config, steps: int) -> dict[str, float]:
  """Compiles the step once and times it: median seconds per step and XLA FLOPs per step."""
  import jax  # pylint: disable=import-outside-toplevel
  from muse_jax.pretrain import train  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  s = train.setup(config)
  state = s["create_state"](s["init_rng"])
  batches = [train._global_batch(next(s["data_iter"]), s["batch_sharding"])  # pylint: disable=protected-access
             for _ in range(2)]
  compiled = s["jit_step"].lower(state, batches[0], s["step_rng"]).compile()
  compile_s = time.perf_counter() - t0
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  flops = float((ca or {}).get("flops", float("nan")))
  state, m = compiled(state, batches[0], s["step_rng"])  # warm-up
  jax.block_until_ready(m)
  times = []
  for i in range(max(steps, 1)):
    t = time.perf_counter()
    state, m = compiled(state, batches[i % 2], s["step_rng"])
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return {"step_s": statistics.median(times), "flops_per_step": flops, "setup_and_compile_s": compile_s}


def matmul_peak(dtype: str, n: int = 4096, repeats: int = 5) -> float:
  """FLOP/s of an n^3 matmul in `dtype` on the default device, measured now."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a = jnp.ones((n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    ts.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / statistics.median(ts)


def evaluate(export_dir: str, model_name: str, data_dir: str, seed: int, linear_epochs: int) -> dict[str, Any]:
  """kNN + linear (mpp 0.5, 224 px) of the export, random init of the same model and raw pixels."""
  from muse_jax.evaluation import runner  # pylint: disable=import-outside-toplevel
  out = {}
  for label, source in (("pretrained", export_dir), ("random_init", f"random:{model_name}"), ("raw_pixels", "raw:16")):
    cfg = runner.default_config()
    cfg.backbone, cfg.backbone_seed, cfg.data_dir = source, seed, data_dir
    cfg.protocols, cfg.linear_epochs, cfg.progress = "knn,linear", linear_epochs, False
    t0 = time.perf_counter()
    res = runner.run(cfg, None)
    by = {r["protocol"]: r["result"] for r in res["rows"]}
    k, lin = by["knn"], by["linear"]
    out[label] = {"source": source, "knn_acc_val_k": 100 * k["honest"]["accuracy"],
                  "knn_f1_val_k": 100 * k["honest"]["metrics"]["macro_f1"], "knn_k": k["honest"]["k"],
                  "knn_acc_best_k": 100 * k["official"]["accuracy"],
                  "linear_acc": 100 * lin["accuracy"], "linear_f1": 100 * lin["metrics"]["macro_f1"],
                  "seconds": time.perf_counter() - t0}
  return out


def run(args) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  from muse_jax import export as export_lib  # pylint: disable=import-outside-toplevel
  from muse_jax.pretrain import train  # pylint: disable=import-outside-toplevel
  t_all = time.perf_counter()
  dev = jax.devices()[0]
  result: dict[str, Any] = {"device": {"platform": dev.platform, "kind": dev.device_kind,
                                       "count": jax.device_count()},
                            "args": vars(args)}
  config = build_config(args)
  cal = calibrate(config, args.calib_steps)
  budget_s = 60.0 * args.minutes
  steps = max(int(budget_s / cal["step_s"]), args.min_steps)
  config.total_steps = steps
  config.steps_per_epoch = steps
  result["calibration"] = cal
  wd = pathlib.Path(args.workdir)
  t0 = time.perf_counter()
  out = train.run(config, wd, time_budget_s=budget_s)
  train_s = time.perf_counter() - t0
  rows = [json.loads(x) for x in open(wd / train.METRICS_FILE) if x.strip()]
  steady = [r for r in rows if r["step"] > config.log_every_steps]  # the first interval holds the compile
  regions_per_s = statistics.median([r["images_per_s"] for r in steady]) if steady else float("nan")
  step_s = config.batch_size / regions_per_s if regions_per_s == regions_per_s else cal["step_s"]
  achieved = cal["flops_per_step"] / step_s
  peak = published_peak(dev.device_kind, args.dtype)
  measured_peak = matmul_peak(args.dtype, n=args.matmul_n)
  result["config"] = {"variant": args.config, "model": config.model.name, "dtype": args.dtype,
                      "global_batch": config.batch_size, "views": f"{config.data.n_global}x{config.data.global_size}"
                      f" + {config.data.n_local}x{config.data.local_size}", "total_steps": steps,
                      "data": args.data, "schedule": {k: float(config.optim[k]) for k in (
                          "warmup_frac", "warmup_teacher_temp_frac", "freeze_last_layer_frac",
                          "teacher_half_life_frac", "base_lr")}}
  result["train"] = {"steps_done": out["step"], "seconds": train_s, "regions_per_s": regions_per_s,
                     "views_per_s": regions_per_s * (config.data.n_global + config.data.n_local),
                     "step_s": step_s, "flops_per_step": cal["flops_per_step"], "achieved_flops": achieved,
                     "published_peak_flops": peak, "mfu": (achieved / peak) if peak else None,
                     "matmul_peak_measured": measured_peak, "fraction_of_measured_matmul": achieved / measured_peak,
                     "final_loss": out["last_metrics"].get("loss"), "preempted": out["preempted"]}
  result["health"] = {k: out["health"][k] for k in ("healthy", "collapsed_now", "line", "events")}
  export_dir = str(wd / "export")
  export_lib.export(wd, export_dir)
  result["eval"] = evaluate(export_dir, config.model.name, args.eval_data, args.seed, args.linear_epochs)
  result["wall_s"] = time.perf_counter() - t_all
  return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.device_pretrain", description=__doc__.splitlines()[0])
  p.add_argument("--config", default="vit_s16", help="configs/pretrain.py variant (vit_s16; tiny for the CPU test)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--minutes", type=float, default=6.0, help="pretraining budget (calibration and eval not counted)")
  p.add_argument("--batch", type=int, default=0, help="global batch (0: 64 per device)")
  p.add_argument("--data", required=True, help="pretraining source (config.data.source), e.g. 'brca:DIR|folder:DIR'")
  p.add_argument("--region_mpp", type=float, default=0.0, help="µm/px of folder: regions (0: unset)")
  p.add_argument("--eval_data", required=True, help="BRCA-M2C folder or 'bundled' for the evaluation")
  p.add_argument("--workdir", default="runs/device_pretrain")
  p.add_argument("--out", required=True, help="the JSON of every figure")
  p.add_argument("--half_life_frac", type=float, default=0.05, help="teacher half-life as a fraction of the run")
  p.add_argument("--workers", type=int, default=0, help="Grain worker processes (data.num_workers)")
  p.add_argument("--calib_steps", type=int, default=5)
  p.add_argument("--min_steps", type=int, default=20)
  p.add_argument("--log_every", type=int, default=10)
  p.add_argument("--linear_epochs", type=int, default=100)
  p.add_argument("--matmul_n", type=int, default=4096)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  if not a.minutes > 0:
    p.error(f"--minutes must be > 0 (got {a.minutes})")
  return a


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  result = run(args)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  tmp.write_text(json.dumps(result, indent=2, default=str))
  os.replace(tmp, out)
  t = result["train"]
  mfu = "n/a" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
  print(f"{result['device']['kind']} x{result['device']['count']}: {t['steps_done']} steps, "
        f"{t['regions_per_s']:.1f} regions/s, MFU {mfu}; {result['health']['line']}")
  for k, v in result["eval"].items():
    print(f"  {k:<12} kNN acc {v['knn_acc_val_k']:.2f} / macro-F1 {v['knn_f1_val_k']:.2f} (k={v['knn_k']} on val), "
          f"linear acc {v['linear_acc']:.2f} / macro-F1 {v['linear_f1']:.2f}")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  from absl import flags as _flags  # grain workers need absl flags parsed
  if not _flags.FLAGS.is_parsed():
    _flags.FLAGS.mark_as_parsed()
  sys.exit(main())
