r"""CLI of MUSE pretraining: parses flags and calls `muse_jax.pretrain.train.run`.

  python -m muse_jax.main --config configs/pretrain.py:tiny --workdir runs/tiny [--config.batch_size=16] [--debug]

Rerunning the same command on the same workdir resumes from its latest checkpoint. A resume may change only the
fields of `muse_jax.pretrain.train.RESUMABLE` (run length, logging, progress bar, checkpoint cadence / retention,
mesh, health thresholds, read threads); any other difference from the workdir's `config.json` is refused, naming
each changed field. Every config field is checked before anything is read or written.

Exit codes (`muse_jax.cli`):
  0   done
  1   a bug (traceback)
  2   user error, one line on stderr: bad flag or config value, bad data source, a workdir of another command, a
      resume that changes the config, a checkpoint that cannot be saved (disk full: the last good one is kept) or
      restored; `--debug` (or MUSE_DEBUG=1) shows the traceback
  75  preempted: SIGTERM received, a checkpoint was saved; rerun the same command to resume (requeue)

Multi-host (TPU pod slice, multi-node GPU): run the same command on every host and add `--multihost` (or set
`MUSE_MULTIHOST=1`); `jax.distributed.initialize()` then reads the cluster from the environment (TPU metadata,
SLURM, or `--coordinator_address`, `--num_processes`, `--process_id`).
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from muse_jax import cli
from muse_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file, e.g. configs/pretrain.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://); resumes if it holds checkpoints.")
_DIST = distributed.define_flags()
maybe_initialize_distributed = distributed.maybe_initialize_distributed  # kept for callers of muse_jax.main


def main(argv) -> int:
  if len(argv) > 1:
    raise cli.UserError("unexpected arguments", "command line", f"{argv[1:]} (flags are --name=value)")
  from muse_jax.pretrain import train  # pylint: disable=import-outside-toplevel
  train.validate_config(_CONFIG.value, check_data=True)  # before the (possibly slow) multi-host start-up
  train.check_workdir(_WORKDIR.value, _CONFIG.value)
  distributed.initialize_from_flags(_DIST)
  try:
    out = train.run(_CONFIG.value, _WORKDIR.value)
  except train.NonFiniteLossError as e:  # a diverged run is fixed by changing the config: one line, exit 2
    raise cli.UserError(str(e).rstrip("."), f"--workdir {_WORKDIR.value}",
                        "lower config.optim.base_lr or config.optim.clip_grad, then rerun (it resumes from that "
                        "checkpoint)") from e
  print(json.dumps({k: v for k, v in out.items() if k not in ("last_metrics", "health")}), flush=True)
  print(out["health"]["line"], flush=True)
  return cli.EXIT_PREEMPTED if out["preempted"] else cli.EXIT_OK


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # so config files can `from configs import ...` when run from the repo root
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run_absl(main)
