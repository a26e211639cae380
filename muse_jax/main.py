r"""CLI of MUSE pretraining: parses flags and calls `muse_jax.pretrain.train.run`.

  python -m muse_jax.main --config configs/pretrain.py:tiny --workdir runs/tiny [--config.batch_size=16]

Multi-host (TPU pod slice, multi-node GPU): run the same command on every host and add `--multihost` (or set
`MUSE_MULTIHOST=1`); `jax.distributed.initialize()` then reads the cluster from the environment (TPU metadata,
SLURM, or `--coordinator_address`, `--num_processes`, `--process_id`).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from muse_jax import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file, e.g. configs/pretrain.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://); resumes if it holds checkpoints.")
_DIST = distributed.define_flags()
maybe_initialize_distributed = distributed.maybe_initialize_distributed  # kept for callers of muse_jax.main


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize_from_flags(_DIST)
  from muse_jax.pretrain import train  # pylint: disable=import-outside-toplevel
  out = train.run(_CONFIG.value, _WORKDIR.value)
  print(json.dumps({k: v for k, v in out.items() if k not in ("last_metrics", "health")}), flush=True)
  print(out["health"]["line"], flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # so config files can `from configs import ...` when run from the repo root
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
