r"""Benchmark of the glibc malloc settings of `muse_jax/host_malloc.py` on the CPU: the same jitted work with
`MUSE_HOST_MALLOC=off` (glibc's defaults) and `on`, each in its own process, alternating.

Run from the repository root:

  PYTHONPATH=. .venv/bin/python -m experiments.bench_host_malloc                  # vit_s16 backbone + pretrain step
  PYTHONPATH=. .venv/bin/python -m experiments.bench_host_malloc --what backbone:r50,pretrain:tiny --rounds 3

The settings bind when a process starts (the arena limit applies to threads that allocate for the first time after
it), so each measurement is a fresh process: `--rounds` times an `off` process then an `on` process, so load from
other processes hits both alike. Per process: one warm-up call (compile), then `--repeats` timed calls; per call the
wall time and, from `getrusage`, the minor page faults and the system CPU seconds (the kernel's time mapping and
zeroing pages); the peak RSS of the process. The table gives the median over rounds of each process's median.

Workloads (`--what`, comma-separated):
- `backbone:VARIANT`: the backbone's forward + backward (train mode), batch `--batch`, 224 px, as `bench_backbone`.
- `pretrain:CONFIG`: the full pretraining step of `configs/pretrain.py:CONFIG` on synthetic data, as `bench_train`
  (batch: the config's for `tiny`, `--vit_batch` regions for the others).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _child(what: str, repeats: int, batch: int, vit_batch: int) -> dict:
  """Runs in the measured process: builds `what`, times it, returns the per-call figures."""
  import resource  # pylint: disable=import-outside-toplevel

  import muse_jax  # pylint: disable=import-outside-toplevel,unused-import  (applies MUSE_HOST_MALLOC first)
  from muse_jax import host_malloc  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  kind, _, name = what.partition(":")
  if kind == "backbone":
    import functools  # pylint: disable=import-outside-toplevel
    from configs.models import get_config  # pylint: disable=import-outside-toplevel
    from experiments.bench_backbone import backbone_fwd_bwd  # pylint: disable=import-outside-toplevel
    from muse_jax.models import build_backbone  # pylint: disable=import-outside-toplevel
    images = jax.random.normal(jax.random.key(0), (batch, 224, 224, 3))
    module = build_backbone(get_config(name))
    variables = jax.jit(functools.partial(module.init, train=False))(jax.random.key(1), images[:1])
    jitted = jax.jit(backbone_fwd_bwd(module))
    call = lambda: jitted(variables, images)  # noqa: E731
  elif kind == "pretrain":
    from experiments.bench_train import synthetic_config  # pylint: disable=import-outside-toplevel
    from muse_jax.pretrain import train  # pylint: disable=import-outside-toplevel
    s = train.setup(synthetic_config(name, None if name == "tiny" else vit_batch), jax.devices()[:1])
    state = s["create_state"](s["init_rng"])
    gb = jax.tree.map(lambda x: jax.device_put(x, s["batch_sharding"]), next(s["data_iter"]))
    step = jax.jit(s["step_fn"])
    key = jax.random.PRNGKey(0)
    call = lambda: step(jax.tree.map(jnp.copy, state), gb, key)  # noqa: E731  (the step donates its state)
  else:
    raise ValueError(f"--what: expected backbone:VARIANT or pretrain:CONFIG; got {what!r}")
  jax.block_until_ready(call())
  walls, faults, sys_s = [], [], []
  for _ in range(repeats):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    jax.block_until_ready(call())
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    walls.append(t1 - t0)
    faults.append(r1.ru_minflt - r0.ru_minflt)
    sys_s.append(r1.ru_stime - r0.ru_stime)
  return dict(what=what, host_malloc=host_malloc.status(), wall_s=statistics.median(walls),
              minor_faults=statistics.median(faults), sys_s=statistics.median(sys_s),
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _run(what: str, mode: str, args) -> dict:
  env = dict(os.environ, MUSE_HOST_MALLOC=mode, PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "experiments.bench_host_malloc", "--child", what, "--repeats", str(args.repeats),
         "--batch", str(args.batch), "--vit_batch", str(args.vit_batch)]
  p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
  lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
  if p.returncode or not lines:
    raise RuntimeError(f"{what} with MUSE_HOST_MALLOC={mode} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
  return json.loads(lines[-1])


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--what", default="backbone:vit_s16,pretrain:vit_s16",
                 help="comma-separated workloads: backbone:VARIANT, pretrain:CONFIG")
  p.add_argument("--rounds", type=int, default=2, help="off/on process pairs per workload")
  p.add_argument("--repeats", type=int, default=3, help="timed calls per process (after one warm-up call)")
  p.add_argument("--batch", type=int, default=8, help="backbone batch")
  p.add_argument("--vit_batch", type=int, default=1, help="pretraining batch (regions) of the non-tiny configs")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  p.add_argument("--json", default=None, help="also write the measured rows and parameters to this JSON file")
  args = p.parse_args(argv)
  for name in ("rounds", "repeats", "batch", "vit_batch"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1; got {getattr(args, name)}")
  if args.child:
    print(json.dumps(_child(args.child, args.repeats, args.batch, args.vit_batch)))
    return
  from configs import models, pretrain  # pylint: disable=import-outside-toplevel
  names = {"backbone": models.VARIANTS, "pretrain": pretrain.VARIANTS}
  whats = [w for w in args.what.split(",") if w]
  bad = [w for w in whats if w.partition(":")[2] not in names.get(w.partition(":")[0], ())]
  if bad or not whats:
    p.error(f"--what: expected backbone:VARIANT (one of {', '.join(models.VARIANTS)}) or pretrain:CONFIG (one of "
            f"{', '.join(pretrain.VARIANTS)}); got {', '.join(bad) or repr(args.what)}")
  print(f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}; {args.rounds} round(s) of an off "
        f"and an on process per workload, median of {args.repeats} calls per process\n")
  print("| workload | wall s off | wall s on | speed-up | page faults / call off / on | system CPU s / call off / on "
        "| peak RSS MB off / on |")
  print("|---|---|---|---|---|---|---|", flush=True)
  rows = []
  for what in whats:
    runs = {"off": [], "on": []}
    for _ in range(args.rounds):
      for mode in ("off", "on"):
        runs[mode].append(_run(what, mode, args))
    if not runs["on"][0]["host_malloc"].startswith("applied"):
      print(f"note: MUSE_HOST_MALLOC=on was not applied here ({runs['on'][0]['host_malloc']})")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "minor_faults", "sys_s", "peak_rss_mb")}
           for m, rs in runs.items()}
    off, on = med["off"], med["on"]
    print(f"| {what} | {off['wall_s']:.3f} | {on['wall_s']:.3f} | {off['wall_s'] / on['wall_s']:.2f}x | "
          f"{off['minor_faults']:.0f} / {on['minor_faults']:.0f} | {off['sys_s']:.3f} / {on['sys_s']:.3f} | "
          f"{off['peak_rss_mb']:.0f} / {on['peak_rss_mb']:.0f} |", flush=True)
    rows.append(dict(what=what, off=off, on=on, speedup=off["wall_s"] / on["wall_s"],
                     walls_off=[r["wall_s"] for r in runs["off"]], walls_on=[r["wall_s"] for r in runs["on"]],
                     status_on=runs["on"][0]["host_malloc"]))
  print(f"\ncommand: python -m experiments.bench_host_malloc --what {args.what} --rounds {args.rounds} "
        f"--repeats {args.repeats} --batch {args.batch} --vit_batch {args.vit_batch}")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(dict(
        benchmark="bench_host_malloc", params={k: v for k, v in vars(args).items() if k not in ("json", "child")},
        tables=dict(host_malloc=rows)), indent=1))


if __name__ == "__main__":
  main()
