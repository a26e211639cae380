r"""Runs a pretraining sweep one run after another, prints its launch commands, or gathers its results.

  python experiments/sweep.py experiments/sweeps/tiny_smoke.py --root runs/sweeps            # run locally
  python experiments/sweep.py experiments/sweeps/loss_ablation.py --root gs://B/sweeps --print \
      --template 'gcloud compute tpus tpu-vm ssh muse-v5p --worker=all --command "cd muse_jax && {cmd} --multihost"'
  python experiments/sweep.py experiments/sweeps/tiny_smoke.py --root runs/sweeps --gather    # results table

A sweep file defines `BASE` (the `--config` argument) and `RUNS` ({run name: {config field: value}}); run `NAME`
writes to `ROOT/<sweep>/NAME`. Each local run is a fresh `python -m muse_jax.main` process; a run whose workdir is
already complete returns at once and an interrupted one resumes, so re-running a sweep finishes it. `--gather`
reads the last record of each run's `metrics.jsonl` and prints one markdown table (also written as
`ROOT/<sweep>/results.md`).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from typing import Any

from etils import epath

COLUMNS = ("step", "loss", "loss_image", "loss_nu", "shared_nuclei", "valid_pairs", "grad_norm", "images_per_s")


def load_sweep(path: str) -> tuple[str, str, dict[str, dict[str, Any]]]:
  """(sweep name, BASE, RUNS) of a sweep file."""
  spec = importlib.util.spec_from_file_location("sweep_def", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  for attr in ("BASE", "RUNS"):
    if not hasattr(mod, attr):
      raise ValueError(f"sweep file {path} does not define {attr}")
  return os.path.splitext(os.path.basename(path))[0], mod.BASE, mod.RUNS


def command(base: str, workdir: str, overrides: dict[str, Any], python: str = sys.executable) -> list[str]:
  """The `python -m muse_jax.main` argument list of one run."""
  cmd = [python, "-m", "muse_jax.main", "--config", base, "--workdir", workdir]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  return cmd


def gather(root: epath.Path, runs: dict[str, Any]) -> str:
  """Markdown table of the last logged metrics of every run (missing runs marked)."""
  lines = ["| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
  for name in runs:
    path = root / name / "metrics.jsonl"
    if not path.exists():
      lines.append(f"| {name} | " + " | ".join(["not run"] + [""] * (len(COLUMNS) - 1)) + " |")
      continue
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    last = rows[-1] if rows else {}
    cells = []
    for c in COLUMNS:
      v = last.get(c)
      cells.append("" if v is None else (str(v) if isinstance(v, int) else f"{v:.4g}"))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("sweep", help="sweep definition file (experiments/sweeps/*.py)")
  p.add_argument("--root", default="runs/sweeps", help="parent of the sweep's run directories (local or gs://)")
  p.add_argument("--print", action="store_true", help="print the launch commands instead of running them")
  p.add_argument("--template", default="{cmd}", help="wraps each printed command, e.g. an sbatch/gcloud line")
  p.add_argument("--python", default="python", help="interpreter named in printed commands")
  p.add_argument("--gather", action="store_true", help="only gather the results table")
  p.add_argument("--only", nargs="*", default=None, help="run only these run names")
  args = p.parse_args(argv)

  name, base, runs = load_sweep(args.sweep)
  if args.only:
    unknown = sorted(set(args.only) - set(runs))
    if unknown:
      raise SystemExit(f"--only: unknown runs {unknown}; the sweep has {sorted(runs)}")
    runs = {k: v for k, v in runs.items() if k in args.only}
  root = epath.Path(args.root) / name
  if args.print:
    for run, ov in runs.items():
      cmd = shlex.join(command(base, str(root / run), ov, python=args.python))
      print(args.template.format(cmd=cmd, name=run))
    return 0
  failed = []
  if not args.gather:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for run, ov in runs.items():
      cmd = command(base, str(root / run), ov)
      print(f"[sweep {name}] {run}: {shlex.join(cmd)}", flush=True)
      if subprocess.run(cmd, cwd=repo, check=False).returncode:
        failed.append(run)
  table = gather(root, runs)
  print(table)
  root.mkdir(parents=True, exist_ok=True)
  (root / "results.md").write_text(table + "\n")
  if failed:
    print(f"[sweep {name}] failed runs: {failed}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
