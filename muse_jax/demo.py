r"""`make demo`: pretrain the CPU-scale recipe on the bundled BRCA-M2C sample, export the teacher, print a report.

  python -m muse_jax.demo [--workdir runs/demo] [--steps 300] [--budget_s 300] [--seed 0]

The report: the losses and the run-health diagnostics (one line: each head healthy or collapsed, with the step),
then kNN / linear probe on the bundled sample for the pretrained teacher, the same architecture at random
initialisation, and the raw-pixel baseline.

Runs on CPU in a few minutes (2 cores). Re-running on the same workdir resumes / reuses the finished run.

Evaluation hook: after the export, `evaluation_report(export_dir, workdir)` is called and its text (if any) is
printed. It calls `muse_jax.evaluation.demo.demo_table(export_dir, workdir=...) -> str` when that function exists
(the evaluation issue provides it: kNN / linear probe on the bundled sample, pretrained vs random init), so the
demo never needs editing to gain the accuracy table.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np

DEMO_STEPS = 300
DEMO_BUDGET_S = 300.0  # training stops (with a checkpoint) after this many seconds, whatever the step (a quiet
# 2-core machine runs the 300 steps of the small recipe in ~200-230 s, so the budget only cuts a slow or busy machine)


def demo_config(steps: int = DEMO_STEPS, seed: int = 0):
  """The CPU-scale recipe (`configs/pretrain.py:small`) on the bundled sample, sized to a few minutes on 2 cores.

  The schedules of `small` are fractions of the run, so they follow `steps`.
  """
  from configs import pretrain  # pylint: disable=import-outside-toplevel
  c = pretrain.get_config("small")
  c.data.source = "bundled"
  c.seed = seed
  c.total_steps = steps
  c.steps_per_epoch = steps
  c.checkpoint_every_steps = max(steps // 3, 1)
  c.log_every_steps = 10
  return c


def summarize_metrics(path: str | os.PathLike) -> dict[str, dict[str, float]]:
  """First / last / min (and the step of the min) of each loss in a `metrics.jsonl`; also mean shared nuclei."""
  rows = [json.loads(line) for line in open(path) if line.strip()]
  out: dict[str, dict[str, float]] = {}
  for key in ("loss", "loss_image", "loss_nu", "image_teacher_entropy", "image_batch_entropy", "nu_teacher_entropy",
              "nu_batch_entropy", "teacher_student_dist", "shared_nuclei", "valid_pairs", "images_per_s"):
    vals = [(r["step"], r[key]) for r in rows if key in r]
    if not vals:
      continue
    steps, v = zip(*vals)
    i = int(np.argmin(v))
    out[key] = {"first": v[0], "last": v[-1], "min": v[i], "min_step": steps[i], "mean": float(np.mean(v))}
  return out


def evaluation_report(export_dir: str, workdir: str, seed: int = 0) -> str | None:
  """Hook for the evaluation table (see the module docstring); None when evaluation is not available."""
  try:
    from muse_jax.evaluation import demo as eval_demo  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  fn = getattr(eval_demo, "demo_table", None)
  if fn is None:
    return None
  sources = eval_demo.compare_with_random_init(export_dir, seed=seed)
  sources["raw pixels (16 px window), no network"] = "raw:16"
  return fn(sources, workdir=workdir)


def run_demo(workdir: str, steps: int = DEMO_STEPS, budget_s: float | None = DEMO_BUDGET_S,
             seed: int = 0) -> dict[str, Any]:
  """Pretrain + export + report; returns the summary dict that was printed."""
  from muse_jax import export as export_lib  # pylint: disable=import-outside-toplevel
  from muse_jax.pretrain import train  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  config = demo_config(steps, seed)
  print(f"[demo] pretraining '{config.variant}' ({config.model.name} backbone, {steps} steps, batch "
        f"{config.batch_size}, views {config.data.n_global}x{config.data.global_size}px + "
        f"{config.data.n_local}x{config.data.local_size}px) on the bundled sample; {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); workdir {workdir}", flush=True)
  t0 = time.time()
  out = train.run(config, workdir, time_budget_s=budget_s)
  t_train = time.time() - t0
  export_dir = os.path.join(workdir, "export")
  export_lib.export(workdir, export_dir)
  summary = summarize_metrics(os.path.join(workdir, train.METRICS_FILE))
  lines = ["", "MUSE pretraining demo", "=" * 60,
           f"steps {out['step']}/{out['total_steps']} in {t_train:.0f} s (this run; includes compilation)", "",
           f"{'metric':<24}{'first':>10}{'last':>10}{'min':>10}{'@step':>8}"]
  for k, v in summary.items():
    lines.append(f"{k:<24}{v['first']:>10.4f}{v['last']:>10.4f}{v['min']:>10.4f}{v['min_step']:>8d}")
  lines += ["", out["health"]["line"], f"  (collapse thresholds and what each number means: WORKSPACE.md, 'Run health';"
            f" every value per step: {os.path.join(workdir, train.METRICS_FILE)})"]
  lines += ["", f"checkpoints : {out['checkpoint_dir']} (latest step {out['last_checkpoint_step']})",
            f"metrics     : {os.path.join(workdir, train.METRICS_FILE)}",
            f"export      : {export_dir}  (teacher backbone; muse_jax.backbone_io.load_backbone('{export_dir}'))"]
  table = evaluation_report(export_dir, workdir, seed)
  if table:
    lines += ["", table]
  print("\n".join(lines), flush=True)
  return {"run": out, "losses": summary, "export_dir": export_dir, "train_seconds": t_train, "table": table,
          "health": out["health"]}


def _main(argv: list[str] | None) -> int:
  from muse_jax import cli  # pylint: disable=import-outside-toplevel
  p = cli.ArgumentParser(prog="python -m muse_jax.demo", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--steps", type=int, default=DEMO_STEPS)
  p.add_argument("--budget_s", type=float, default=DEMO_BUDGET_S, help="training time budget in seconds")
  p.add_argument("--seed", type=int, default=0, help="seed of the pretraining and of the random-init baseline")
  args = p.parse_args(argv)
  cli.positive_int(args.steps, "--steps")
  cli.positive(args.budget_s, "--budget_s", unit="s")
  cli.positive_int(args.seed, "--seed", allow_zero=True)
  if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
    raise cli.UserError("not a folder", "--workdir", f"{args.workdir} is a file")
  run_demo(args.workdir, args.steps, args.budget_s, args.seed)
  return 0


def main(argv: list[str] | None = None) -> int:
  """The CLI; a user error (a bad flag, or one raised while training) is one line on stderr and exit code 2."""
  from muse_jax import cli  # pylint: disable=import-outside-toplevel
  return cli.run(_main, argv)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())
  from absl import flags as _flags  # grain workers need absl flags parsed (ENV.md gotcha 2)
  if not _flags.FLAGS.is_parsed():
    _flags.FLAGS.mark_as_parsed()
  sys.exit(main())
